"""No command runs code from a model folder unless the user passes --trust-remote-code (issue 11,
item 1), and broken model folders give one line, not a traceback (item 8).

The planted folder is a real tiny LLaMA whose config.json has an auto_map pointing at
modeling_evil.py in the same folder; importing that module writes a marker file. Every
model-loading command runs on it in-process through toucan.cli.main: without the flag the marker
never appears, nothing lands in the Hugging Face modules cache, and the command exits non-zero with
one error line; with the flag the code is allowed to run."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import uuid
from pathlib import Path

import pytest

from toucan import cli

EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    pass


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def hf_module_dir(folder: Path) -> Path:
    """Where transformers copies a folder's dynamic modules before importing them."""
    from transformers.utils import HF_MODULES_CACHE

    return Path(HF_MODULES_CACHE) / "transformers_modules" / folder.name


@pytest.fixture
def planted(tmp_path, tiny_model_dir):
    """(model folder with an auto_map module, marker path). A fresh name per test: Python caches an
    imported module by name, and a reused name would hide a second import."""
    d = tmp_path / f"evil_{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny_model_dir, d)
    marker = tmp_path / "MARKER"
    (d / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    yield d, marker
    shutil.rmtree(hf_module_dir(d), ignore_errors=True)  # the trusted runs' copy, not the user's cache


@pytest.fixture
def inputs(tmp_path):
    """Small data files the commands need besides the model."""
    text = tmp_path / "text.txt"
    text.write_text("你好，世界。今天天气很好。" * 20, encoding="utf-8")
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}"},
                                      ensure_ascii=False) + "\n" for i in range(8)), encoding="utf-8")
    evalset = tmp_path / "evalset.jsonl"
    evalset.write_text(json.dumps({"question": "一加一等于几？", "class": "math", "std_answer": "二"},
                                  ensure_ascii=False) + "\n", encoding="utf-8")
    adapter = tmp_path / "adapter"  # enough to get past merge-lora's first check; the base is checked first
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return {"text": text, "sft": sft, "evalset": evalset, "adapter": adapter, "out": tmp_path / "out"}


def run(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("toucan ") and ": error: " in line]


# Every command that loads a model or a tokenizer from a folder (argv for folder M).
LOADERS = {
    "chat": lambda m, i: ["chat", "--model", m, "--plain"],
    "web": lambda m, i: ["web", "--model", m, "--port", "1"],
    "serve": lambda m, i: ["serve", "--model", m, "--port", "1"],
    "eval generate": lambda m, i: ["eval", "generate", "--model", m, "--data", str(i["evalset"]),
                                   "--output", str(i["out"])],
    "ppl": lambda m, i: ["ppl", "--model", m, "--data", str(i["text"]), "--max-len", "16", "--stride", "16"],
    "quantize": lambda m, i: ["quantize", "--model", m, "--output", str(i["out"]), "--method", "rtn",
                              "--group-size", "32"],
    "train": lambda m, i: ["train", "--model", m, "--data", str(i["sft"]), "--output", str(i["out"]),
                           "--max-steps", "1", "--max-len", "256", "--per-device-train-batch-size", "2"],
    "merge-lora": lambda m, i: ["merge-lora", "--base", m, "--adapter", str(i["adapter"]), "--output", str(i["out"])],
    "data": lambda m, i: ["data", str(i["sft"]), "--tokenizer", m, "--stats"],
    "prune": lambda m, i: ["prune", "--model", m, "--output", str(i["out"]), "--data", str(i["text"])],
}


@pytest.mark.parametrize("command", sorted(LOADERS))
def test_model_folder_code_is_refused_without_the_flag(command, planted, inputs, capsys, monkeypatch):
    if command.split()[0] not in {c.split()[0] for c in cli.COMMANDS}:
        pytest.fail(f"{command} is no longer a toucan command: update LOADERS")
    model, marker = planted
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode())))
    rc, err = run(capsys, LOADERS[command](str(model), inputs))
    assert not marker.exists(), "the model folder's code ran"
    assert not hf_module_dir(model).exists(), "the model folder's code was copied into the HF modules cache"
    if command == "data":  # only the tokenizer: toucan's SentencePiece class, no code from the folder
        assert rc == 0, err
        return
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1 and "--trust-remote-code" in lines[0] and "modeling_evil.py" in lines[0], err
    if command == "eval generate":  # the answers file starts with its settings line, before the model loads
        assert inputs["out"].read_text().count("\n") == 1
    else:
        assert not inputs["out"].exists()


def test_tokenizer_auto_map_is_never_run(planted, inputs, capsys):
    """A tokenizer_config.json auto_map: with a SentencePiece tokenizer.model beside it toucan builds
    its own tokenizer class and runs without the folder's code; without one it is refused."""
    model, marker = planted
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("auto_map")
    (model / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    if (model / "tokenizer.model").is_file():
        rc, err = run(capsys, LOADERS["data"](str(model), inputs))
        assert rc == 0, err
        (model / "tokenizer.model").unlink()
    rc, err = run(capsys, LOADERS["data"](str(model), inputs))
    assert rc != 0 and "tokenizer_config.json: auto_map" in error_lines(err)[0]
    assert not marker.exists() and not hf_module_dir(model).exists()


def test_issue_reproducer_quantize_rtn_in_a_fresh_process(planted, tmp_path):
    """The issue's reproducer end to end: `toucan quantize --method rtn` on the planted folder, in
    its own process with its own HF modules cache: exit 2, stderr is exactly one line."""
    import subprocess

    model, marker = planted
    cache = tmp_path / "hf_modules"
    env = dict(os.environ, HF_MODULES_CACHE=str(cache))
    r = subprocess.run([sys.executable, "-m", "toucan.cli", "quantize", "--model", str(model), "--output",
                        str(tmp_path / "q"), "--method", "rtn", "--group-size", "32"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--trust-remote-code" in r.stderr and not marker.exists() and not (tmp_path / "q").exists()
    assert not list(cache.rglob("modeling_evil.py"))  # not copied into the modules cache either


@pytest.mark.slow
def test_the_flag_allows_it(planted, inputs, capsys, monkeypatch):
    """With --trust-remote-code the folder's code runs: through the engine every serving command
    uses (chat, web, serve, eval generate), and in ppl, quantize (GPTQModel's loader) and train."""
    from toucan.config import ChatConfig, ServeConfig
    from toucan.engine import Engine

    model, marker = planted
    for cls in (ChatConfig, ServeConfig):  # chat / web / serve / eval generate load through this
        marker.unlink(missing_ok=True)
        cfg = cls(model=str(model), device="cpu", trust_remote_code=True)
        Engine.from_dir(cfg.model, **cfg.engine_options())
        assert marker.exists()
        sys.modules.pop(next((k for k in sys.modules if k.endswith(".modeling_evil")), ""), None)
    for command in ("ppl", "quantize", "train"):
        marker.unlink(missing_ok=True)
        shutil.rmtree(hf_module_dir(model), ignore_errors=True)
        for k in [k for k in sys.modules if k.endswith(".modeling_evil")]:
            del sys.modules[k]  # so a second import really executes the file again
        argv = LOADERS[command](str(model), {**inputs, "out": inputs["out"].with_name(f"out-{command}")})
        rc, err = run(capsys, argv + ["--trust-remote-code"])
        assert rc == 0, err
        assert marker.exists(), f"{command}: the flag did not reach the loader"
    # merge-lora: a real adapter trained on this base (peft, a few rows), merged with the flag
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from toucan.modeling import load_tokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, trust_remote_code=True)
    adapter = inputs["out"].with_name("adapter-real")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(str(adapter))
    load_tokenizer(model).save_pretrained(str(adapter))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    for k in [k for k in sys.modules if k.endswith(".modeling_evil")]:
        del sys.modules[k]
    shutil.rmtree(hf_module_dir(model), ignore_errors=True)
    marker.unlink(missing_ok=True)
    rc, err = run(capsys, ["merge-lora", "--base", str(model), "--model", str(adapter),
                           "--output", str(inputs["out"].with_name("merged"))])
    assert rc != 0 and "--trust-remote-code" in error_lines(err)[0] and not marker.exists()
    rc, err = run(capsys, ["merge-lora", "--base", str(model), "--model", str(adapter),
                           "--output", str(inputs["out"].with_name("merged")), "--trust-remote-code"])
    assert rc == 0, err
    assert marker.exists()


def test_delta_commands_copy_but_never_run_model_code(planted, tiny_model_dir, tmp_path, capsys):
    model, marker = planted
    delta, restored = tmp_path / "delta", tmp_path / "restored"
    assert run(capsys, ["make-delta", "--base", str(tiny_model_dir), "--model", str(model), "--output", str(delta)])[0] == 0
    assert run(capsys, ["apply-delta", "--base", str(tiny_model_dir), "--delta", str(delta), "--output", str(restored)])[0] == 0
    assert run(capsys, ["check-delta", "--base", str(tiny_model_dir), "--delta", str(delta), "--model", str(restored)])[0] == 0
    assert (restored / "modeling_evil.py").is_file()  # passed on as a file, as a model folder ships it
    if "export gguf" in cli.COMMANDS:  # reads config.json and the tensors itself
        rc, err = run(capsys, ["export", "gguf", "--model", str(model), "--output", str(tmp_path / "m.gguf")])
        assert rc == 0, err
    assert not marker.exists() and not hf_module_dir(model).exists()
    rc, err = run(capsys, ["chat", "--model", str(restored), "--plain"])  # and loading the result is refused
    assert rc != 0 and "--trust-remote-code" in error_lines(err)[0]
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# item 8: broken model folders -> one line naming the problem

def _copy(tiny_model_dir, tmp_path, name):
    d = tmp_path / name
    shutil.copytree(tiny_model_dir, d)
    return d


def _truncated_config(d):
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[: len(text) // 2])


def _truncated_weights(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > PICKLE_MARKER",))


def _malicious_pickle(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Evil()}))


def _remote_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evilnet", auto_map={"AutoModelForCausalLM": "modeling_evilnet.EvilNet"})
    (d / "config.json").write_text(json.dumps(cfg))


def _unknown_model_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "evilnet"
    (d / "config.json").write_text(json.dumps(cfg))


BROKEN = {  # name -> (how to break the folder, commands, text the one error line must contain)
    "truncated config.json": (_truncated_config, ["chat", "quantize", "ppl"], "invalid JSON"),
    "truncated model.safetensors": (_truncated_weights, ["chat", "ppl", "quantize"], "cannot load the model (SafetensorError"),
    "malicious pickle": (_malicious_pickle, ["chat", "ppl", "quantize"], "refused to load pytorch_model"),
    "model type that needs remote code": (_remote_model_type, ["chat", "quantize"], "--trust-remote-code"),
    "model type transformers does not know": (_unknown_model_type, ["chat", "quantize"], "model_type 'evilnet'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_model_folder_is_one_line(case, tiny_model_dir, inputs, tmp_path, capsys, monkeypatch):
    breaker, commands, expected = BROKEN[case]
    d = _copy(tiny_model_dir, tmp_path, "broken")
    breaker(d)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode())))
    for command in commands:
        rc, err = run(capsys, LOADERS[command](str(d), inputs))
        lines = error_lines(err)
        assert rc != 0 and len(lines) == 1 and expected in lines[0], (command, err)
        assert str(d) in lines[0]
    assert not (tmp_path / "PICKLE_MARKER").exists()


def test_refused_pickle_in_delta_commands_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d = _copy(tiny_model_dir, tmp_path, "pickled")
    _malicious_pickle(d)
    monkeypatch.chdir(tmp_path)
    rc, err = run(capsys, ["make-delta", "--base", str(d), "--model", str(tiny_model_dir), "--output", str(tmp_path / "delta")])
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1 and "pytorch_model.bin: refused" in lines[0], err
    assert not (tmp_path / "PICKLE_MARKER").exists()


def test_ppl_on_an_empty_folder_names_the_folder(tmp_path, inputs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run(capsys, LOADERS["ppl"](str(empty), inputs))
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1 and "no config.json" in lines[0] and "sentencepiece" not in err.lower()
