"""The llama.cpp backend (toucan.engine.LlamaCppEngine) on real GGUF files that `toucan export gguf`
makes from real tiny models, through real llama-cpp-python: the same prompts (token ids), streaming,
stop strings, sampling options, truncation, cancellation and queueing as the transformers engine;
and `chat --plain`, `serve` and `eval generate` with --model FILE.gguf."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import TINY_TOKENIZER, free_port
from test_engine import REPLY, save_parrot
from toucan import cli
from toucan.data import encode_prompt
from toucan.demo import exact_match
from toucan.engine import Engine, LlamaCppEngine
from toucan.errors import ConfigError, ModelError
from toucan.gguf_export import export_gguf
from toucan.modeling import load_tokenizer
from toucan.prompts import build_prompt
from toucan.sampling import SamplingParams

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def gguf_of(model_dir, out, gtype="f16"):
    if not (model_dir / "tokenizer.model").is_file():  # the exporter reads the SentencePiece model
        shutil.copy(TINY_TOKENIZER / "tokenizer.model", model_dir / "tokenizer.model")
    if not out.is_file():
        export_gguf(model_dir, out, gtype)
    return out


@pytest.fixture(scope="module")
def parrot_dir(tiny_tok, tmp_path_factory):
    return save_parrot(tiny_tok, tmp_path_factory.mktemp("gguf") / "parrot")


@pytest.fixture(scope="module")
def parrot_gguf(parrot_dir):
    return gguf_of(parrot_dir, parrot_dir.parent / "parrot-f16.gguf")


@pytest.fixture(scope="module")
def gg(parrot_gguf):
    return Engine.from_dir(parrot_gguf, threads=1)


@pytest.fixture(scope="module")
def hf(parrot_dir):
    return Engine.from_dir(parrot_dir, device="cpu")


def test_gguf_path_picks_llama_cpp_and_prompt_ids_equal_toucans(gg, tiny_tok):
    assert isinstance(gg, LlamaCppEngine) and gg.max_context == 512  # the model's context length
    texts = ["你好", "鳕鱼很好吃。 hello world", "😀 emoji 🦜 and code: def f(x): return x ** 2",
             "第一行\n第二行\n\n第三段", "Mixed 中文 English 123 混合"]
    prompts = [build_prompt(t) for t in texts]
    prompts += [build_prompt("现在呢？", history=[("你好", REPLY), ("再说一遍", REPLY)]),
                build_prompt("翻译", "Hello, world.", system="你是一个翻译。")]
    for p in prompts:
        assert gg.encode(p) == encode_prompt(tiny_tok, p), p  # [BOS] + tokens(prompt), as in training


def test_gguf_greedy_stream_equals_completion_and_hf(gg, hf):
    prompt = gg.chat_prompt([], "你好", 32)[0]
    opts = SamplingParams(max_new_tokens=32, **GREEDY)
    s = gg.stream(prompt, opts)
    deltas = list(s)
    assert "".join(deltas) == s.completion.text == REPLY and len(deltas) >= 4
    assert all("\ufffd" not in d for d in deltas)  # "鳕鱼" are byte-fallback tokens: never half a character
    want = hf.generate(prompt, opts)
    assert s.completion == want  # text, token counts, finish reason: all the transformers engine's
    # options with the same meaning as transformers': repetition penalty over prompt + reply, min tokens
    for kw in (dict(repetition_penalty=1.5), dict(min_new_tokens=20, max_new_tokens=24),
               dict(repetition_penalty=1.3, min_new_tokens=16)):
        o = SamplingParams(**{**opts.__dict__, **kw})
        assert gg.generate(prompt, o) == hf.generate(prompt, o), kw
    assert gg.generate(prompt, SamplingParams(min_new_tokens=20, max_new_tokens=24, **GREEDY)).completion_tokens >= 20


def test_gguf_stop_strings_held_back_and_released(gg):
    prompt = gg.chat_prompt([], "你好", 32)[0]
    for stop, want in (("很好", "鳕鱼"), ("吃。", "鳕鱼很好")):
        s = gg.stream(prompt, SamplingParams(max_new_tokens=32, stop=[stop], **GREEDY))
        deltas = list(s)
        assert "".join(deltas) == want == s.completion.text and s.completion.finish_reason == "stop"
    s = gg.stream(prompt, SamplingParams(max_new_tokens=32, stop=["好X"], **GREEDY))
    assert "".join(s) == REPLY  # "好" held back one step, then released
    c = gg.generate(prompt, SamplingParams(max_new_tokens=3, **GREEDY))
    assert c.finish_reason == "length" and c.completion_tokens == 3 and REPLY.startswith(c.text)


def test_gguf_sampling_options(gg):
    prompt = gg.chat_prompt([], "问点别的", 32)[0]  # not the trained question: a spread-out distribution
    hot = dict(temperature=1.5, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=12)
    seeded = [gg.generate(prompt, SamplingParams(seed=s, **hot)).text for s in (1, 2, 3, 1)]
    assert seeded[0] == seeded[3] and len(set(seeded)) > 1  # a seed repeats, other seeds differ
    greedy = gg.generate(prompt, SamplingParams(max_new_tokens=12, **GREEDY)).text
    assert gg.generate(prompt, SamplingParams(**{**hot, "top_k": 1}, seed=5)).text == greedy
    assert gg.generate(prompt, SamplingParams(**{**hot, "top_p": 1e-6}, seed=5)).text == greedy
    assert gg.generate(prompt, SamplingParams(max_new_tokens=12, do_sample=False, temperature=1.5)).text == greedy
    with pytest.raises(ConfigError, match="beam"):
        gg.generate(prompt, SamplingParams(num_beams=2, **GREEDY))


def test_gguf_history_truncated_to_n_ctx(parrot_gguf):
    eng = Engine.from_dir(parrot_gguf, max_context=128, threads=1)
    assert eng.max_context == 128
    history = [(f"问题{i}", f"回答{i}" * 3) for i in range(12)]
    prompt, kept = eng.chat_prompt(history, "你好", 32)
    assert 0 < len(kept) < len(history) and kept == history[-len(kept):]
    assert eng.count_tokens(prompt) + 32 <= 128
    c = eng.generate(prompt, SamplingParams(max_new_tokens=32, **GREEDY))
    assert c.prompt_tokens + c.completion_tokens <= 128


def test_gguf_cancel_and_concurrent_requests_queue(gg, hf):
    prompt = gg.chat_prompt([], "你好", 400)[0]
    long = SamplingParams(max_new_tokens=400, min_new_tokens=400, **GREEDY)  # EOS suppressed: runs on
    s = gg.stream(prompt, long)
    it = iter(s)
    next(it)
    s.cancel()
    rest = list(it)
    assert s.completion.finish_reason == "cancelled" and s.completion.completion_tokens < 400, (len(rest), s.completion)
    # several threads at once: the lock queues them through the one llama.cpp context, each gets its answer
    out = {}
    opts = SamplingParams(max_new_tokens=32, **GREEDY)

    def ask(i):
        out[i] = "".join(gg.stream(gg.chat_prompt([("你好", REPLY)] * (i % 2), "你好", 32)[0], opts))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == {i: REPLY for i in range(4)}
    # a batch handed to run() (the API's batcher) is decoded row after row, each with its own limits
    ids = [gg.encode(prompt)] * 3
    kw = dict(max_new_tokens=[8, 32, 32], stop=[[], ["好吃"], []])
    res = gg.run(ids, opts, **kw)
    assert [r.text for r in res] == ["鳕鱼很", "鳕鱼很", REPLY] and res[0].finish_reason == "length"
    assert res == hf.run(ids, opts, **kw)


def test_gguf_bad_files_are_one_line_errors(tmp_path, parrot_gguf, capsys, monkeypatch):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(parrot_gguf.read_bytes()[: parrot_gguf.stat().st_size // 2])
    notgguf = tmp_path / "text.gguf"
    notgguf.write_text("hello")
    for f in (cut, notgguf, tmp_path / "missing.gguf"):
        assert cli.main(["-q", "chat", "--model", str(f), "--plain"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(f) in err, err
    # without llama-cpp-python: one line naming the extra to install
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ModelError, match=r"toucan\[edge\]"):
        Engine.from_dir(parrot_gguf)


@pytest.mark.integration
@pytest.mark.slow
def test_chat_plain_serve_and_eval_generate_on_gguf(parrot_gguf, tmp_path):
    from test_api import start_server

    r = subprocess.run([sys.executable, "-m", "toucan.cli", "-q", "chat", "--model", str(parrot_gguf), "--plain",
                        "--temperature", "0", "--repetition-penalty", "1.0", "--threads", "1"],
                       input="你好\n", capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and r.stdout == REPLY + "\n", r.stderr

    # --n-ctx beyond the model's 512 positions: room for a long generation to cancel below
    proc, base = start_server(["--model", str(parrot_gguf), "--threads", "1", "--max-batch-size", "4",
                               "--n-ctx", "2048"], free_port(), tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [parrot_gguf.name]
        c = client.chat.completions.create(model=parrot_gguf.name, temperature=0,
                                           messages=[{"role": "user", "content": "你好"}])
        assert c.choices[0].message.content == REPLY and c.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model=parrot_gguf.name, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "你好"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == REPLY
        got = {}

        def one(i):
            got[i] = client.completions.create(model=parrot_gguf.name, prompt=build_prompt("你好"), temperature=0,
                                               max_tokens=4 + i).choices[0]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(got[i].finish_reason == "length" and REPLY.startswith(got[i].text) for i in range(3))
        assert httpx.get(base + "/health").json()["completed"] >= 5
        # a client that disconnects mid-stream stops its generation (at the next token)
        before = httpx.get(base + "/health").json()
        body = {"model": parrot_gguf.name, "prompt": "1 2 3", "max_tokens": 2000, "min_tokens": 2000,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: {") for _ in range(6))
        for _ in range(100):
            after = httpx.get(base + "/health").json()
            if after.get("cancelled", 0) > before.get("cancelled", 0):
                break
            time.sleep(0.1)
        assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
        assert after["completion_tokens"] - before["completion_tokens"] < 2000
    finally:
        proc.terminate()
        proc.wait(timeout=20)

    eval_set = tmp_path / "set.jsonl"
    eval_set.write_text("".join(json.dumps({"question": q, "class": "open qa", "std_answer": REPLY},
                                           ensure_ascii=False) + "\n" for q in ("你好", "你好吗")), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    assert cli.main(["-q", "eval", "generate", "--model", str(parrot_gguf), "--eval-set", str(eval_set),
                     "--output", str(answers), "--max-new-tokens", "16", "--threads", "1",
                     "--repetition-penalty", "1.0"]) == 0
    rows = [json.loads(x) for x in answers.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["_meta"]["model"] == parrot_gguf.name
    assert rows[1]["answer"] == REPLY and len(rows) == 3


@pytest.mark.integration
@pytest.mark.slow
def test_demo_model_gives_the_same_greedy_answers_on_llama_cpp(tmp_path):
    """Acceptance: a GGUF of the demo model, through the llama.cpp backend, gives the transformers
    model's greedy answer on >= 95 % of the held-out questions (a short demo-style training run)."""
    out = tmp_path / "demo"
    assert cli.main(["-q", "demo", "--output-dir", str(out), "--train-examples", "3000", "--eval-examples", "60",
                     "--max-steps", "250", "--hidden-size", "64", "--num-layers", "2", "--batch-size", "32",
                     "--vocab-size", "400", "--threads", "1", "--no-full-recipe"]) == 0
    held = out / "data" / "heldout.jsonl"
    hf = exact_match(out / "sft", held, "alpaca")
    # a model that learned the tasks, so agreement is not that of two constant (or empty) answers
    assert hf["accuracy"] >= 0.6 and len(set(hf["answers"])) >= 5, hf["accuracy"]
    tok = load_tokenizer(out / "sft")
    prompts = [build_prompt(r["instruction"], r["input"])
               for r in map(json.loads, held.read_text(encoding="utf-8").splitlines())]
    for gtype in ("f16", "q8_0"):
        f = out / f"sft-{gtype}.gguf"
        export_gguf(out / "sft", f, gtype)
        # the demo tokenizer's template pieces are user-defined SentencePiece symbols: llama.cpp must match them too
        eng = Engine.from_dir(f, threads=1)
        assert [eng.encode(p) for p in prompts] == [encode_prompt(tok, p) for p in prompts]
        del eng
        g = exact_match(f, held, "alpaca")
        same = sum(a == b for a, b in zip(g["answers"], hf["answers"])) / len(hf["answers"])
        assert same >= 0.95, (gtype, same, [(a, b) for a, b in zip(g["answers"], hf["answers"]) if a != b][:5])


@pytest.mark.integration
@pytest.mark.slow
def test_web_page_on_gguf(gg):
    """The Gradio page on the llama.cpp engine, through Gradio's own client: the answer, and beam
    search (a slider on the page) refused with its reason."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from toucan.config import WebConfig
    from toucan.serve.web import build_app

    app = build_app(gg, WebConfig(model="parrot-f16.gguf", do_sample=False, repetition_penalty=1.0))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        chat = [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]
        knobs = [0.5, 0.75, 40, 1, 1.0, 16, False]  # temperature, top_p, top_k, beams, rep, max tokens, do_sample
        out = client.predict(chat, *knobs, api_name="/respond")
        assert out[-1]["content"][0]["text"] == REPLY
        knobs[3] = 2
        with pytest.raises(AppError):
            client.predict(chat, *knobs, api_name="/respond")
    finally:
        app.close()
