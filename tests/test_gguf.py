"""toucan export gguf (issue 13): GGUF files that llama.cpp (llama-cpp-python) loads and runs with
the HF model's logits; exact GPTQ -> Q4_0; tokenizer metadata whose ids equal SentencePiece's; the
chat template inside; one-line errors for bad input with nothing left behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from conftest import TINY_TOKENIZER, shared_path
from toucan import cli
from toucan.errors import GgufError
from toucan.gguf_export import check_gguf, export_gguf, manifest_path, qk_rows
from toucan.modeling import load_tokenizer, save_model_dir, tiny_llama
from toucan.prompts import chat_prompt, chat_template
from toucan.fsutil import sha256_file

# Mixed Chinese / English / emoji / code / whitespace: where tokenizers have disagreed.
MIXED = ["你好，请介绍一下你自己。", "中文和English混合，数字12345。\n\n第二段\t制表符", "龘靐齉爩 😀 ㊗️ 👍🏽",
         "def f(x):\n    return x ** 2  # 平方\n", "def g(y):\n\treturn y*2 # 代码\n", "“引号”……——《书名》", "  两个前导空格", " 前导空格",
         "print('hello, 世界!')  {\"k\": [1, 2]}", "请把下面的句子翻译成英文：我们一起学习机器学习吧！", "a"]


def llama(path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, **kw)


def llama_logits(path, ids) -> np.ndarray:
    llm = llama(path, logits_all=True)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def hf_logits(model_dir, ids) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().numpy()


def kl(p_logits, q_logits) -> float:
    """Mean per-token KL(p || q) from logits."""
    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def llama_ids(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    for t in ("f16", "q8_0", "q4_0"):
        assert cli.main(["export", "gguf", "--model", str(tiny_model_dir), "--output", str(out / f"tiny-{t}.gguf"),
                         "--type", t]) == 0
    return out


def test_qk_permutation_table():
    # head_dim 4: GGUF rows (0, 1, 2, 3) of each head are HF rows (0, 2, 1, 3)
    assert qk_rows(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_f16_q8_q4_logits_match_hf(exported, tiny_model_dir, tiny_tok):
    ids = [tiny_tok.bos_token_id] + tiny_tok(" ".join(MIXED), add_special_tokens=False).input_ids[:120]
    ref = hf_logits(tiny_model_dir, ids)
    got = {t: llama_logits(exported / f"tiny-{t}.gguf", ids) for t in ("f16", "q8_0", "q4_0")}
    assert kl(ref, got["f16"]) < 1e-6
    assert np.abs(ref - got["f16"]).max() < 5e-3
    assert (ref.argmax(-1) == got["f16"].argmax(-1)).mean() > 0.97
    assert 10 * kl(ref, got["q8_0"]) < kl(ref, got["q4_0"])


def test_manifest_and_tensor_types(exported, tiny_model_dir):
    import gguf

    f = exported / "tiny-q4_0.gguf"
    m = json.loads(manifest_path(f).read_text())
    assert m["sha256"] == sha256_file(f) and m["size"] == f.stat().st_size and m["type"] == "q4_0"
    assert m["source"] == str(tiny_model_dir) and m["tokenizer"]["pieces"] == m["tokenizer"]["rows"] == 1000
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(f).tensors}
    assert types == {t["name"]: t["type"] for t in m["tensors"]}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "F16"  # 172 inputs: not whole 32-blocks, as llama.cpp leaves it
    assert types["output.weight"] == "Q8_0"
    info = check_gguf(f)
    assert info["architecture"] == "llama" and info["n_vocab"] == 1000 and info["chat_template"] == chat_template()
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_q4_k_m_through_llama_cpp_quantizer(tiny_model_dir, tmp_path, tiny_tok):
    f = tmp_path / "tiny-q4_k_m.gguf"
    export_gguf(tiny_model_dir, f, "q4_k_m")
    m = json.loads(manifest_path(f).read_text())
    kinds = {t["type"] for t in m["tensors"]}
    assert kinds - {"F32", "F16"} and kinds <= {"F32", "F16", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_1"}
    assert m["sha256"] == sha256_file(f)
    ids = [tiny_tok.bos_token_id] + tiny_tok(MIXED[1], add_special_tokens=False).input_ids
    assert kl(hf_logits(tiny_model_dir, ids), llama_logits(f, ids)) < 0.05


def test_vocabulary_metadata(exported):
    """Pieces, scores and types (normal, unknown, control, byte) as SentencePiece has them."""
    import gguf

    from toucan.tokenizer import read_model_proto

    proto = read_model_proto(TINY_TOKENIZER / "tokenizer.model")
    f = gguf.GGUFReader(exported / "tiny-q8_0.gguf").fields
    assert list(f["tokenizer.ggml.token_type"].contents()) == [p.type for p in proto.pieces]
    assert list(f["tokenizer.ggml.tokens"].contents()) == [p.piece for p in proto.pieces]
    assert np.allclose(f["tokenizer.ggml.scores"].contents(), [p.score for p in proto.pieces])
    assert {p.type for p in proto.pieces} >= {1, 2, 3, 6}  # the test means something
    ts = proto.trainer_spec
    assert [f[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "unknown")] == \
        [ts.bos_id, ts.eos_id, ts.unk_id]
    assert f["tokenizer.ggml.add_bos_token"].contents() is True and f["tokenizer.ggml.model"].contents() == "llama"


def test_tiny_tokenizer_ids_and_chat_template(exported, tiny_tok):
    llm = llama(exported / "tiny-f16.gguf", vocab_only=True)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(TINY_TOKENIZER / "tokenizer.model"))
        checked = 0
        for text in MIXED + [chat_prompt([{"role": "user", "content": "计算 1 加 2"}])]:
            want = sp.encode(text)
            assert tiny_tok(text, add_special_tokens=False).input_ids == want, text
            # remove_extra_whitespaces is on in this model: SentencePiece strips leading/trailing
            # spaces and collapses runs, llama.cpp keeps them (the known difference, where
            # llama.cpp is the reference for the GGUF); elsewhere the ids must be equal.
            if not ("  " in text or text.startswith(" ") or text.endswith(" ")):
                assert llama_ids(llm, text) == want, text
                checked += 1
        assert checked >= 8
        assert llm.tokenize(b"hi", add_bos=True)[0] == tiny_tok.bos_token_id
        assert llm.metadata["tokenizer.chat_template"] == chat_template()
    finally:
        llm.close()
    # llama-cpp-python's own chat formatter (from the GGUF's template) gives toucan's prompt
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "第二个问题"}]
    fmt = Jinja2ChatFormatter(template=chat_template(), bos_token="<s>", eos_token="</s>")
    assert fmt(messages=msgs).prompt == chat_prompt(msgs)


def test_user_defined_pieces_round_trip_through_the_gguf(tmp_path):
    """A tokenizer like the demo's (the prompt template's fixed strings as user-defined pieces,
    dummy prefix on): llama.cpp's own tokenizer adds a space after each user-defined token, so the
    GGUF carries the SentencePiece model and toucan's llama.cpp backend tokenizes with it."""
    import io

    from toucan.demo import _special_pieces
    from toucan.gguf_export import gguf_tokenizer
    from toucan.prompts import build_prompt

    lines = ["机器学习是人工智能的一个分支。深度学习模型需要大量数据。", "abcdefghijklmnopqrstuvwxyz ABC 0123456789 Hello hello"] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=600, model_type="bpe", character_coverage=1.0,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=_special_pieces("alpaca"), hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    save_model_dir(tmp_path / "m", tiny_llama(len(tok), tokenizer=tok, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=1, intermediate_size=64), tok, command="test")
    f = tmp_path / "m.gguf"
    assert export_gguf(tmp_path / "m", f, "f16")["tokenizer"]["user_defined"] == 6
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = [build_prompt("机器学习是什么？"), build_prompt("深度学习", input="数据 hello"),
             chat_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}])] + MIXED
    g = gguf_tokenizer(f)
    assert [g(t, add_special_tokens=False).input_ids for t in texts] == [sp.encode(t) for t in texts]
    assert gguf_tokenizer(foreign_gguf(tmp_path)) is None


def foreign_gguf(tmp_path):
    """A GGUF without toucan's metadata (written here by the gguf package alone)."""
    import gguf

    w = gguf.GGUFWriter(tmp_path / "other.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "other.gguf"


@pytest.mark.slow
def test_chinese_llama_vocabulary_49953_over_49954_rows(tmp_path):
    """The extended Chinese-LLaMA tokenizer (49,953 pieces) on a 49,954-row embedding (hidden 32):
    llama.cpp, toucan and SentencePiece give the same ids on all 1,000 alpaca_zh_demo records
    and the mixed texts."""
    from toucan.tokenizer import extend

    tok_dir = tmp_path / "tok"
    extend(shared_path("tokenizers/llama_tokenizer.model"), shared_path("tokenizers/chinese_sp.model"), tok_dir)
    tok = load_tokenizer(tok_dir)
    assert len(tok) == 49953
    model = tiny_llama(49954, tokenizer=tok, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    save_model_dir(tmp_path / "m", model, tok, command="test")
    f = tmp_path / "cl.gguf"
    assert export_gguf(tmp_path / "m", f, "f16")["tokenizer"]["padding_rows"] == 1
    records = json.loads(shared_path("data/alpaca/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    assert len(records) == 1000
    texts = [r["instruction"] + ("\n" + r["input"] if r["input"] else "") + "\n" + r["output"] for r in records]
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    llm = llama(f, vocab_only=True)
    try:
        assert llm.n_vocab() == 49954
        same = [llama_ids(llm, t) == sp.encode(t) == tok(t, add_special_tokens=False).input_ids for t in texts + MIXED]
        assert sum(same) == len(same), [t[:40] for t, ok in zip(texts + MIXED, same) if not ok][:5]
        assert llm.detokenize(llama_ids(llm, MIXED[2])).decode() == " " + MIXED[2]  # the dummy prefix
    finally:
        llm.close()


@pytest.mark.slow
def test_gptq_sym_g32_exports_to_q4_0_bit_exactly(tiny_model_dir, tmp_path, tiny_tok, caplog):
    """Every GPTQ layer becomes Q4_0 blocks whose dequantization equals the GPTQ model's
    dequantized weight bit for bit (fp32), q/k rows permuted as llama.cpp expects."""
    import gguf
    import torch

    from toucan.commands import quantize as quantize_command
    from toucan.config import QuantizeConfig
    from toucan.gguf_export import gptq_dequantize, read_source

    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"instruction": f"计算 {a} 加 {a + 1}", "output": str(2 * a + 1)},
                                          ensure_ascii=False) for a in range(32)))
    q = tmp_path / "gptq"
    assert quantize_command.run(QuantizeConfig(model=str(tiny_model_dir), output=str(q), bits=4, group_size=32, sym=True,
                                               data=str(calib), calib_samples=32, max_len=64)) == 0  # act-order: default
    assert json.loads((q / "tokenizer_config.json").read_text())["chat_template"] == chat_template()
    f = tmp_path / "gptq-q4_0.gguf"
    m = export_gguf(q, f, "q4_0")
    paths = {t["name"]: t["path"] for t in m["tensors"]}
    gptq_layers = [n for n in paths if paths[n].startswith("gptq")]
    assert gptq_layers and all(paths[n].startswith("gptq-exact") for n in gptq_layers)
    src = read_source(q)
    reader = {t.name: t for t in gguf.GGUFReader(f).tensors}
    # GPTQModel's own dequantization (the kernel's weights) as the reference
    from toucan.modeling import load_model

    model = load_model(q, device="cpu")
    kernels = {n: mod for n, mod in model.named_modules() if hasattr(mod, "qweight")}
    for gname in gptq_layers:
        base = src.modules[gname.rsplit(".", 1)[0]][0]
        t = reader[gname]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        want = gptq_dequantize(src, base)
        kind = src.modules[gname.rsplit(".", 1)[0]][3]
        if kind:
            want = want[qk_rows(src.n_head if kind == "q" else src.n_head_kv, src.head_dim)]
        assert torch.equal(got, want), gname
        # the kernel's own weights: its forward on the identity (computed in bf16 on CPU, so equal to
        # 1%; a wrong zero point would be off by a whole scale, a wrong permutation by far more)
        mod = kernels[base]
        with torch.no_grad():
            eye = torch.eye(mod.in_features, dtype=next(model.parameters()).dtype)
            ref = mod(eye).t().to(torch.float32)
        ref = ref[qk_rows(src.n_head if kind == "q" else src.n_head_kv, src.head_dim)] if kind else ref
        assert bool(((got - ref).abs() <= 0.01 * got.abs() + 1e-5).all()), gname
    # and llama.cpp runs it close to the GPTQ model itself
    ids = [tiny_tok.bos_token_id] + tiny_tok(MIXED[0] + MIXED[3], add_special_tokens=False).input_ids
    with torch.no_grad():
        ref_logits = model(torch.tensor([ids])).logits[0].double().numpy()
    assert kl(ref_logits, llama_logits(f, ids)) < 2e-3


def test_chat_template_equals_build_prompt_property(tiny_tok):
    """transformers' apply_chat_template (with toucan's template, as every tokenizer_config.json
    toucan writes carries it) and llama-cpp-python's formatter (the GGUF's template) ==
    prompts.chat_prompt, byte for byte, for random message lists."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    # llama-cpp-python's chat formatter, built from the template the GGUF carries, must agree too
    fmt = Jinja2ChatFormatter(template=chat_template(), bos_token="<s>", eos_token="</s>")
    text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)

    @settings(max_examples=150, deadline=None)
    @given(system=st.one_of(st.none(), text), turns=st.lists(st.tuples(text, text), max_size=4), last=text)
    def check(system, turns, last):
        msgs = ([{"role": "system", "content": system}] if system is not None else [])
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": last})
        want = chat_prompt(msgs)
        assert tiny_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
        without = tiny_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
        assert without + "### Response:" == want
        assert fmt(messages=msgs).prompt == want

    check()
    with pytest.raises(Exception, match="alternating"):
        tiny_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_model_dirs_carry_the_chat_template(tiny_model_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == chat_template() and cfg["tokenizer_class"] == "SentencePieceBackend"
    auto = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    msgs = [{"role": "user", "content": "你好"}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat_prompt(msgs)


def _fails(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_input_one_line_errors_nothing_left(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o" / "x.gguf"
    out.parent.mkdir()
    base = ["export", "gguf", "--output", str(out)]

    def clean():
        assert list(out.parent.iterdir()) == [], list(out.parent.iterdir())

    _fails(capsys, base + ["--model", str(tiny_model_dir), "--type", "q3_k"], "--type 'q3_k'", "q4_k_m")
    clean()
    # not LLaMA
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, base + ["--model", str(other)], "config.json", "GPT2LMHeadModel", "LLaMA")
    clean()
    # no tokenizer
    notok = tmp_path / "notok"
    shutil.copytree(tiny_model_dir, notok)
    for p in notok.glob("tokenizer*"):
        p.unlink()
    _fails(capsys, base + ["--model", str(notok)], "no tokenizer.model")
    clean()
    # vocabulary larger than the embedding: 1,000 pieces over 900 rows
    small = tmp_path / "small"
    tok = load_tokenizer(TINY_TOKENIZER)
    save_model_dir(small, tiny_llama(900, tokenizer=tok), tok, command="test")
    capsys.readouterr()  # the save's progress bar
    _fails(capsys, base + ["--model", str(small)], "1000 pieces", "900 rows")
    clean()
    # an existing file is not replaced without --overwrite, nor a file toucan did not write
    out.write_bytes(b"keep")
    _fails(capsys, base + ["--model", str(tiny_model_dir)], "exists", "--overwrite")
    _fails(capsys, ["export", "gguf", "--model", str(tiny_model_dir), "--output", str(tiny_model_dir), "--overwrite"], ".gguf")
    _fails(capsys, base + ["--model", str(tiny_model_dir), "--overwrite"], "not written by toucan")
    assert out.read_bytes() == b"keep"


def test_check_gguf_truncated_and_corrupted(exported, tmp_path):
    good = exported / "tiny-q8_0.gguf"
    data = good.read_bytes()
    cases = {"truncated-data": data[:len(data) - 1000], "truncated-header": data[:3000], "empty": b"",
             "not-gguf": b"PK\x03\x04" + data[4:], "bad-count": data[:8] + b"\xff" * 8 + data[16:]}
    for name, content in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(content)
        with pytest.raises(GgufError) as e:
            check_gguf(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(GgufError, match="no such"):
        check_gguf(tmp_path / "missing.gguf")
    assert check_gguf(good)["n_tensors"] == 21


@pytest.mark.slow
def test_lora_adapter_is_merged_first(tiny_model_dir, tmp_path, tiny_tok):
    """--model ADAPTER_DIR: the GGUF holds base + adapter merged (its logits in llama.cpp equal the
    merged HF model's), and the manifest says so."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "down_proj"],
                                                 init_lora_weights=False))  # random B: the merge changes weights
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    merged = peft_model.merge_and_unload().eval()
    ids = [tiny_tok.bos_token_id] + tiny_tok(MIXED[0] + MIXED[1], add_special_tokens=False).input_ids
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].double().numpy()
    f = tmp_path / "a.gguf"
    assert cli.main(["export", "gguf", "--model", str(adapter), "--output", str(f)]) == 0
    got = llama_logits(f, ids)
    assert kl(ref, got) < 1e-6
    assert kl(hf_logits(tiny_model_dir, ids), got) > 100 * kl(ref, got)  # the adapter did change it
    m = json.loads(manifest_path(f).read_text())
    assert m["merged_lora_adapter"] is True and m["source"] == str(adapter)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the merged copy is gone


def test_killed_run_leftover_is_removed_and_output_replaced_only_with_overwrite(tiny_model_dir, tmp_path):
    """A temporary a killed export left (dead writer pid, this host) is removed by the next export;
    the finished file replaces a previous toucan export only with overwrite."""
    from toucan import fsutil

    out = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.999999-{fsutil._host_tag()}-abcd1234.tmp"
    stale.write_bytes(b"half a file")
    export_gguf(tiny_model_dir, out, "q8_0")
    assert not stale.exists() and check_gguf(out)["n_vocab"] == 1000
    first = sha256_file(out)
    export_gguf(tiny_model_dir, out, "q4_0", overwrite=True)
    assert sha256_file(out) != first and json.loads(manifest_path(out).read_text())["type"] == "q4_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.toucan.json"]


@pytest.mark.slow
def test_other_gptq_layouts_are_requantized_with_a_warning(tiny_model_dir, tmp_path, caplog, tiny_tok):
    """Asymmetric 4-bit (RTN, group 32) does not map onto Q4_0: dequantized, re-quantized, a warning
    per layer, and the manifest says so for each tensor; llama.cpp still runs it close to the model."""
    import logging

    from toucan.commands import quantize as quantize_command
    from toucan.config import QuantizeConfig

    q = tmp_path / "rtn-asym"
    assert quantize_command.run(QuantizeConfig(model=str(tiny_model_dir), output=str(q), method="rtn", bits=4,
                                               group_size=32, sym=False, asym=True)) == 0
    f = tmp_path / "asym-q4_0.gguf"
    with caplog.at_level(logging.WARNING, logger="toucan.gguf_export"):
        m = export_gguf(q, f, "q4_0")
    gptq = [t for t in m["tensors"] if t["source"].endswith("g_idx}")]
    assert gptq and all(t["path"].startswith("gptq-requantized (asymmetric") for t in gptq)
    assert sum("re-quantized" in r.getMessage() for r in caplog.records) == len(gptq)
    ids = [tiny_tok.bos_token_id] + tiny_tok(MIXED[0], add_special_tokens=False).input_ids
    assert kl(hf_logits(tiny_model_dir, ids), llama_logits(f, ids)) < 0.05
