"""Engine tests on real tiny models: stop strings (also split across tokens), multi-byte streaming,
history truncation, batching, beams, cancellation."""

import threading
import time

import pytest
import torch

from toucan.sampling import SamplingParams
from toucan.data import encode_example
from toucan.engine import Engine, PromptTooLongError, _Row, _Rows
from toucan.modeling import tiny_llama

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
# "鳕" and "鱼" are not in the tiny tokenizer: they are byte-fallback tokens (3 bytes each).
REPLY = "鳕鱼很好吃。"


_PARROT = {}


def train_parrot(tok):
    """A tiny LLaMA overfitted (plain AdamW, a few seconds) to answer '你好' with REPLY + EOS, also
    after a turn of history. Cached per session: chat, web and API tests serve it too."""
    if "model" not in _PARROT:
        from toucan.data import IGNORE_INDEX
        from toucan.prompts import build_prompt

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 2 threads on 2 busy cores are several times slower than 1
        torch.manual_seed(0)
        model = tiny_llama(len(tok), tokenizer=tok)
        rows = [encode_example(tok, build_prompt("你好", history=h), REPLY, 256)
                for h in ([], [("你好", REPLY)])]
        width = max(len(r.input_ids) for r in rows)  # right-pad into one batch; pads are masked out
        x = torch.tensor([r.input_ids + [tok.pad_token_id] * (width - len(r.input_ids)) for r in rows])
        y = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
        mask = (x != tok.pad_token_id).long()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(30):
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        torch.set_num_threads(threads)
        assert loss.item() < 0.1, loss.item()
        _PARROT["model"] = model
    return _PARROT["model"]


def save_parrot(tok, out):
    from toucan.modeling import save_model_dir

    if not (out / "config.json").exists():
        save_model_dir(out, train_parrot(tok), tok, command="test-parrot")
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parrot(tiny_tok):
    return Engine(train_parrot(tiny_tok), tiny_tok)


@pytest.fixture(scope="module")
def rand_engine(tiny_tok):
    return Engine(tiny_llama(len(tiny_tok), tokenizer=tiny_tok, seed=1).eval(), tiny_tok)


def test_multibyte_stream_has_no_replacement_char_and_stops_at_eos(parrot, tiny_tok):
    ids = tiny_tok(REPLY, add_special_tokens=False)["input_ids"]
    assert any(tiny_tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # really byte-fallback
    prompt = parrot.chat_prompt([], "你好", 32)[0]
    s = parrot.stream(prompt, SamplingParams(max_new_tokens=32, **GREEDY))
    deltas = list(s)
    assert "".join(deltas) == REPLY
    assert len(deltas) >= 4 and all("\ufffd" not in d for d in deltas)
    assert s.completion.finish_reason == "stop"  # EOS
    assert s.completion.completion_tokens == len(ids) + 1  # EOS counted
    assert s.completion.prompt_tokens == len(parrot.encode(prompt))
    assert parrot.generate(prompt, SamplingParams(max_new_tokens=32, **GREEDY)).text == REPLY


@pytest.mark.parametrize("stop", ["很好", "鱼很", "鳕", "。"])
def test_stop_string_never_returned_or_streamed(parrot, stop):
    # "鱼很" spans a byte-fallback character and a normal token; "。" is the last token.
    prompt = parrot.chat_prompt([], "你好", 32)[0]
    opts = SamplingParams(max_new_tokens=32, stop=["不会出现", stop], **GREEDY)
    s = parrot.stream(prompt, opts)
    deltas = list(s)
    want = REPLY[:REPLY.index(stop)]
    assert "".join(deltas) == want  # nothing of the stop string was ever sent: deltas are never retracted
    assert s.completion.text == want and s.completion.finish_reason == "stop"
    assert parrot.generate(prompt, opts).text == want


def test_stop_prefix_is_released_when_it_does_not_complete(parrot):
    prompt = parrot.chat_prompt([], "你好", 32)[0]
    # "好吃" starts like "好X": held back one step, then released when "吃" arrives
    s = parrot.stream(prompt, SamplingParams(max_new_tokens=32, stop=["好X"], **GREEDY))
    assert "".join(s) == REPLY


def test_token_bytes_decode_equals_tokenizer_decode(tiny_tok):
    text = "鳕鱼 hello 你好，世界！ x=1; 很好吃。\n第二行"
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    got = []
    row = _Row(max_new_tokens=1000, stop=[], on_text=got.append)
    tracker = _Rows(tiny_tok, [row])
    for i in ids:
        tracker.step(row, i)
    tracker.step(row, tiny_tok.eos_token_id)
    assert row.text == "".join(got) == tiny_tok.decode(ids)
    assert all("\ufffd" not in g for g in got)


def test_token_bytes_decode_llama_tokenizer_on_chinese_data(llama_tok):
    import json

    from conftest import shared_path

    recs = json.loads(shared_path("data/alpaca/alpaca_zh_demo.json").read_text())[:50]
    for r in recs:
        ids = llama_tok(r["output"], add_special_tokens=False)["input_ids"]
        got = []
        row = _Row(max_new_tokens=10**6, stop=[], on_text=got.append)
        tracker = _Rows(llama_tok, [row])
        for i in ids:
            tracker.step(row, i)
        tracker.finish(row, "length")
        assert "".join(got) == llama_tok.decode(ids)
        assert all("\ufffd" not in g for g in got)


def test_history_truncated_oldest_first(tiny_tok, rand_engine):
    eng = Engine(rand_engine.model, tiny_tok, max_context=160)
    history = [(f"问题{i}", f"回答{i}" * 3) for i in range(12)]
    prompt, kept = eng.chat_prompt(history, "现在", 64)
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]  # newest kept, oldest dropped
    assert eng.count_tokens(prompt) + 64 <= 160
    # one more kept turn would not have fitted
    from toucan.prompts import build_prompt

    assert eng.count_tokens(build_prompt("现在", history=history[-len(kept) - 1:])) + 64 > 160
    _, kept_more = eng.chat_prompt(history, "现在", 16)
    assert len(kept_more) > len(kept)
    # OpenAI messages go the same way
    msgs = []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": "现在"})
    assert eng.messages_prompt(msgs, 64) == prompt


def test_prompt_too_long_raises_and_new_tokens_clamped_to_context(tiny_tok, rand_engine):
    eng = Engine(rand_engine.model, tiny_tok, max_context=64)
    with pytest.raises(PromptTooLongError):
        eng.generate("你好" * 100, SamplingParams(max_new_tokens=4))
    with pytest.raises(PromptTooLongError):
        eng.stream("你好" * 100, SamplingParams(max_new_tokens=4))
    short = "你好" * 10
    c = eng.generate(short, SamplingParams(max_new_tokens=500, **GREEDY))
    assert c.prompt_tokens + c.completion_tokens <= 64


def test_batch_left_padding_matches_single(parrot):
    prompts = [parrot.chat_prompt([], "你好", 32)[0], "你好", parrot.chat_prompt([("a", "b")], "你好", 32)[0]]
    opts = SamplingParams(max_new_tokens=12, **GREEDY)
    batch = parrot.generate_batch(prompts, opts)
    single = [parrot.generate(p, opts) for p in prompts]
    assert [c.text for c in batch] == [c.text for c in single]
    assert batch[0].text == REPLY
    assert [c.prompt_tokens for c in batch] == [len(parrot.encode(p)) for p in prompts]


def test_per_row_limits_in_one_batch(parrot):
    p = parrot.chat_prompt([], "你好", 32)[0]
    out = parrot.run([parrot.encode(p)] * 3, SamplingParams(**GREEDY), max_new_tokens=[2, 32, 32],
                      stop=[[], ["好吃"], []])
    assert out[0].finish_reason == "length" and out[0].completion_tokens == 2
    assert out[1].text == "鳕鱼很" and out[1].finish_reason == "stop"
    assert out[2].text == REPLY


def test_sampling_seeded_and_beam_search(rand_engine):
    opts = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = rand_engine.generate("你好", opts), rand_engine.generate("你好", opts)
    assert a.text == b.text and a.completion_tokens == 16
    c = rand_engine.generate("你好", SamplingParams(max_new_tokens=16, temperature=1.0, seed=8))
    assert c.text != a.text
    beam = rand_engine.generate("你好", SamplingParams(max_new_tokens=8, num_beams=3, repetition_penalty=1.0))
    assert beam.completion_tokens <= 8 and beam.finish_reason in ("stop", "length")


def test_cancel_stops_generation(rand_engine):
    s = rand_engine.stream("你好", SamplingParams(max_new_tokens=400, **GREEDY))
    it = iter(s)
    next(it)
    s.cancel()
    rest = list(it)
    assert s.completion.finish_reason == "cancelled"
    assert s.completion.completion_tokens < 50, (len(rest), s.completion)
    # closing the iterator early (a client that went away) also stops it
    s2 = rand_engine.stream("你好", SamplingParams(max_new_tokens=400, **GREEDY))
    it2 = iter(s2)
    next(it2)
    it2.close()
    assert s2.completion.finish_reason == "cancelled"
    assert not any(t.name == "toucan-generate" and t.is_alive() for t in threading.enumerate())


def test_request_joins_the_running_batch_and_takes_a_freed_slot(rand_engine, tiny_tok):
    """Continuous batching: a request that arrives while another generates gets its first token long
    before that one finishes; with two slots, a third waits for a slot and takes the one a finished
    request freed, still while the long one runs. Each answer equals the same request alone."""
    import time

    eng = Engine(rand_engine.model, tiny_tok, max_rows=2)
    assert eng.batch_stats() == {}  # no scheduler yet
    # every counter exists from the scheduler's start: /health copies them from another thread while
    # the scheduler counts, and a key added mid-copy would fail that copy
    assert eng.scheduler.stats == {"steps": 0, "rows": 0, "max_rows": 0, "prefills": 0, "joined": 0}
    long_opts = SamplingParams(max_new_tokens=300, min_new_tokens=300, **GREEDY)
    short = SamplingParams(max_new_tokens=12, min_new_tokens=12, **GREEDY)
    first: dict[str, float] = {}

    def consume(name, stream, out):
        for delta in stream:
            first.setdefault(name, time.monotonic())
            out.append(delta)
        out.append(time.monotonic())

    a_out, b_out, c_out = [], [], []
    a = eng.stream("你好", long_opts)
    ta = threading.Thread(target=consume, args=("a", a, a_out))
    ta.start()
    while "a" not in first:
        time.sleep(0.005)
    b, c = eng.stream("请写一首诗。", short), eng.stream("第二个问题", short)  # c waits: both slots taken
    tb, tc = threading.Thread(target=consume, args=("b", b, b_out)), threading.Thread(target=consume, args=("c", c, c_out))
    tb.start(), tc.start()
    for t in (ta, tb, tc):
        t.join(120)
    a_done = a_out[-1]
    assert first["b"] < a_done and first["c"] < a_done  # joined the running batch, did not wait for it
    # never more than 2 rows, yet c started while a ran: it took the slot b left
    assert eng.scheduler.stats["max_rows"] == 2 and eng.scheduler.stats["joined"] == 3
    assert a.completion.completion_tokens == 300 and c.completion.completion_tokens == 12
    alone = Engine(rand_engine.model, tiny_tok, continuous=False)
    assert b.completion.text == alone.generate("请写一首诗。", short).text
    assert c.completion.text == alone.generate("第二个问题", short).text
    assert a.completion.text == alone.generate("你好", long_opts).text


def test_rows_joining_and_leaving_in_any_order_keep_their_answers(rand_engine, tiny_tok):
    """The running batch's KV slots (engine._KVSlots) under churn: prompts of different lengths
    (a joiner longer than the running rows shifts them right), more rows than the first buffer
    holds, answers longer than its spare columns, and rows leaving from the middle (the last row
    moves into the slot). Every greedy answer equals the same request decoded alone."""
    import random

    eng = Engine(rand_engine.model, tiny_tok, max_rows=7)
    alone = Engine(rand_engine.model, tiny_tok, continuous=False)
    rng = random.Random(0)
    # the first (started at once) is short and long-running: longer prompts then join rows that
    # start near column 0, and the running rows move right to make room
    jobs = [("你好", 130), ("请写一首关于大海的诗。" * 12, 9)] + [
        ("你好" * rng.randint(1, 30), rng.choice([3, 9, 40, 130])) for _ in range(16)]
    delays = [0.0, 0.02] + [0.05 + rng.random() * 0.3 for _ in range(16)]  # staggered: joins land between steps
    results = {}

    def run(i, prompt, n):
        time.sleep(delays[i])
        results[i] = eng.generate(prompt, SamplingParams(max_new_tokens=n, min_new_tokens=n, **GREEDY))

    threads = [threading.Thread(target=run, args=(i, p, n)) for i, (p, n) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert eng.scheduler.stats["max_rows"] > 4  # past the first buffer's rows
    for i, (p, n) in enumerate(jobs):
        want = alone.generate(p, SamplingParams(max_new_tokens=n, min_new_tokens=n, **GREEDY))
        assert results[i].text == want.text and results[i].completion_tokens == n, (i, len(p), n)


def test_kv_slots_move_in_place_and_keep_their_buffers():
    """engine._KVSlots without a model: a full buffer moves its live region to column 0 in place
    when its left has room (new buffers were a page-faulting stall of every row), into new buffers
    when it has not; a batch that empties keeps its buffers for the next one. The live keys and
    values are what was written, whichever path ran."""
    import torch
    from transformers import DynamicCache

    from toucan.engine import _KVSlots

    def prefill(n, t, seed):
        g = torch.Generator().manual_seed(seed)
        c = DynamicCache()
        for i in range(2):
            c.update(torch.randn(n, 2, t, 4, generator=g), torch.randn(n, 2, t, 4, generator=g), i)
        return c

    def live(s):
        return [x[:s.n, :, s.lo:s.hi].clone() for x in s.k + s.v]

    first = prefill(3, 5, 0)
    s = _KVSlots(first, max_rows=8)
    assert s.k[0].shape[:3] == (4, 2, 5 + 64)  # at least 4 rows, 64 spare columns
    assert all(torch.equal(a, b) for a, b in zip(live(s), [x.keys for x in first.layers] + [x.values for x in first.layers]))
    step = 0
    while s.hi < s.k[0].shape[2]:  # decode steps fill the spare columns with known values
        s.reserve(1)
        for buf in s.k + s.v:
            buf[:s.n, :, s.hi] = step
        s.advance(1)
        step += 1
    s.lo = 40  # the rows that used columns 0..39 have left
    before, bufs = live(s), [id(b) for b in s.k + s.v]
    s.reserve(1)  # 40 free columns on the left: in place
    assert (s.lo, [id(b) for b in s.k + s.v]) == (0, bufs) and all(torch.equal(a, b) for a, b in zip(live(s), before))
    s.lo, s.hi = 10, s.k[0].shape[2]  # full again, 10 free on the left: too few, new buffers twice as wide
    before = live(s)
    s.reserve(1)
    assert s.lo == 0 and s.k[0].shape[2] == 2 * (s.hi + 1) + 64 and [id(b) for b in s.k + s.v] != bufs
    assert all(torch.equal(a, b) for a, b in zip(live(s), before))
    bufs, nxt = [id(b) for b in s.k + s.v], prefill(2, 7, 1)
    s.start(nxt, want=3)  # the batch emptied; the next one fits: same buffers
    assert [id(b) for b in s.k + s.v] == bufs and (s.n, s.lo, s.hi) == (2, 0, 7)
    assert all(torch.equal(a, b) for a, b in zip(live(s), [x.keys for x in nxt.layers] + [x.values for x in nxt.layers]))
    s.start(prefill(2, 7, 2), want=6)  # wants more rows than it has: new buffers, sized for them
    assert s.k[0].shape[0] == 6


def test_sampling_params_are_the_one_source_of_defaults():
    """config's generation flags and serve's request models default from SamplingParams; the
    greedy rule is one function."""
    import dataclasses

    from toucan.config import ChatConfig, EvalGenerateConfig, GenerationOptions, ServeConfig
    from toucan.sampling import OPENAI, is_sampling
    from toucan.serve.api import CompletionRequest

    assert dataclasses.asdict(GenerationOptions().sampling_params()) == dataclasses.asdict(SamplingParams())
    assert ChatConfig(model="m").sampling_params(seed=3) == SamplingParams(seed=3)
    assert EvalGenerateConfig(data="d", output="o").sampling_params() == SamplingParams(do_sample=False)
    req = CompletionRequest(model="m", prompt="p")
    assert (req.temperature, req.top_p, req.top_k, req.min_tokens) == \
        (OPENAI.temperature, OPENAI.top_p, OPENAI.top_k, OPENAI.min_new_tokens)
    assert ServeConfig(model="m").max_tokens == SamplingParams().max_new_tokens
    assert ServeConfig(model="m").repetition_penalty == OPENAI.repetition_penalty
    assert SamplingParams().sampling and is_sampling(GenerationOptions())
    for greedy in (SamplingParams(temperature=0), SamplingParams(do_sample=False), SamplingParams(num_beams=2)):
        assert not greedy.sampling


def test_model_id_resolves_symlinks(tmp_path, monkeypatch):
    from toucan.engine import model_id

    (tmp_path / "sft-3").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "sft-3")
    assert model_id(tmp_path / "latest") == model_id(str(tmp_path / "sft-3") + "/") == "sft-3"
    monkeypatch.chdir(tmp_path / "sft-3")
    assert model_id(".") == "sft-3"


def test_unknown_context_is_a_stated_default(tiny_tok, caplog):
    from types import SimpleNamespace

    from toucan.engine import FALLBACK_CONTEXT

    with caplog.at_level("WARNING", logger="toucan.engine"):
        eng = Engine(SimpleNamespace(config=SimpleNamespace()), tiny_tok)
    assert eng.max_context == FALLBACK_CONTEXT and f"{FALLBACK_CONTEXT}-token context" in caplog.text
    assert Engine(SimpleNamespace(config=SimpleNamespace()), tiny_tok, max_context=99).max_context == 99


def test_one_context_check_for_every_front_end(tiny_tok):
    """Engine.encode_fitting: the check the engine, the API and eval share; a prompt far beyond
    the context is refused from a prefix (its count says 'over')."""
    eng = Engine(None, tiny_tok, max_context=64)
    assert eng.encode_fitting("你好") == eng.encode("你好")
    with pytest.raises(PromptTooLongError, match=r"the prompt is \d+ tokens; this model's context is 64") as e:
        eng.encode_fitting("你好" * 40)
    assert not e.value.over and e.value.tokens >= 64 and e.value.context == 64
    with pytest.raises(PromptTooLongError, match="the prompt is over") as e:
        eng.encode_fitting("你好" * 10_000)
    assert e.value.over and e.value.tokens > 63
    assert eng.fits(63) and not eng.fits(64)
