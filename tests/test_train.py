"""toucan train: collator, full SFT end to end, arguments."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toucan.config import TrainConfig
from toucan.data import IGNORE_INDEX, encode_example


def write_data(path: Path, n: int = 40) -> Path:
    """Small arithmetic SFT data a tiny model can start to learn in a few dozen steps."""
    recs = [{"instruction": f"计算 {a} 加 {b}", "input": "", "output": f"{a} 加 {b} 等于 {a + b}。"}
            for a in range(8) for b in range(n // 8)]
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    return path


def small_vocab_model(out: Path, tok, missing_rows: int, seed: int) -> Path:
    """A saved tiny model whose embedding has `missing_rows` fewer rows than its tokenizer (as a base
    model meets an extended vocabulary): training must resize it."""
    from toucan.modeling import save_model_dir, tiny_llama

    save_model_dir(out, tiny_llama(len(tok) - missing_rows, tokenizer=tok, seed=seed), tok, command="test-fixture")
    return out


def tcfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=[str(data)], output=str(out),
                max_steps=4, learning_rate=1e-3, logging_steps=1, save_steps=1000, max_len=64,
                per_device_train_batch_size=4, warmup_ratio=0.0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainConfig(**base)


def test_collator_keeps_eos_label_when_pad_is_eos(tiny_tok):
    """pad == eos must not mask the EOS out of the loss (the classic LLaMA SFT bug)."""
    from toucan.collate import SFTCollator

    eos = tiny_tok.eos_token_id
    a = encode_example(tiny_tok, "你好", "世界", 64)
    b = encode_example(tiny_tok, "你好，请介绍一下你自己", "我是一个助手，很高兴认识你", 64)
    assert a.input_ids[-1] == eos and a.labels[-1] == eos
    batch = SFTCollator(pad_token_id=eos)([{"input_ids": a.input_ids, "labels": a.labels},
                                           {"input_ids": b.input_ids, "labels": b.labels}])
    n = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, n) and len(a.input_ids) < n
    k = len(a.input_ids)
    # the short row's real EOS is still a label, its padding (also the eos id) is not
    assert batch["labels"][0, k - 1].item() == eos
    assert batch["input_ids"][0, k:].eq(eos).all()
    assert batch["labels"][0, k:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0, :k].eq(1).all() and batch["attention_mask"][0, k:].eq(0).all()
    assert batch["labels"][1, -1].item() == eos
    # ... and the model's loss sees exactly the response + EOS tokens of both rows
    n_labels = (batch["labels"] != IGNORE_INDEX).sum().item()
    assert n_labels == sum(x != IGNORE_INDEX for x in a.labels + b.labels)


def test_pass_through_trainer_flags(tmp_path):
    from toucan.errors import ConfigError
    from toucan.commands.train import trainer_args

    cfg = tcfg("m", "d", tmp_path / "out", extra_args=["--max_grad_norm", "0.5", "--adam_beta2", "0.95"])
    args = trainer_args(cfg)
    assert args.max_grad_norm == 0.5 and args.adam_beta2 == 0.95 and args.max_steps == 4
    assert args.output_dir == str(tmp_path / "out") + "-checkpoints"
    # a flag given wins over toucan's own setting, even when it spells TrainingArguments' default
    assert trainer_args(tcfg("m", "d", tmp_path / "o", extra_args=["--remove_unused_columns", "True"])
                        ).remove_unused_columns is True
    assert trainer_args(tcfg("m", "d", tmp_path / "o")).remove_unused_columns is False
    with pytest.raises(ConfigError, match="--no_such_flag"):
        trainer_args(tcfg("m", "d", tmp_path / "o", extra_args=["--no_such_flag", "1"]))
    with pytest.raises(ConfigError, match="max_grad_norm.*invalid float value"):
        trainer_args(tcfg("m", "d", tmp_path / "o", extra_args=["--max_grad_norm", "abc"]))


@pytest.mark.integration
def test_full_sft_loss_falls_and_saves_hf_dir(tmp_path, tiny_model_dir, tiny_tok):
    from transformers import AutoModelForCausalLM

    from toucan.manifest import read_manifest, verify_manifest
    from toucan.commands.train import train

    data = write_data(tmp_path / "d.json")
    res = train(tcfg(tiny_model_dir, data, tmp_path / "out", max_steps=30, logging_steps=5))
    losses = res.losses
    assert len(losses) == 6
    assert losses[-1] < losses[0] * 0.8, losses
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    assert verify_manifest(out) == []
    m = read_manifest(out)
    assert m["command"] == "train" and str(data) in m["inputs"]
    assert m["train"]["global_step"] == 30
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not model.model.embed_tokens.weight.equal(base.model.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_train_on_tiny_model_dir(tmp_path, tiny_model_dir):
    data = write_data(tmp_path / "d.json", n=16)
    out = tmp_path / "cli_out"
    # the one vocabulary (--model/--data/--output/--max-len), plus an HF TrainingArguments flag passed through
    r = subprocess.run([sys.executable, "-m", "toucan.cli", "train", "--model", str(tiny_model_dir),
                        "--data", str(data), "--output", str(out), "--max-len", "64", "--max-steps", "2",
                        "--max_grad_norm", "1.0", "--save-steps", "1000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "toucan.json").is_file()
    # the HF Trainer spellings still parse: the error is about the model folder, not a missing option
    bad = subprocess.run([sys.executable, "-m", "toucan.cli", "train", "--model_name_or_path", str(tmp_path),
                          "--data_path", str(data), "--output_dir", str(tmp_path / "x"), "--max_steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert f"{tmp_path}: no config.json" in bad.stderr, bad.stderr[-2000:]
