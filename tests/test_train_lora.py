"""Embedding resize to a larger tokenizer, LoRA training, and merge-lora."""

from __future__ import annotations

import json

import pytest

from test_train import small_vocab_model, tcfg, write_data


def test_resize_embeddings_new_rows_are_mean(tiny_tok):
    import torch

    from toucan.modeling import tiny_llama
    from toucan.modeling import resize_embeddings

    model = tiny_llama(len(tiny_tok) - 7, tokenizer=tiny_tok)
    emb0 = model.model.embed_tokens.weight.detach().clone()
    head0 = model.lm_head.weight.detach().clone()
    assert resize_embeddings(model, len(tiny_tok)) == 7
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb.shape[0] == head.shape[0] == model.config.vocab_size == len(tiny_tok)
    assert torch.equal(emb[:-7], emb0) and torch.equal(head[:-7], head0)
    assert torch.allclose(emb[-7:], emb0.mean(0).expand(7, -1))
    assert torch.allclose(head[-7:], head0.mean(0).expand(7, -1))
    assert resize_embeddings(model, len(tiny_tok)) == 0   # already big enough: untouched


@pytest.fixture(scope="module")
def small_vocab_model_dir(tmp_path_factory, tiny_tok):
    return small_vocab_model(tmp_path_factory.mktemp("models") / "small_vocab", tiny_tok, 24, seed=1)


@pytest.mark.integration
def test_full_train_resizes_to_tokenizer(tmp_path, small_vocab_model_dir, tiny_tok):
    from transformers import AutoModelForCausalLM

    from toucan.manifest import read_manifest
    from toucan.commands.train import train

    data = write_data(tmp_path / "d.json", n=16)
    train(tcfg(small_vocab_model_dir, data, tmp_path / "out", max_steps=2, tokenizer=str(small_vocab_model_dir)))
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert m.config.vocab_size == len(tiny_tok) == m.lm_head.weight.shape[0]
    assert read_manifest(tmp_path / "out")["train"]["embedding_rows_added"] == 24


@pytest.mark.integration
def test_lora_train_then_merge_gives_same_logits(tmp_path, small_vocab_model_dir, tiny_tok):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from toucan.cli import main
    from toucan.manifest import verify_manifest
    from toucan.commands.train import train
    from toucan.modeling import resize_embeddings

    data = write_data(tmp_path / "d.json", n=16)
    adapter = tmp_path / "adapter"
    res = train(tcfg(small_vocab_model_dir, data, adapter, max_steps=6, finetuning_type="lora", lora_rank=4,
                     lora_target=["q_proj", "v_proj", "down_proj"], lora_train_embeddings=True, learning_rate=5e-3))
    assert res.losses[-1] < res.losses[0]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    assert set(cfg["modules_to_save"]) == {"embed_tokens", "lm_head"}
    assert not (adapter / "model.safetensors").exists() and verify_manifest(adapter) == []

    merged_dir = tmp_path / "merged"
    assert main(["merge-lora", "--base", str(small_vocab_model_dir), "--adapter", str(adapter),
                 "--output", str(merged_dir)]) == 0
    assert verify_manifest(merged_dir) == []
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config.vocab_size == len(tiny_tok)

    # reference: the base (resized the same way) with the adapter applied, not merged
    base = AutoModelForCausalLM.from_pretrained(small_vocab_model_dir)
    resize_embeddings(base, len(tiny_tok))
    ref = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([tiny_tok("计算 3 加 1 等于 4。你好")["input_ids"] + [len(tiny_tok) - 1]])
    with torch.no_grad():
        got, want = merged(ids).logits, ref(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(small_vocab_model_dir).eval()(ids[:, :-1]).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(got[:, :-1, :plain.shape[-1]], plain, atol=1e-3)   # the adapter did something
