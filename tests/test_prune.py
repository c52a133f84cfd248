"""toucan prune: each method's mask against its paper's definition, exact sparsity and N:M groups,
SparseGPT's reconstruction beating Wanda's, the command end to end on a tiny LLaMA (odd widths
skipped and listed), 4-bit GPTQ and GGUF keeping the zeros, and bad input as one-line errors."""

import json

import pytest

from toucan import cli
from toucan.manifest import read_manifest, verify_manifest

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


def correlated_inputs(n, d, seed):
    """Calibration-like inputs: correlated columns with very different scales (as LLM activations
    have, with a few large-norm features), so the metrics and the Hessian actually matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    scale = torch.exp(torch.randn(d, generator=g))
    return (torch.randn(n, d, generator=g) @ mix) * scale


# ---------------------------------------------------------------------------------------------
# The masks

def test_masks_are_exact_per_group():
    import torch

    from toucan.prune import Target, magnitude_mask, sparsegpt_prune, wanda_mask

    torch.manual_seed(0)
    W = torch.randn(24, 64)
    X = correlated_inputs(256, 64, 1)
    sq = X.square().sum(0)
    half = Target(0.5)
    # Wanda: exactly floor(cols * s) per output row (its comparison group)
    for s in (0.5, 0.3, 0.7):
        assert (wanda_mask(W, sq, Target(s)).sum(1) == int(64 * s)).all()
    # magnitude: exactly floor(numel * s) over the matrix (both papers' baseline), rows may differ
    m = magnitude_mask(W, Target(0.3))
    assert int(m.sum()) == int(W.numel() * 0.3)
    # SparseGPT: exactly s of every block of `blocksize` columns (its adaptive mask selection)
    Wp, mask = sparsegpt_prune(W, X.T @ X, half, blocksize=16)
    assert all(int(mask[:, i:i + 16].sum()) == 24 * 8 for i in range(0, 64, 16))
    assert (Wp[mask] == 0).all()
    # N:M: every group of M consecutive inputs in every row keeps exactly N
    for n, mm in ((2, 4), (4, 8), (1, 4)):
        t = Target(1 - n / mm, n, mm)
        for mk in (magnitude_mask(W, t), wanda_mask(W, sq, t), sparsegpt_prune(W, X.T @ X, t)[1]):
            assert ((~mk).reshape(24, -1, mm).sum(-1) == n).all()


def test_wanda_mask_is_the_papers_metric_per_output_row():
    """An independent computation: S_ij = |W_ij| * ||X_j||_2, the k lowest of each row pruned."""
    import torch

    from toucan.prune import Target, wanda_mask

    torch.manual_seed(3)
    W = torch.randn(8, 32, dtype=torch.float64)
    X = correlated_inputs(100, 32, 4).double()
    norms = [sum(float(X[t, j]) ** 2 for t in range(X.shape[0])) ** 0.5 for j in range(32)]
    expect = torch.zeros(8, 32, dtype=torch.bool)
    for i in range(8):
        order = sorted(range(32), key=lambda j: abs(float(W[i, j])) * norms[j])
        for j in order[:16]:
            expect[i, j] = True
    got = wanda_mask(W, X.square().sum(0), Target(0.5))
    assert torch.equal(got, expect)
    # and it is not the magnitude mask (the input norms changed the choice)
    assert not torch.equal(got, W.abs() < W.abs().median(dim=1, keepdim=True).values)
    # 2:4 by the same metric, within each group of 4
    exp24 = torch.zeros(8, 32, dtype=torch.bool)
    for i in range(8):
        for g in range(0, 32, 4):
            order = sorted(range(g, g + 4), key=lambda j: abs(float(W[i, j])) * norms[j])
            exp24[i, order[0]] = exp24[i, order[1]] = True
    assert torch.equal(wanda_mask(W, X.square().sum(0), Target(0.5, 2, 4)), exp24)


def test_sparsegpt_reconstructs_the_layer_output_better_than_wanda():
    import torch

    from toucan.prune import Target, sparsegpt_prune, wanda_mask

    torch.manual_seed(5)
    W = torch.randn(48, 96)
    X = correlated_inputs(512, 96, 6)
    for t in (Target(0.5), Target(0.5, 2, 4), Target(0.5, 4, 8)):
        Ww = W.masked_fill(wanda_mask(W, X.square().sum(0), t), 0)
        Ws, _ = sparsegpt_prune(W, 2 * X.T @ X / len(X), t, blocksize=32)
        err_w = float((X @ (W - Ww).T).square().sum())
        err_s = float((X @ (W - Ws).T).square().sum())
        assert err_s < 0.8 * err_w, (t, err_s, err_w)


def test_wanda_beats_magnitude_when_inputs_have_outlier_features():
    """Wanda's point: with a few input features 30x larger than the rest (as LLaMA-7B has), the
    weights that read them matter more than their size says. Uniform inputs: about the same."""
    import torch

    from toucan.prune import Target, magnitude_mask, wanda_mask

    torch.manual_seed(7)
    W = torch.randn(64, 128)
    X = torch.randn(1024, 128)
    X[:, :4] *= 30  # outlier features
    t = Target(0.5)
    err = {name: float((X @ W.masked_fill(m, 0).T - X @ W.T).square().sum())
           for name, m in (("magnitude", magnitude_mask(W, t)), ("wanda", wanda_mask(W, X.square().sum(0), t)))}
    assert err["wanda"] < 0.5 * err["magnitude"], err


def test_parse_target():
    from toucan.errors import ConfigError
    from toucan.prune import parse_target

    assert parse_target(None, None).sparsity == 0.5
    assert parse_target(None, "2:4") == parse_target(None, " 2 : 4 ")
    assert parse_target(None, "4:8").pattern == "4:8" and parse_target(0.7, None).sparsity == 0.7
    for s, p in ((0.0, None), (1.0, None), (-0.1, None), (1.5, None), (float("nan"), None),
                 (None, "4:4"), (None, "5:4"), (None, "0:4"), (None, "2-4"), (None, "a:b"), (0.5, "2:4")):
        with pytest.raises(ConfigError):
            parse_target(s, p)


# ---------------------------------------------------------------------------------------------
# The command, on a tiny LLaMA (hidden 64, MLP 172: 172 is not a multiple of 8)

@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("prune-data") / "calib.txt"
    p.write_text(" ".join(f"计算 {a} 加 {b} 等于 {a + b} 。" for a in range(40) for b in range(8)), encoding="utf-8")
    return p


def prune(model_dir, out, *args):
    return cli.main(["prune", "--model", str(model_dir), "--output", str(out), "--device", "cpu",
                     "--calib-samples", "8", "--max-len", "64", *args])


def test_prune_command_writes_a_sparse_model_with_its_manifest(tiny_model_dir, calib, tmp_path, caplog, capsys):
    import torch

    from toucan.modeling import load_model
    from toucan.prune import measure_sparsity

    out = tmp_path / "sgpt48"
    assert prune(tiny_model_dir, out, "--method", "sparsegpt", "--pattern", "4:8", "--data", str(calib)) == 0
    assert "172 is not a multiple of M=8" in caplog.text
    man = read_manifest(out)
    assert verify_manifest(out) == []
    p = man["pruning"]
    assert (p["method"], p["pattern"], p["sparsity"]) == ("sparsegpt", "4:8", 0.5)
    assert sorted(p["skipped"]) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert len(p["layers"]) == 12 and all(v == 0.5 for v in p["layers"].values())
    assert p["calibration"]["samples"] == 8 and p["measured_sparsity"] == 0.5
    dense, sparse = load_model(tiny_model_dir, device="cpu"), load_model(out, device="cpu")
    for name, mod in sparse.named_modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight
            if name in p["layers"]:
                assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) <= 4).all()
            else:  # skipped layers, embeddings' neighbours and lm_head are untouched
                assert torch.equal(w, dict(dense.named_modules())[name].weight), name
    assert torch.equal(sparse.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    sp = measure_sparsity(out)
    assert sp["pattern"] == "4:8" and sp["pattern_kept"] == 1.0 and 0.3 < sp["sparsity"] < 0.5
    assert "12 layers pruned" in capsys.readouterr().out

    # magnitude needs no data; unstructured 60 %: exactly 60 % of each matrix
    out2 = tmp_path / "mag"
    assert prune(tiny_model_dir, out2, "--method", "magnitude", "--sparsity", "0.6") == 0
    layers = read_manifest(out2)["pruning"]["layers"]
    assert len(layers) == 14 and all(abs(v - 0.6) < 1e-3 for v in layers.values())
    # an existing output is replaced only with --overwrite
    assert prune(tiny_model_dir, out2, "--method", "magnitude") == 2
    assert prune(tiny_model_dir, out2, "--method", "magnitude", "--overwrite") == 0


def test_sequential_calibration_uses_pruned_outputs(tiny_model_dir, calib, tiny_tok):
    """Layer 1 is calibrated on layer 0's *pruned* outputs: pruning layer 0 differently changes
    layer 1's Wanda mask, and the result equals pruning layer by layer by hand."""
    import torch

    from toucan.modeling import load_model
    from toucan.prune import InputStats, Target, prune_model, wanda_mask
    from toucan.quant.calib import calibration_samples

    seqs = calibration_samples(tiny_tok, calib, 4, 64, "alpaca")
    model = load_model(tiny_model_dir, device="cpu")
    prune_model(model, seqs, "wanda", Target(0.5), progress=False)
    # by hand: prune layer 0 first, then collect layer 1's input statistics with the pruned layer 0
    ref = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            stats, hooks = {}, []
            for n, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    stats[n] = InputStats(mod.in_features, "cpu", hessian=False)
                    hooks.append(mod.register_forward_hook(lambda _m, a, _o, s=stats[n]: s.add(a[0])))
            for s in seqs:
                ref(torch.tensor([s]))  # the whole model: layers before i are already pruned
            for h in hooks:
                h.remove()
            for n, mod in layer.named_modules():
                if n in stats:
                    mod.weight.masked_fill_(wanda_mask(mod.weight, stats[n].sq, Target(0.5)), 0)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(a == 0, b == 0), n


@pytest.mark.slow
def test_quantize_keeps_every_zero_and_every_group(tiny_model_dir, calib, tmp_path):
    """2:4 model -> 4-bit GPTQ (g32: the attention layers; MLP widths stay fp32): dequantized,
    every zero is still zero and 100 % of 2:4 groups hold; plain GPTQ (--no-keep-sparsity) breaks
    them, so the check can fail. Asymmetric 4-bit keeps them too."""
    import torch

    from toucan.prune import iter_decoder_weights, measure_sparsity

    pruned = tmp_path / "wanda24"
    assert prune(tiny_model_dir, pruned, "--method", "wanda", "--pattern", "2:4", "--data", str(calib)) == 0
    before = dict(iter_decoder_weights(pruned))

    def quantize(name, *args):
        out = tmp_path / name
        assert cli.main(["quantize", "--model", str(pruned), "--output", str(out), "--data", str(calib),
                         "--calib-samples", "8", "--max-len", "64", "--group-size", "32", "--device", "cpu",
                         *args]) == 0
        return out

    for name, args in (("sym", ("--sym",)), ("asym", ("--asym",))):  # (asym is quantize's default)
        q = quantize(name, *args)
        man = read_manifest(q)
        assert man["quantization"]["keep_sparsity"] is True and man["quantization"]["zeros_forced"] == 0
        assert man["quantization"]["act_group_aware"] is False and man["pruning"]["pattern"] == "2:4"
        assert man["quantization"]["desc_act"] is False and man["quantization"]["gptaq"] is False  # defaults: off
        after = dict(iter_decoder_weights(q))
        for n in (f"model.layers.{i}.{m}" for i in range(2) for m in ATTN):
            assert not torch.equal(after[n], before[n])  # really quantized
            assert (after[n][before[n] == 0] == 0).all(), n
        assert measure_sparsity(q)["pattern_kept"] == 1.0
        if name == "sym":  # pruned + GPTQ -> GGUF q4_0 (GPTQ's blocks taken over exactly): still 2:4
            from toucan.gguf_export import export_gguf

            export_gguf(q, tmp_path / "sym-q4_0.gguf", "q4_0")
            assert gguf_blocks_hold_2of4(tmp_path / "sym-q4_0.gguf") == 14
    plain = quantize("plain", "--no-keep-sparsity")
    assert read_manifest(plain)["quantization"]["keep_sparsity"] is False
    assert measure_sparsity(plain, "2:4")["pattern_kept"] < 0.999
    # act-order reorders columns: refused for a pruned model, one line
    assert cli.main(["quantize", "--model", str(pruned), "--output", str(tmp_path / "da"), "--data", str(calib),
                     "--group-size", "32", "--desc-act", "--device", "cpu"]) == 2
    # so does GPTAQ (issue 16: with it the zeros were not kept); both are off by default for a pruned model
    assert cli.main(["quantize", "--model", str(pruned), "--output", str(tmp_path / "ga"), "--data", str(calib),
                     "--group-size", "32", "--gptaq", "--device", "cpu"]) == 2
    assert not (tmp_path / "ga").exists()


def gguf_blocks_hold_2of4(path) -> int:
    """Check every decoder matrix of a .gguf (dequantized) for 2:4 and >= 50 % exact zeros;
    returns how many were checked. (q/k rows are permuted in GGUF; groups run along rows.)"""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    checked = 0
    for t in GGUFReader(str(path)).tensors:
        if not t.name.startswith("blk.") or len(t.shape) != 2:
            continue
        w = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))  # rows of in_features
        nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (nz <= 2).all(), (path, t.name, t.tensor_type.name)
        assert np.mean(w == 0) >= 0.5, t.name
        checked += 1
    return checked


def test_gguf_export_keeps_the_zeros(tiny_model_dir, calib, tmp_path):
    """q8_0 and q4_0 (llama.cpp's formats, gguf's own quantizers) store an exact zero for a zero."""
    from toucan.gguf_export import export_gguf

    pruned = tmp_path / "mag24"
    assert prune(tiny_model_dir, pruned, "--method", "magnitude", "--pattern", "2:4") == 0
    for gtype in ("q8_0", "q4_0"):
        path = tmp_path / f"m-{gtype}.gguf"
        export_gguf(pruned, path, gtype)
        assert gguf_blocks_hold_2of4(path) == 14


def test_ppl_reports_sparsity(tiny_model_dir, calib, tmp_path, capsys):
    pruned = tmp_path / "mag"
    assert prune(tiny_model_dir, pruned, "--method", "magnitude", "--pattern", "2:4") == 0
    capsys.readouterr()
    res = tmp_path / "ppl.json"
    assert cli.main(["ppl", "--model", str(pruned), "--reference", str(tiny_model_dir), "--data", str(calib),
                     "--max-len", "64", "--stride", "64", "--max-samples", "2", "--device", "cpu",
                     "--output", str(res)]) == 0
    line = capsys.readouterr().out
    assert "KL(reference || model)" in line and "sparsity 50.00% of decoder weights (2:4 in 100.00% of groups)" in line
    assert json.loads(res.read_text())["sparsity"]["sparsity"] == 0.5


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback

@pytest.mark.parametrize("args, expect", [
    (["--sparsity", "0"], "strictly between 0 and 1"),
    (["--sparsity", "1"], "strictly between 0 and 1"),
    (["--sparsity", "1.5"], "strictly between 0 and 1"),
    (["--pattern", "4:4"], "need 0 < N < M"),
    (["--pattern", "8:4"], "need 0 < N < M"),
    (["--pattern", "two:four"], "expected N:M"),
    (["--pattern", "2:4", "--sparsity", "0.5"], "give one of them"),
    (["--method", "wanda"], "needs calibration data"),
    (["--method", "sparsegpt", "--data", "/nonexistent.txt"], "no such file"),
])
def test_bad_options_are_one_line_errors(tiny_model_dir, tmp_path, capsys, args, expect):
    args = ["--method", "magnitude", *args] if "--method" not in args else args
    assert prune(tiny_model_dir, tmp_path / "out", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("toucan prune: error:") and expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_model_without_weights_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert prune(empty, tmp_path / "out", "--method", "magnitude") == 2
    err = capsys.readouterr().err.strip()
    assert "no weights" in err and len(err.splitlines()) == 1
