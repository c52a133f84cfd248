"""`toucan prune`: zero a fraction of every decoder Linear's weights (magnitude, Wanda, SparseGPT),
unstructured or N:M, written as a standard HF safetensors directory (the zeros are stored).

Why our own code: the reference implementations (locuslab/wanda, IST-DASLab/sparsegpt) hard-code
CUDA; torchao's WandaSparsifier compares scores across the whole layer instead of per output row;
llm-compressor pins transformers <= 5.17. Each method is a few lines of tensor math:

- magnitude: zero the smallest |W|, compared across the whole matrix (both papers' baseline).
- Wanda (Sun et al. 2023): score S_ij = |W_ij| * ||X_j||_2 (X_j: column j of the layer's input over
  every calibration token), compared within each output row i. No weight update.
- SparseGPT (Frantar & Alistarh 2023): H = 2 X^T X / n + damp * I; U = upper Cholesky factor of
  H^-1. Columns are processed left to right in blocks of 128: the mask of a block is chosen by the
  OBS error w^2 / U_cc^2 (unstructured: across the block; N:M: per group of M columns in each row),
  each pruned weight's error (w / U_cc) is propagated to the columns right of it in the block
  (row c of U), and the block's accumulated error to every later column.

N:M means at most N non-zero weights in every M consecutive weights along the input dimension
(NVIDIA's 2:4, what sparse tensor cores run). Calibration is sequential, as in both papers: the
inputs of decoder layer L are the outputs of layers 0..L-1 *after* they were pruned.

The honest part: sparsity saves no time on CPUs or in llama.cpp (dense kernels multiply the zeros
as well; the files are as large as dense ones, since the zeros are stored). What it buys there is
nothing but the quality data point. 2:4 is what GPUs accelerate (torch's semi-structured sparse
kernels, CUDA only: see bench/gpu.sh), and unstructured sparsity pays only with sparse formats or
kernels that toucan does not ship.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ModelError
from .delta_io import Weights
from .fsutil import check_output
from .modeling import check_model_dir, is_quantized, load_model, load_tokenizer, resolve_device, save_model_dir
from .quant.calib import calibration_samples, check_calibration
from .quant.sparse import pruned_pattern

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
BLOCK_RE = re.compile(r"(^|\.)layers\.\d+\.")  # decoder blocks: the only layers pruned
DEFAULT_SPARSITY = 0.5  # when neither --sparsity nor --pattern is given


@dataclass(frozen=True)
class Target:
    """What to prune to: `sparsity` (fraction zeroed) and, for N:M, at most n non-zero per m."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def pattern(self) -> str | None:
        return f"{self.n}:{self.m}" if self.m else None

    def __str__(self) -> str:
        return self.pattern or f"{self.sparsity:.0%} unstructured"


def parse_target(sparsity: float | None, pattern: str | None) -> Target:
    """--sparsity / --pattern as a Target, or a ConfigError saying what is wrong."""
    if sparsity is not None and pattern:
        raise ConfigError(f"--sparsity {sparsity} and --pattern {pattern}: give one of them (N:M fixes the "
                          f"sparsity at 1 - N/M)")
    if pattern:
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if not m:
            raise ConfigError(f"--pattern {pattern!r}: expected N:M, e.g. 2:4 or 4:8")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ConfigError(f"--pattern {pattern}: need 0 < N < M (N non-zero weights kept of every M); "
                              f"got N={n}, M={mm}")
        return Target(sparsity=1 - n / mm, n=n, m=mm)
    s = DEFAULT_SPARSITY if sparsity is None else float(sparsity)
    if not 0 < s < 1 or math.isnan(s):
        raise ConfigError(f"--sparsity {sparsity}: must be strictly between 0 and 1 (the fraction of weights zeroed)")
    return Target(sparsity=s)


# ----------------------------------------------------------------------------------------------
# Masks (True = pruned). Exact counts: the k smallest scores per group by sort order, not a
# threshold, so ties cannot make a row denser or sparser than asked.

def nm_mask(score, n: int, m: int):
    """Prune the m - n lowest-scoring weights of every m consecutive ones in each row."""
    import torch

    rows, cols = score.shape
    assert cols % m == 0, (cols, m)  # callers skip such layers (see layer_problem)
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def row_mask(score, sparsity: float):
    """Prune floor(cols * sparsity) lowest-scoring weights in every row (Wanda's comparison group)."""
    import torch

    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def matrix_mask(score, sparsity: float):
    """Prune floor(numel * sparsity) lowest-scoring weights of the whole matrix (magnitude's group)."""
    import torch

    k = int(score.numel() * sparsity)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.flatten(), k, largest=False).indices] = True
    return mask.reshape(score.shape)


def magnitude_mask(W, target: Target):
    score = W.abs().float()
    return nm_mask(score, target.n, target.m) if target.m else matrix_mask(score, target.sparsity)


def wanda_mask(W, col_sq_sum, target: Target):
    """col_sq_sum[j] = sum over calibration tokens of x_j^2, so ||X_j||_2 = its square root."""
    score = W.abs().float() * col_sq_sum.sqrt()[None, :]
    return nm_mask(score, target.n, target.m) if target.m else row_mask(score, target.sparsity)


def sparsegpt_prune(W, H, target: Target, blocksize: int = 128, damp_percent: float = 0.01):
    """(pruned W in fp32, mask) by SparseGPT's blockwise OBS update. H: X^T X summed over tokens
    (any positive scale: the dampening is relative to its mean diagonal)."""
    import torch

    W = W.float().clone()
    H = H.float().clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs that were always 0: no information, prune them freely
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    # U: upper Cholesky factor of H^-1 (H^-1 = U^T U). Row c of U restricted to columns >= c is
    # the OBS update direction for eliminating column c once columns < c are fixed.
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if target.m:
        blocksize = max(target.m, blocksize // target.m * target.m)  # N:M groups never straddle blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        if not target.m:  # adaptive mask selection over the whole block (the paper's Bs = 128)
            mask[:, i1:i2] = matrix_mask(W1.square() / d.square()[None, :], target.sparsity)
        for i in range(i2 - i1):
            if target.m and i % target.m == 0:  # choose the group's mask on the updated weights
                g = slice(i, i + target.m)
                mask[:, i1 + i:i1 + i + target.m] = nm_mask(W1[:, g].square() / d[g].square()[None, :],
                                                            target.n, target.m)
            w = W1[:, i]
            q = w.masked_fill(mask[:, i1 + i], 0)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # leaves W1[:, i] == q exactly
            W1[:, i] = q  # ... up to rounding: make the zeros exact
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, mask


# ----------------------------------------------------------------------------------------------
# Per-Linear input statistics, gathered by forward hooks while a decoder layer runs.

class InputStats:
    """Sum over tokens of x_j^2 (Wanda) and, when `hessian`, of x x^T (SparseGPT), in fp32."""

    def __init__(self, in_features: int, device, hessian: bool):
        import torch

        self.tokens = 0
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        self.sq += x.square().sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    def hessian(self):
        return self.xtx * (2 / max(1, self.tokens))  # the paper's H = 2 X X^T (mean over tokens)


def layer_problem(in_features: int, target: Target) -> str | None:
    """Why a Linear cannot be pruned to `target` (it is then skipped and listed), or None."""
    if target.m and in_features % target.m:
        return f"in_features {in_features} is not a multiple of M={target.m} for {target.pattern}"
    return None


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__}: no model.layers (a LLaMA-style decoder stack is needed)")
    return layers


def _capture_layer0_inputs(model, seqs, device):
    """Run the embeddings (and whatever precedes decoder layer 0) on every sequence and keep the
    hidden states and keyword arguments (rotary embeddings, mask) layer 0 is called with."""
    import torch

    class _Stop(Exception):
        pass

    captured = []

    def grab(_mod, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in seqs:
            try:
                model(torch.tensor([ids], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, inputs):
    out = []
    for hidden, kwargs in inputs:
        y = layer(hidden, **kwargs)
        out.append((y[0] if isinstance(y, tuple) else y, kwargs))
    return out


def prune_model(model, seqs: list[list[int]] | None, method: str, target: Target, *,
                blocksize: int = 128, damp_percent: float = 0.01, progress: bool = True) -> dict:
    """Prune `model` in place, decoder layer by decoder layer. `seqs`: calibration token ids
    (unused by magnitude). Returns {'layers': {name: measured sparsity}, 'skipped': {name: why}}."""
    import torch
    from tqdm import tqdm

    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    device = next(model.parameters()).device
    layers = decoder_layers(model)
    prefix = {id(layer): f"model.layers.{i}." for i, layer in enumerate(layers)}
    calibrated = method != "magnitude"
    done, skipped = {}, {}
    with torch.no_grad():
        inputs = _capture_layer0_inputs(model, seqs, device) if calibrated else None
        for layer in tqdm(layers, desc=f"prune {method} {target}", unit="layer", disable=not progress):
            linears = {prefix[id(layer)] + n: mod for n, mod in layer.named_modules()
                       if isinstance(mod, torch.nn.Linear)}
            todo = {}
            for name, mod in linears.items():
                why = layer_problem(mod.in_features, target)
                if why:
                    skipped[name] = why
                    log.warning("not pruning %s: %s", name, why)
                else:
                    todo[name] = mod
            stats = {}
            if calibrated:
                hooks = []
                for name, mod in todo.items():
                    stats[name] = InputStats(mod.in_features, device, hessian=method == "sparsegpt")
                    hooks.append(mod.register_forward_hook(lambda _m, inp, _o, s=stats[name]: s.add(inp[0])))
                try:
                    _run_layer(layer, inputs)  # the dense layer's inputs, from the pruned layers before
                finally:
                    for h in hooks:
                        h.remove()
            for name, mod in todo.items():
                W = mod.weight.data
                if method == "magnitude":
                    W.masked_fill_(magnitude_mask(W, target), 0)
                elif method == "wanda":
                    W.masked_fill_(wanda_mask(W, stats[name].sq, target), 0)
                else:
                    new, mask = sparsegpt_prune(W, stats[name].hessian(), target, blocksize, damp_percent)
                    W.copy_(new.masked_fill_(mask, 0).to(W.dtype))
                stats.pop(name, None)  # free the Hessian now: a 7B down_proj's is 0.5 GB
                done[name] = float((W == 0).float().mean())
            if calibrated:
                inputs = _run_layer(layer, inputs)  # the next layer sees this layer's pruned outputs
    return {"layers": done, "skipped": skipped}


# ----------------------------------------------------------------------------------------------
# Measuring sparsity in a saved directory (full precision or GPTQ), for `toucan ppl` and bench.

def _gptq_dequantize(weights, prefix: str, qcfg: dict):
    """Dense [out, in] weight of one GPTQ Linear from its qweight/qzeros/scales/g_idx (2/4/8 bits,
    packed along the input dim in int32; the 'gptq' (v1) format stores zero points minus 1)."""
    import torch

    bits = int(qcfg["bits"])
    if 32 % bits:
        return None  # 3-bit packs across words; not needed for measuring sparsity
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    qweight, qzeros = weights.get(prefix + "qweight"), weights.get(prefix + "qzeros")
    scales, g_idx = weights.get(prefix + "scales").float(), weights.get(prefix + "g_idx").long()
    q = ((qweight[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qweight.shape[1])  # [in, out]
    z = ((qzeros[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1)     # [groups, out]
    if qcfg.get("checkpoint_format", "gptq") == "gptq":
        z = z + 1
    q, z = q[:g_idx.shape[0]], z[:, :scales.shape[1]]
    return ((q - z[g_idx]).float() * scales[g_idx]).T.contiguous()


def iter_decoder_weights(model_dir: str | Path):
    """(name, dense fp32 [out, in] weight) of every decoder Linear in a model directory, full
    precision or GPTQ (dequantized: an exact zero stays visible), read one tensor at a time."""

    d = Path(model_dir)
    qcfg = json.loads((d / "config.json").read_text()).get("quantization_config")
    weights = Weights(d)
    for key in weights.names:
        if not BLOCK_RE.search(key):
            continue
        if key.endswith(".weight") and len(weights.meta[key][1]) == 2:
            yield key[:-len(".weight")], weights.get(key).float()
        elif qcfg and key.endswith(".qweight"):
            w = _gptq_dequantize(weights, key[:-len("qweight")], qcfg)
            if w is not None:
                yield key[:-len(".qweight")], w


def nm_kept(W, n: int, m: int) -> tuple[int, int]:
    """(groups of m consecutive input weights with at most n non-zero, all groups) of one weight."""
    rows, cols = W.shape
    if cols % m:
        return 0, 0
    nz = (W.reshape(rows, cols // m, m) != 0).sum(-1)
    return int((nz <= n).sum()), nz.numel()


def measure_sparsity(model_dir: str | Path, pattern: str | None = None) -> dict | None:
    """{'sparsity': fraction of zero weights over the decoder Linears, 'layers': n,
    ['pattern', 'pattern_kept']: fraction of N:M groups that hold}, or None without such weights.
    The pattern defaults to the one `toucan prune` recorded in the directory's manifest."""
    pattern = pattern or pruned_pattern(model_dir)
    n, m = map(int, pattern.split(":")) if pattern else (0, 0)
    zeros = total = layers = kept = groups = 0
    for _, w in iter_decoder_weights(model_dir):
        zeros, total, layers = zeros + int((w == 0).sum()), total + w.numel(), layers + 1
        if m:
            k, g = nm_kept(w, n, m)
            kept, groups = kept + k, groups + g
    if not layers:
        return None
    out = {"sparsity": zeros / total, "layers": layers}
    if m:
        out.update(pattern=pattern, pattern_kept=kept / max(1, groups))
    return out


# ----------------------------------------------------------------------------------------------
# The command

def _source_dtype(src: Path):
    """The dtype the source checkpoint declares (saved back in it, so a bf16 model stays bf16)."""
    import torch

    cj = json.loads((src / "config.json").read_text())
    name = cj.get("dtype") or cj.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def check_method(method: str, blocksize: int, data: str | None, calib_samples: int, damp_percent: float) -> None:
    """The method's settings, checked before any work (ConfigError names the flag)."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if method != "magnitude":
        check_calibration(method, data, calib_samples, damp_percent, ConfigError)
    if blocksize < 1:
        raise ConfigError(f"--blocksize {blocksize}: must be positive")


def prune_dir(model_dir: str, output: str, method: str, target: Target, *, data: str | None = None,
              calib_samples: int, max_len: int, template: str, seed: int, device: str = "auto",
              dtype: str = "auto", blocksize: int, damp_percent: float, overwrite: bool = False,
              trust_remote_code: bool = False, command: str = "prune", config=None) -> dict:
    """Prune the model in `model_dir` into `output` (atomically, with a `pruning` manifest section,
    which it returns); `config` is recorded in the manifest. Raises ConfigError/ModelError."""
    src = check_model_dir(model_dir)
    if is_quantized(src):
        raise ModelError(f"{model_dir} is quantized: prune the full-precision model, then quantize it")
    inputs = [src] + ([data] if method != "magnitude" else [])
    check_output(output, overwrite=overwrite, inputs=inputs)  # before the work, not after it
    tokenizer = load_tokenizer(src, trust_remote_code=trust_remote_code)
    seqs = None
    if method != "magnitude":  # the same calibration sources and code as `toucan quantize`
        seqs = calibration_samples(tokenizer, data, calib_samples, max_len, template, seed)
        log.info("calibration: %d sequences, %d tokens from %s", len(seqs), sum(map(len, seqs)), data)
    device = resolve_device(device)
    model = load_model(src, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    report = prune_model(model, seqs, method, target, blocksize=blocksize, damp_percent=damp_percent)
    seconds = time.perf_counter() - t0
    if not report["layers"]:
        raise ConfigError(f"{model_dir}: no layer can be pruned to {target}: "
                          + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items()))
    modules = dict(model.named_modules())
    pruned = sum(int((modules[n].weight == 0).sum()) for n in report["layers"])
    total = sum(modules[n].weight.numel() for n in report["layers"])
    src_dtype = _source_dtype(src)
    if src_dtype is not None and src_dtype.is_floating_point:
        model.to(src_dtype)  # a bf16 checkpoint stays bf16 (zeros stay zeros in any float dtype)
    pruning = {"method": method, "sparsity": target.sparsity, "pattern": target.pattern,
               "measured_sparsity": pruned / total, "layers": report["layers"],
               "skipped": report["skipped"],
               "blocksize": blocksize if method == "sparsegpt" else None,
               "damp_percent": damp_percent if method == "sparsegpt" else None,
               "calibration": None if seqs is None else {"file": str(data), "samples": len(seqs),
                                                         "tokens": sum(map(len, seqs))},
               "device": device, "seconds": round(seconds, 2)}
    save_model_dir(output, model, tokenizer, command=command, config=config, inputs=inputs,
                   overwrite=overwrite, manifest_extra={"pruning": pruning})
    return pruning
