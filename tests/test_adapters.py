"""A LoRA adapter directory wherever a model is expected (chat, ppl, quantize, ...): loaded on the
base it records (or --base) through peft, the same answers as the merged model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from test_engine import REPLY, save_parrot
from test_train import tcfg
from toucan import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GREEDY = ["--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "24"]
NEW_REPLY = "好的。"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # three chat processes share 2 cores


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tok):
    """A trained tiny model (answers 你好 with REPLY), and a LoRA adapter trained on it for a few
    steps to answer NEW_REPLY instead: base, adapter, and the adapter merged by merge-lora."""
    import torch

    from toucan.commands.train import train

    d = tmp_path_factory.mktemp("adapters")
    base = save_parrot(tiny_tok, d / "base")
    data = d / "new.json"
    data.write_text(json.dumps([{"instruction": "你好", "input": "", "output": NEW_REPLY}] * 8, ensure_ascii=False),
                    encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tcfg(base, data, d / "adapter", finetuning_type="lora", lora_rank=8, lora_alpha=16,
                   lora_target=["all-linear"], lora_dropout=0.0, max_steps=40, learning_rate=1e-2, max_len=64))
    finally:
        torch.set_num_threads(threads)
    # the one vocabulary: --model ADAPTER, the base recorded in the adapter, --output
    assert cli.main(["-q", "merge-lora", "--model", str(d / "adapter"), "--output", str(d / "merged")]) == 0
    return d


def chat_plain(*model_args: list[str], question: str = "你好") -> list[subprocess.CompletedProcess]:
    """`toucan chat ... --plain` as a user runs it (one process per model, all at once)."""
    procs = [subprocess.Popen([sys.executable, "-m", "toucan.cli", "-q", "chat", *args, "--plain", *GREEDY],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for args in model_args]
    outputs = [p.communicate(question, timeout=300) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outputs)]


def answers(*model_args: list[str]) -> list[str]:
    done = chat_plain(*model_args)
    for r in done:
        assert r.returncode == 0, r.stderr[-2000:]
    return [r.stdout.strip() for r in done]


def test_chat_on_adapter_answers_like_the_merged_model(trained):
    base_answer, adapter_answer, merged_answer = answers(
        ["--model", str(trained / "base")], ["--model", str(trained / "adapter")], ["--model", str(trained / "merged")])
    assert base_answer == REPLY
    # 40 LoRA steps move the answer towards NEW_REPLY (it reads 好吃。): the adapter matters
    assert adapter_answer != base_answer and adapter_answer.endswith("。"), adapter_answer
    assert adapter_answer == merged_answer


def test_adapter_weights_equal_merge_lora_output(trained):
    import torch
    from safetensors.torch import load_file

    from toucan.modeling import load_model

    model = load_model(trained / "adapter", device="cpu")
    merged = load_file(str(trained / "merged" / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(merged)
    assert all(torch.equal(state[k], merged[k]) for k in merged)
    assert type(load_model(trained / "adapter", device="cpu", merge_adapter=False)).__name__ == "PeftModelForCausalLM"


def test_moved_base_is_one_line_error_naming_both_paths_and_base_fixes_it(trained, tmp_path):
    moved = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", moved)
    cfg_file = moved / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_file.write_text(json.dumps(cfg))
    missing, given, merged = chat_plain(["--model", str(moved)], ["--model", str(moved), "--base", str(trained / "base")],
                                        ["--model", str(trained / "merged")])
    err = missing.stderr.strip()
    assert missing.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(moved) in err and str(tmp_path / "gone") in err and "--base" in err, err
    assert given.returncode == merged.returncode == 0, given.stderr[-2000:]
    assert given.stdout == merged.stdout


def test_commands_that_need_a_full_model_say_merge_first(trained, tmp_path, capfd):
    assert cli.main(["-q", "make-delta", "--base", str(trained / "base"), "--model", str(trained / "adapter"),
                     "--output", str(tmp_path / "delta")]) == 2
    err = capfd.readouterr().err
    assert "LoRA adapter" in err and "toucan merge-lora" in err and "Traceback" not in err


def test_ppl_on_adapter_equals_ppl_on_merged(trained, tmp_path, capfd):
    text = tmp_path / "t.txt"
    text.write_text("你好。" * 40 + REPLY * 20, encoding="utf-8")
    results = []
    for model in ("adapter", "merged"):
        out = tmp_path / f"{model}.json"
        # --ctx: ppl's old name for --max-len still works
        assert cli.main(["-q", "ppl", "--model", str(trained / model), "--data", str(text), "--ctx", "32",
                         "--stride", "32", "--output", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["ppl"] == results[1]["ppl"] and results[0]["tokens"] == results[1]["tokens"] > 0


def test_quantize_merges_an_adapter_first(trained, tmp_path, caplog):
    import logging

    from toucan.manifest import read_manifest

    out = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="toucan"):
        assert cli.main(["quantize", "--model", str(trained / "adapter"), "--output", str(out), "--method", "rtn",
                         "--bits", "8", "--group-size", "32", "--device", "cpu"]) == 0
    assert "merging it into its base" in caplog.text
    m = read_manifest(out)
    assert m["config"]["model"] == str(trained / "adapter")
    inputs = list(m["inputs"])  # every input file with its sha256: the adapter's and the base's
    assert any(f.startswith(str(trained / "adapter")) for f in inputs)
    assert any(f.startswith(str((trained / "base").resolve())) for f in inputs), inputs
    assert not list(tmp_path.glob(".toucan-merged-*"))  # the temporary merged copy is gone
    # 8-bit RTN of the merged model answers like the merged model
    from toucan.engine import Engine
    from toucan.sampling import SamplingParams

    opts = SamplingParams(max_new_tokens=24, temperature=0, do_sample=False, repetition_penalty=1.0)
    ask = lambda e: e.generate(e.chat_prompt([], "你好", 24)[0], opts).text  # noqa: E731
    assert ask(Engine.from_dir(out, device="cpu")) == ask(Engine.from_dir(trained / "merged", device="cpu"))


def test_eval_generate_on_adapter_equals_merged(trained, tmp_path):
    from test_eval import _mini_set

    from toucan.eval.items import read_records

    eval_set = _mini_set(tmp_path / "set.jsonl", per_class=1)
    got = []
    for model in ("adapter", "merged"):
        out = tmp_path / f"{model}.jsonl"
        assert cli.main(["-q", "eval", "generate", "--model", str(trained / model), "--data", str(eval_set),
                         "--output", str(out), "--limit", "3", "--max-new-tokens", "12", "--device", "cpu"]) == 0
        got.append([a["answer"] for a in read_records(out, "answers")[1]])
    assert len(got[0]) == 3 and got[0] == got[1]


def test_adapter_without_its_own_tokenizer_uses_the_base_one(trained, tmp_path, tiny_tok):
    from toucan.modeling import TOKENIZER_FILES, load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(trained / "adapter", bare)
    for f in bare.iterdir():
        if f.name in TOKENIZER_FILES or f.name.startswith(("special_tokens", "tokenizer")):
            f.unlink()
    tok = load_tokenizer(bare)
    assert tok.get_vocab() == tiny_tok.get_vocab()
