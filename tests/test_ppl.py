"""toucan ppl: the window/masking convention, agreement with the HF loss, determinism, KL, CLI."""

import json
import math

import pytest

from toucan import cli
from toucan.data import IGNORE_INDEX, encode_record, iter_records
from toucan.errors import ConfigError
from toucan.ppl import evaluate, load_sequences, text_windows

TEXT = "计算 12 加 30 等于 42 。 Below is an instruction that describes a task. 请问 7 乘 8 等于多少？\n" * 12


@pytest.mark.parametrize("n,ctx,stride", [(10, 4, 4), (23, 8, 3), (5, 8, 8), (64, 16, 16), (17, 5, 1)])
def test_each_token_is_scored_once(n, ctx, stride):
    ids = list(range(n))
    scored = []
    for i, (window, mask) in enumerate(text_windows(ids, ctx, stride)):
        assert len(window) == len(mask) <= ctx and not mask[0]
        begin = window[0]
        scored += [begin + j for j, m in enumerate(mask) if m]
        if stride < ctx and i > 0:  # overlapping windows: a scored token sees ctx - stride tokens first
            assert mask.index(True) >= ctx - stride or len(window) < ctx
    assert sorted(scored) == scored and len(set(scored)) == len(scored)
    if stride == ctx:  # disjoint windows: the first token of each is context only
        assert scored == [t for t in range(1, n) if t % ctx]
    else:
        assert scored == list(range(1, n))


def test_instruction_data_scores_only_the_response(tiny_tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"instruction": "计算 1 加 2", "output": "等于 3"}, ensure_ascii=False) + "\n")
    (ids, mask), = load_sequences(tiny_tok, f, ctx=128, stride=128, template="alpaca")
    enc = encode_record(tiny_tok, next(iter_records(f)), 128)
    assert ids == enc.input_ids and mask == [lab != IGNORE_INDEX for lab in enc.labels]
    assert mask[-1] and ids[-1] == tiny_tok.eos_token_id and not any(mask[:len(ids) - sum(mask)])


def test_matches_hf_loss_is_deterministic_and_kl_to_itself_is_zero(tiny_model_dir, tiny_tok, tmp_path):
    import torch

    from toucan.modeling import load_model

    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    model = load_model(tiny_model_dir, device="cpu")
    seqs = load_sequences(tiny_tok, f, ctx=64, stride=64, template="alpaca", max_samples=3)
    r1 = evaluate(model, seqs, reference=model)
    assert r1 == evaluate(model, seqs, reference=model)
    assert r1["kl"] == pytest.approx(0, abs=1e-6) and r1["tokens"] == 3 * 63
    # the same number from the HF loss (labels shift inside the model; -100 = not scored)
    losses = []
    for ids, mask in seqs:
        labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(ids, mask)]])
        losses.append(model(torch.tensor([ids]), labels=labels).loss.item() * sum(mask))
    assert r1["ppl"] == pytest.approx(math.exp(sum(losses) / r1["tokens"]), rel=1e-5)
    # a different model: positive KL
    from toucan.modeling import tiny_llama

    other = tiny_llama(len(tiny_tok), seed=1, tokenizer=tiny_tok).eval()
    assert evaluate(model, seqs, reference=other)["kl"] > 0.01


def test_cli(tiny_model_dir, tiny_tok, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    out = tmp_path / "r.json"
    model = ["ppl", "--model", str(tiny_model_dir), "--device", "cpu"]
    assert cli.main(model + ["--data", str(f), "--ctx", "32", "--stride", "16", "--max-samples", "4",
                             "--reference", str(tiny_model_dir), "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "KL(reference || model)" in capsys.readouterr().out
    assert r["kl"] == pytest.approx(0, abs=1e-6) and r["ppl"] > 1 and r["stride"] == 16
    assert cli.main(model + ["--data", str(f), "--ctx", "8", "--stride", "9"]) == 2
    assert cli.main(model + ["--data", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"instruction": "很长的问题" * 20, "output": "好"}, ensure_ascii=False))
    with pytest.raises(ConfigError, match="nothing to score"):
        load_sequences(tiny_tok, long, ctx=8, stride=8, template="alpaca")
