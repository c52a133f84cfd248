"""toucan quantize: GPTQ and RTN through GPTQModel on a tiny LLaMA trained here, reloaded and run
on CPU; an odd MLP width (172) is zero-padded so every Linear is quantized (issue 16), widths no
layout fits are kept in full precision and recorded; bad input gets typed errors."""

import json
import random
import subprocess
import sys
import textwrap

import pytest

from toucan import cli
from toucan.config import QuantizeConfig
from toucan.data import encode_text
from toucan.manifest import read_manifest, verify_manifest
from toucan.prompts import build_prompt

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = 5  # of the trained model (issue 16's shape: 5 layers, hidden 64, MLP 172)
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def sentences(n, seed):
    """A small regular language (sums in Chinese) the tiny tokenizer covers, so training learns fast."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"计算 {a} 加 {b} 等于 {a + b} 。")
    return out


def records(n, seed):
    rng = random.Random(seed)
    return [{"instruction": f"计算 {a} 加 {b}", "output": f"{a + b}"}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tok):
    """A tiny LLaMA (5 layers, hidden 64, MLP width 172) trained briefly with a plain torch loop, saved."""
    import torch

    from toucan.modeling import save_model_dir, tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(len(tiny_tok), tokenizer=tiny_tok, num_hidden_layers=LAYERS)
    ids = [tiny_tok.bos_token_id] + encode_text(tiny_tok, " ".join(sentences(600, 0)))
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        starts = torch.randint(0, len(data) - 33, (8,))
        x = torch.stack([data[s:s + 32] for s in starts])
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 4.5, loss.item()  # it learned something: random is ln(1000) = 6.9
    root = tmp_path_factory.mktemp("quant")
    save_model_dir(root / "fp32", model.eval(), tiny_tok, command="test-train")
    (root / "calib.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records(64, 1)))
    (root / "heldout.txt").write_text("\n".join(sentences(60, 2)))
    return root


def quantize(root, name, **kw):
    cfg = QuantizeConfig(model=str(root / "fp32"), output=str(root / name), group_size=32,
                         calib_samples=32, max_len=64, **kw)
    from toucan.commands import quantize as quantize_command

    assert quantize_command.run(cfg) == 0
    return root / name


def test_plan_keeps_odd_widths_in_full_precision(tiny_model_dir):
    """Unpadded, MLP width 172 fits no layout (the plan on the raw shapes); mlp_padding says how
    far quantize pads it, per grid."""
    from toucan.quant.gptq import block_modules, layer_problem, mlp_padding, plan_layers

    assert mlp_padding(tiny_model_dir, 4, 32) == (172, 192)  # group 32, 8 per int32, 16 for the CPU kernel
    assert mlp_padding(tiny_model_dir, 4, 128) == (172, 256)
    assert mlp_padding(tiny_model_dir, 3, -1) == (172, 192)  # 3-bit packs 32 values in 3 words
    assert mlp_padding(tiny_model_dir, 8, -1) is None  # 172 = 43 int32 words of 4 bytes: fits as is
    todo, skipped = plan_layers(tiny_model_dir, bits=4, group_size=32)
    assert sorted(todo) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ATTN)
    assert sorted(skipped) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in MLP)
    assert "172" in skipped["model.layers.0.mlp.down_proj"]
    assert block_modules(todo, list(skipped)) == [sorted(ATTN)]
    # real LLaMA-7B widths all pass; 3-bit packing needs whole 32-value blocks
    assert layer_problem(4096, 11008, 4, 128) is None and layer_problem(11008, 4096, 4, 128) is None
    assert layer_problem(48, 64, 3, -1) and layer_problem(64, 64, 3, -1) is None
    assert "out_features 172" in layer_problem(64, 172, 3, 32)  # 3-bit zeros pack 32 per 3 words


def test_mlp_padding_is_exact(tiny_tok):
    """Zero rows in gate/up_proj and zero columns in down_proj leave the model's function unchanged."""
    import torch

    from toucan.modeling import tiny_llama
    from toucan.quant.gptq import _pad_mlp

    model = tiny_llama(len(tiny_tok), tokenizer=tiny_tok).eval()
    x = torch.randint(0, len(tiny_tok), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
        assert _pad_mlp(model, 192) == 2
        after = model(x).logits
    mlp = model.model.layers[1].mlp
    assert (mlp.gate_proj.weight.shape, mlp.up_proj.weight.shape, mlp.down_proj.weight.shape) == (
        (192, 64), (192, 64), (64, 192))
    assert not mlp.up_proj.weight[172:].any() and not mlp.down_proj.weight[:, 172:].any()
    assert torch.allclose(before, after, rtol=0, atol=1e-5), (before - after).abs().max()


def test_calibration_uses_the_chat_format(trained, tiny_tok):
    from toucan.quant.calib import calibration_samples

    seqs = calibration_samples(tiny_tok, trained / "calib.jsonl", 8, 64, "alpaca", seed=0)
    assert len(seqs) == 8
    prompts = {tuple(encode_text(tiny_tok, build_prompt(r["instruction"]))) for r in records(64, 1)}
    for s in seqs:
        assert s[0] == tiny_tok.bos_token_id and s[-1] == tiny_tok.eos_token_id and len(s) <= 64
        assert any(tuple(s[1:1 + len(p)]) == p for p in prompts)
    text = calibration_samples(tiny_tok, trained / "heldout.txt", 4, 32, "alpaca", seed=0)
    assert len(text) == 4 and all(t[0] == tiny_tok.bos_token_id and len(t) <= 32 for t in text)
    assert calibration_samples(tiny_tok, trained / "calib.jsonl", 8, 64, "alpaca", seed=0) == seqs


@pytest.mark.slow
def test_gptq_and_rtn_reload_generate_and_stay_close(trained, tiny_tok, caplog, tmp_path, monkeypatch):
    from safetensors import safe_open

    from toucan.modeling import load_model
    from toucan.ppl import evaluate, load_sequences

    import logging

    monkeypatch.chdir(tmp_path)  # GPTQModel's per-layer logs must not land in the user's ./logs
    caplog.set_level(logging.INFO, logger="toucan.quant.gptq")
    gptq = quantize(trained, "gptq", method="gptq", data=str(trained / "calib.jsonl"))
    assert not (tmp_path / "logs").exists()
    assert "zero-padded to 192" in caplog.text and "layer(s) in full precision" not in caplog.text
    rtn = quantize(trained, "rtn", method="rtn")

    qc = json.loads((gptq / "config.json").read_text())["quantization_config"]
    # the defaults chosen by bench/quant.py --sweep (issue 16): asymmetric, act-order with static groups
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["quant_method"]) == (4, 32, False, True, "gptq")
    assert qc["modules_in_block_to_quantize"] == [sorted(ATTN + MLP)]
    assert json.loads((gptq / "config.json").read_text())["intermediate_size"] == 192
    with safe_open(str(gptq / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        assert f"model.layers.0.self_attn.q_proj.{suffix}" in keys and f"model.layers.4.mlp.down_proj.{suffix}" in keys
    assert not [k for k in keys if k.startswith("model.layers.") and k.endswith("proj.weight")]
    man = read_manifest(gptq)
    assert verify_manifest(gptq) == []
    assert sorted(man["quantization"]["quantized_layers"]) == sorted(
        f"model.layers.{i}.{m}" for i in range(LAYERS) for m in ATTN + MLP)  # 100 % of them
    assert man["quantization"]["full_precision_layers"] == {}
    assert man["quantization"]["static_groups"] is True and man["quantization"]["sym"] is False
    assert man["quantization"]["mlp_padding"]["intermediate_size"] == 172
    assert man["quantization"]["mlp_padding"]["padded_to"] == 192
    assert man["quantization"]["calibration"]["samples"] == 32

    ref = load_model(trained / "fp32", device="cpu")
    seqs = load_sequences(tiny_tok, trained / "heldout.txt", ctx=64, stride=64, template="alpaca")
    base = evaluate(ref, seqs)
    for d in (gptq, rtn):
        model = load_model(d, device="cpu")
        assert type(model.model.layers[0].self_attn.q_proj).__name__ != "Linear"
        out = model.generate(**tiny_tok("计算 1 加 2 等于", return_tensors="pt"), max_new_tokens=6, do_sample=False)
        assert out.shape[1] > 6
        r = evaluate(model, seqs, reference=ref)
        # 4-bit g32 on every decoder Linear: close to the original, but not identical
        assert 0 < r["kl"] < 0.1, (d.name, r)
        assert abs(r["ppl"] - base["ppl"]) / base["ppl"] < 0.1, (d.name, r, base)


@pytest.mark.slow
@pytest.mark.integration
def test_plain_transformers_loads_it_without_toucan(trained, tiny_tok):
    """Acceptance: AutoModelForCausalLM.from_pretrained (GPTQModel + optimum installed) loads the
    quantized directory and generates on CPU, in a process that never imports toucan; every decoder
    Linear of the odd-width model (MLP 172, padded) runs on a quantized kernel; its size vs fp32."""
    d = trained / "gptq"
    if not d.exists():
        d = quantize(trained, "gptq", method="gptq", data=str(trained / "calib.jsonl"))
    script = textwrap.dedent(f"""
        import os, sys
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(d)!r})
        model = AutoModelForCausalLM.from_pretrained({str(d)!r}, device_map="cpu")
        x = tok("计算 1 加 2 等于", return_tensors="pt")
        out = model.generate(**x, max_new_tokens=6, do_sample=False)
        assert not any(m == "toucan" or m.startswith("toucan.") for m in sys.modules), "toucan imported"
        import torch
        plain = [n for n, m in model.model.layers.named_modules() if type(m) is torch.nn.Linear]
        print("PLAIN", len(plain), plain[:3])
        print("KERNEL", type(model.model.layers[0].self_attn.q_proj).__name__)
        print("MLP", type(model.model.layers[0].mlp.down_proj).__name__)
        print("TOKENS", out.shape[1] - x["input_ids"].shape[1])
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "KERNEL TorchAtenLinear" in p.stdout and "TOKENS 6" in p.stdout, p.stdout
    assert "PLAIN 0 []" in p.stdout and "MLP TorchAtenLinear" in p.stdout, p.stdout
    size = {x: sum(f.stat().st_size for f in (trained / x).glob("*.safetensors")) for x in ("fp32", "gptq")}
    print(f"fp32 {size['fp32'] / 2**20:.3f} MiB, gptq 4-bit g32 {size['gptq'] / 2**20:.3f} MiB "
          f"({size['gptq'] / size['fp32']:.3f}x)")
    # the fp32 embeddings and lm_head (vocab 1000 x 64 each) are ~1/3 of this tiny model
    assert size["gptq"] < 0.5 * size["fp32"], size


def test_bad_input_gets_typed_errors(trained, tmp_path, capsys):
    from toucan.commands import quantize as quantize_command
    from toucan.errors import ModelError, QuantError

    base = ["quantize", "--model", str(trained / "fp32"), "--output", str(tmp_path / "q")]
    calib = ["--calib-data", str(trained / "calib.jsonl")]
    assert cli.main(base + ["--bits", "5"] + calib) == 2
    assert "bits=5 is not supported" in capsys.readouterr().err
    assert cli.main(base + ["--calib-data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert cli.main(base) == 2  # gptq without calibration data
    assert "--data" in capsys.readouterr().err
    assert cli.main(base + ["--group-size", "100"] + calib) == 2
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((trained / "fp32" / "config.json").read_text())
    with pytest.raises(ModelError, match="no weights"):
        quantize_command.run(QuantizeConfig(model=str(empty), output=str(tmp_path / "q"), method="rtn"))
    with pytest.raises(QuantError, match="bits=5"):
        quantize_command.run(QuantizeConfig(model=str(trained / "fp32"), output=str(tmp_path / "q"), bits=5))
    assert not (tmp_path / "q").exists()


def test_library_prints_nothing_and_the_command_prints_its_result(trained, tmp_path, capsys):
    """quant.gptq.quantize_model (no config needed: the manifest records what the caller passes)
    returns what `toucan quantize` prints, and prints nothing itself; the command's line, pinned."""
    import re

    from toucan.commands import quantize as quantize_command
    from toucan.quant.gptq import quantize_model

    cfg = QuantizeConfig(model=str(trained / "fp32"), output=str(tmp_path / "lib"), method="rtn", group_size=32)
    r = quantize_model(cfg.model, cfg.output, quantize_command.settings(cfg), command="a caller", config={"by": "test"})
    assert capsys.readouterr().out == ""
    man = read_manifest(tmp_path / "lib")
    assert man["command"] == "a caller" and man["config"] == {"by": "test"} and verify_manifest(tmp_path / "lib") == []
    assert r.quantized == man["quantization"]["quantized_layers"] and len(r.quantized) == LAYERS * 7
    assert r.skipped == man["quantization"]["full_precision_layers"] == {} and r.padding == (172, 192)
    assert (r.method, r.bits, r.group_size, r.output) == ("rtn", 4, 32, cfg.output)

    out = tmp_path / "cmd"
    assert quantize_command.run(QuantizeConfig(model=cfg.model, output=str(out), method="rtn", group_size=32)) == 0
    line = capsys.readouterr().out
    assert re.fullmatch(re.escape(f"{out}: rtn 4-bit group 32, {LAYERS * 7} layers quantized, 0 kept in full "
                                  f"precision, MLP width 172 zero-padded to 192, weights {r.size_mib:.2f} MiB, ")
                        + r"\d+\.\d s\n", line), line
    assert read_manifest(out)["command"] == "quantize" and read_manifest(out)["config"]["output"] == str(out)


@pytest.mark.slow
@pytest.mark.integration
def test_gptq_resumes_after_kill(tmp_path, tiny_tok):
    """SIGKILL after the first layer is committed; a rerun with other settings is refused with a
    clear error, the same command resumes, and the result equals an uninterrupted run bit for bit."""
    import os
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    from toucan.modeling import save_model_dir, tiny_llama
    from toucan.quant.gptq import checkpoint_dir

    # every width a multiple of 32 and 16: all layers quantize, so the run can checkpoint
    model = tiny_llama(len(tiny_tok), seed=1, tokenizer=tiny_tok, num_hidden_layers=6, intermediate_size=128)
    save_model_dir(tmp_path / "fp32", model.eval(), tiny_tok, command="test")
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records(64, 1)))

    def args(out, *more):
        return [sys.executable, "-m", "toucan.cli", "quantize", "--model", str(tmp_path / "fp32"), "--output",
                str(out), "--group-size", "32", "--calib-data", str(tmp_path / "calib.jsonl"),
                "--calib-samples", "32", "--calib-max-len", "64", "--no-gptaq", *more]  # GPTAQ: no checkpoints

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(args(tmp_path / "ref"), capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert not checkpoint_dir(tmp_path / "ref").exists()  # removed once the output is complete

    out = tmp_path / "q"
    current = checkpoint_dir(out) / "CURRENT"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(args(out), stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 600
        while not current.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "finished (or died) before a layer was committed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()

    other = subprocess.run(args(out, "--damp-percent", "0.1"), capture_output=True, text=True, timeout=600, env=env)
    assert other.returncode == 2 and "other settings or inputs" in other.stderr, other.stderr[-3000:]

    again = subprocess.run(args(out), capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from the layers finished before" in again.stderr
    assert not checkpoint_dir(out).exists()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ
    assert verify_manifest(out) == []
