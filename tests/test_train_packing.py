"""--packing: rows of several examples whose attention and positions stay per example; the loss on
packed rows equals the loss on the same examples padded one per row (per-token mean)."""

from __future__ import annotations

import json

import pytest

from toucan.data import IGNORE_INDEX, encode_example


def examples(tok, n=12):
    out = []
    for i in range(n):
        e = encode_example(tok, f"问题 {i}：" + "请写一句话。" * (i % 4), "好的，" + "这是回答。" * (1 + i % 5), 128)
        out.append({"input_ids": e.input_ids, "labels": e.labels})
    return out


def test_pack_examples_rows_and_positions(tiny_tok):
    from toucan.collate import pack_examples

    exs = examples(tiny_tok)
    rows = pack_examples(exs, 96)
    assert len(rows) < len(exs)
    assert all(len(r["input_ids"]) <= 96 for r in rows)
    # every example appears exactly once, whole, with positions 0..n-1
    pieces = []
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            pieces.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a:b])))
    assert sorted(pieces) == sorted((tuple(e["input_ids"]), tuple(e["labels"])) for e in exs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_tok, attn):
    import torch

    from toucan.modeling import tiny_llama
    from toucan.collate import PackedCollator, SFTCollator, pack_examples

    model = tiny_llama(len(tiny_tok), tokenizer=tiny_tok, seed=5, attn_implementation=attn).eval()
    exs = examples(tiny_tok)
    rows = pack_examples(exs, 96)
    packed = PackedCollator(tiny_tok.eos_token_id)(rows)
    padded = SFTCollator(tiny_tok.eos_token_id)(exs)
    assert "attention_mask" not in packed
    # both batches hold the same label tokens (the loss is their mean)
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss_packed = model(**packed).loss
        loss_padded = model(**padded).loss
        # the same rows without restarting positions (plain causal attention across examples) differ,
        # so this test would notice if transformers stopped honouring packed position_ids
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert torch.allclose(loss_packed, loss_padded, atol=1e-5, rtol=1e-5), (loss_packed, loss_padded)
    assert abs(leaky.item() - loss_padded.item()) > 1e-3


@pytest.mark.integration
def test_train_with_packing(tmp_path, tiny_model_dir):
    from test_train import tcfg, write_data
    from toucan.manifest import read_manifest
    from toucan.commands.train import train

    data = write_data(tmp_path / "d.json", n=40)
    res = train(tcfg(tiny_model_dir, data, tmp_path / "out", packing=True, max_steps=8, logging_steps=2,
                     per_device_train_batch_size=2, max_len=128))
    assert res.losses[-1] < res.losses[0]
    m = read_manifest(tmp_path / "out")["train"]
    assert m["examples"] == 40 and 0 < m["packed_rows"] < 40


def test_one_row_response_only_loss_equals_model_loss(tiny_tok):
    """The --packing training batch (rows joined into one, LM head only where a label follows)
    gives the same loss as the model's full-logits loss on the same packed rows."""
    import torch

    from toucan.modeling import tiny_llama
    from toucan.collate import PackedCollator, pack_examples, response_loss

    model = tiny_llama(len(tiny_tok), tokenizer=tiny_tok, seed=6).eval()
    rows = pack_examples(examples(tiny_tok), 96)
    one = PackedCollator(tiny_tok.eos_token_id, one_row=True)(rows)
    multi = PackedCollator(tiny_tok.eos_token_id)(rows)
    assert one["input_ids"].shape[0] == 1 and one["logits_to_keep"].numel() == (multi["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        labels = one.pop("labels")
        out = model(**one)
        assert out.logits.shape[1] == one["logits_to_keep"].numel() < labels.shape[1]
        loss = response_loss(out, labels)
        full = model(**multi).loss
    assert torch.allclose(loss, full, atol=1e-5), (loss, full)
