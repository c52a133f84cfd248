"""make-delta / apply-delta / check-delta on real tiny LLaMA models: bit-exact round trips in fp32,
fp16 and bf16 (with an extended vocabulary and an added [PAD] row, tied embeddings, legacy .bin
shards), refusal of a wrong base, detection of a corrupted delta, shapes that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from toucan import cli
from toucan.delta import apply_delta, check_delta, make_delta, read_delta_info
from toucan.delta_io import Weights, bits
from toucan.errors import DeltaError
from toucan.fsutil import sha256_file
from toucan.manifest import verify_manifest
from toucan.modeling import tiny_llama

VOCAB = 1000
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save(model, path, dtype=torch.float32, **kw):
    model.to(dtype).save_pretrained(str(path), **kw)
    return path


def save_bin(model, path, dtype=torch.float16, shards=3):
    """Legacy pytorch_model-*.bin shards + index (transformers 5 only writes safetensors)."""
    model.config.save_pretrained(str(path))
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    names, weight_map = list(state), {}
    for i in range(shards):
        f = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, path / f)
        weight_map.update(dict.fromkeys(part, f))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                               "weight_map": weight_map}))
    return path


def fine_tuned(seed=0, extra_rows=0, **kw):
    """The base model of `seed`, 'fine-tuned' (every weight moved a little), with `extra_rows`
    new vocabulary rows (e.g. the Chinese pieces plus a [PAD])."""
    model = tiny_llama(VOCAB, seed=seed, **kw)
    if extra_rows:
        model.resize_token_embeddings(VOCAB + extra_rows, mean_resizing=False)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    return model


def assert_same_weights(a_dir, b_dir):
    a, b = Weights(a_dir), Weights(b_dir)
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:
        ta, tb = a.get(n), b.get(n)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, n
        assert torch.equal(bits(ta), bits(tb)), n  # raw bit patterns: -0.0, NaN payloads included


def logits(model_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.arange(1, 40).reshape(1, -1)).logits


@pytest.mark.parametrize("extra_rows", [0, 18], ids=["same-vocab", "extended+pad"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_round_trip_is_bit_exact(tmp_path, dtype, extra_rows):
    dt = DTYPES[dtype]
    base = save(tiny_llama(VOCAB, seed=0), tmp_path / "base", dt)
    target = save(fine_tuned(extra_rows=extra_rows), tmp_path / "target", dt)
    info = make_delta(base, target, tmp_path / "delta", max_shard_size="40KB")
    assert len(list((tmp_path / "delta").glob("delta-*.safetensors"))) > 1  # bounded shards + index
    rows = {n: p["base_rows"] for n, p in info["tensors"].items() if p["base_rows"] is not None}
    assert rows == ({} if not extra_rows else {"model.embed_tokens.weight": VOCAB, "lm_head.weight": VOCAB})
    assert verify_manifest(tmp_path / "delta") == []

    apply_delta(base, tmp_path / "delta", tmp_path / "restored")
    assert_same_weights(target, tmp_path / "restored")
    # The restored safetensors file is byte-identical to the target's (same header, same data).
    assert sha256_file(tmp_path / "restored/model.safetensors") == sha256_file(target / "model.safetensors")
    assert verify_manifest(tmp_path / "restored") == []
    assert json.loads((tmp_path / "restored/config.json").read_text())["vocab_size"] == VOCAB + extra_rows
    assert torch.equal(logits(target, dt), logits(tmp_path / "restored", dt))


def test_special_values_round_trip(tmp_path):
    base_model, target_model = tiny_llama(VOCAB, seed=0), fine_tuned()
    with torch.no_grad():
        w = target_model.model.norm.weight
        w[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-45])  # NaN, inf, -0, subnormal
    base = save(base_model, tmp_path / "base", torch.bfloat16)
    target = save(target_model, tmp_path / "target", torch.bfloat16)
    make_delta(base, target, tmp_path / "delta")
    apply_delta(base, tmp_path / "delta", tmp_path / "restored")
    assert_same_weights(target, tmp_path / "restored")


def test_tied_base_untied_target(tmp_path):
    """A base with tied embeddings (no lm_head.weight stored) and a target with its own lm_head."""
    from transformers import LlamaForCausalLM

    from toucan.modeling import tiny_llama_config

    config = tiny_llama_config(VOCAB)
    config.tie_word_embeddings = True
    base = save(LlamaForCausalLM(config), tmp_path / "base")
    assert "lm_head.weight" not in Weights(base).meta
    target = save(fine_tuned(extra_rows=1), tmp_path / "target")
    info = make_delta(base, target, tmp_path / "delta")
    assert info["tensors"]["lm_head.weight"]["base"] == "model.embed_tokens.weight"
    assert any("tied" in n for n in info["notes"])
    apply_delta(base, tmp_path / "delta", tmp_path / "restored")
    assert_same_weights(target, tmp_path / "restored")


def test_wrong_base_fails_clearly_and_writes_nothing(tmp_path, capsys):
    base = save(tiny_llama(VOCAB, seed=0), tmp_path / "base", torch.float16)
    other = save(tiny_llama(VOCAB, seed=1), tmp_path / "other", torch.float16)
    target = save(fine_tuned(), tmp_path / "target", torch.float16)
    make_delta(base, target, tmp_path / "delta")
    out = tmp_path / "out" / "restored"
    first = Weights(other).names[0]  # the first tensor in the base's files: every tensor differs
    with pytest.raises(DeltaError, match=rf"wrong base: tensor {first} of .* differs"):
        apply_delta(other, tmp_path / "delta", out)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    # Through the CLI: one line on stderr, non-zero exit, nothing written.
    assert cli.main(["apply-delta", "--base", str(other), "--delta", str(tmp_path / "delta"),
                     "--target", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: progress bars
    assert err.startswith(f"toucan apply-delta: error: wrong base: tensor {first} of")
    assert not out.exists()
    # check-delta reports the mismatch per tensor (every tensor of a different seed differs).
    rows = check_delta(other, tmp_path / "delta")
    assert ("match", "delta") == rows[0][:2]
    base_rows = [r for r in rows if r[1] == "base"]
    assert base_rows and all(r[0] == "MISMATCH" for r in base_rows if "norm" not in r[2])
    # A base of another shape is named by tensor and shapes before any hashing.
    small = save(tiny_llama(VOCAB, seed=0, hidden_size=32), tmp_path / "small", torch.float16)
    with pytest.raises(DeltaError, match=r"wrong base: tensor .* is F16 \(\d+, 32\)"):
        apply_delta(small, tmp_path / "delta", out)


def test_corrupted_delta_is_detected(tmp_path, capsys):
    base = save(tiny_llama(VOCAB, seed=0), tmp_path / "base")
    target = save(fine_tuned(), tmp_path / "target")
    make_delta(base, target, tmp_path / "delta")
    shard = tmp_path / "delta" / "delta.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # one bit in the last tensor's data
    shard.write_bytes(bytes(data))
    out = tmp_path / "restored"
    with pytest.raises(DeltaError, match=r"does not match the delta's checksums \(model\.norm\.weight\)"
                                         r".* is corrupted"):
        apply_delta(base, tmp_path / "delta", out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert cli.main(["check-delta", "--base", str(base), "--delta", str(tmp_path / "delta")]) == 1
    assert "MISMATCH delta  changed: delta.safetensors" in capsys.readouterr().out
    # A truncated file is caught when it is opened.
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(DeltaError, match="delta.safetensors"):
        apply_delta(base, tmp_path / "delta", out)
    assert not out.exists()


def test_legacy_bin_base_and_target(tmp_path):
    base_st = save(tiny_llama(VOCAB, seed=0), tmp_path / "base_st", torch.float16)
    base_bin = save_bin(tiny_llama(VOCAB, seed=0), tmp_path / "base_bin")
    assert list(base_bin.glob("pytorch_model-*.bin")) and not list(base_bin.glob("*.safetensors"))
    target = save(fine_tuned(extra_rows=2), tmp_path / "target", torch.float16)
    # A delta made against safetensors applies to the same base stored as .bin shards (the base
    # checksums are of tensor bytes, not of files).
    make_delta(base_st, target, tmp_path / "delta")
    apply_delta(base_bin, tmp_path / "delta", tmp_path / "restored")
    assert_same_weights(target, tmp_path / "restored")
    # A .bin target is restored as bounded safetensors shards with an index, and loads.
    target_bin = save_bin(fine_tuned(extra_rows=2), tmp_path / "target_bin")
    make_delta(base_bin, target_bin, tmp_path / "delta_bin", max_shard_size="100KB")
    apply_delta(base_bin, tmp_path / "delta_bin", tmp_path / "restored_bin")
    assert (tmp_path / "restored_bin/model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "restored_bin").glob("model-*.safetensors"))) > 1
    assert_same_weights(target_bin, tmp_path / "restored_bin")
    assert torch.equal(logits(target_bin, torch.float32), logits(tmp_path / "restored_bin", torch.float32))


def test_bad_shapes_are_named(tmp_path):
    base = save(tiny_llama(VOCAB, seed=0), tmp_path / "base")
    wider = save(tiny_llama(VOCAB, seed=0, intermediate_size=180), tmp_path / "wider")
    with pytest.raises(DeltaError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: target shape "
                                         r"\(64, 180\) does not fit base shape \(64, 172\)"):
        make_delta(base, wider, tmp_path / "delta")
    fewer = save(tiny_llama(VOCAB - 10, seed=0), tmp_path / "fewer")
    with pytest.raises(DeltaError, match=r"tensor lm_head\.weight: target shape \(990, 64\) does not fit "
                                         r"base shape \(1000, 64\)"):
        make_delta(base, fewer, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_cli_long_flags_and_check(tmp_path, capsys):
    base = save(tiny_llama(VOCAB, seed=0), tmp_path / "base", torch.bfloat16)
    target = save(fine_tuned(extra_rows=1), tmp_path / "target", torch.bfloat16)
    (target / "tokenizer_config.json").write_text('{"tokenizer_class": "TokenizersBackend"}\n')
    d, out = tmp_path / "delta", tmp_path / "restored"
    assert cli.main(["make-delta", "--base-model-path", str(base), "--target-model-path", str(target),
                     "--delta-path", str(d)]) == 0
    assert cli.main(["apply-delta", "--base-model-path", str(base), "--delta-path", str(d),
                     "--target-model-path", str(out), "--verify_sha256"]) == 0
    assert "(sha256 of the base and of every restored tensor)" in capsys.readouterr().out
    assert (out / "tokenizer_config.json").read_text() == (target / "tokenizer_config.json").read_text()
    assert read_delta_info(d)["method"] == "xor"
    capsys.readouterr()
    assert cli.main(["check-delta", "--base", str(base), "--delta", str(d), "--target", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "match    target lm_head.weight" in lines and "match    base   lm_head.weight" in lines
    assert lines[-1].endswith(" match, 0 mismatch")
