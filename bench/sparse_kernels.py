"""2:4 on a GPU: prune a LLaMA-7B-shaped decoder stack with toucan's SparseGPT, then time its
forward pass with torch's semi-structured sparse kernels (CUTLASS / cuSPARSELt, CUDA only) against
the same pruned weights run dense, and check that both compute the same thing.

This is what 2:4 sparsity buys: sparse tensor cores skip half the multiply-adds of big matmuls
(prefill, large batches). It buys nothing on CPUs or in llama.cpp (dense kernels there).

    python3 bench/sparse_kernels.py                  # on a CUDA machine (bench/gpu.sh runs it)
    .venv/bin/python bench/sparse_kernels.py --dry-run  # CPU: tiny shapes, pruning path only, no timing
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from toucan.prune import Target, nm_kept, prune_model  # noqa: E402


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def timed(fn, device, reps):
    fn()  # warm-up (kernel selection, cuSPARSELt plans)
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU check of the script: tiny shapes, no sparse kernels")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of LLaMA-7B shape")
    ap.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--calib", type=int, default=16, help="random calibration sequences")
    ap.add_argument("--seq", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    if args.dry_run:
        device, dtype = "cpu", torch.float32
        args.hidden, args.mlp, args.heads, args.vocab, args.layers = 256, 768, 4, 1000, min(args.layers, 2)
        args.calib, args.seq = min(args.calib, 4), min(args.seq, 64)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: 2:4 sparse kernels are CUDA only (use --dry-run on a CPU)")
        device, dtype = "cuda", torch.float16  # the semi-structured kernels take fp16 / bf16
        args.hidden, args.mlp, args.heads, args.vocab = 4096, 11008, 32, 32000
    model = build(args, device, dtype)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, args.vocab, (args.calib, args.seq), generator=g).tolist()
    t0 = time.perf_counter()
    report = prune_model(model, seqs, args.method, Target(0.5, 2, 4), progress=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    prune_s = time.perf_counter() - t0
    layers = dict(model.named_modules())
    kept = [nm_kept(layers[n].weight, 2, 4) for n in report["layers"]]
    frac = sum(k for k, _ in kept) / sum(t for _, t in kept)
    print(f"{args.method} 2:4 on {args.layers} layers of hidden {args.hidden} / MLP {args.mlp} ({device}, {dtype}): "
          f"{prune_s:.1f} s, {len(report['layers'])} Linears, 2:4 groups kept {frac:.2%}, skipped {len(report['skipped'])}")
    if args.dry_run:
        assert frac == 1.0 and not report["skipped"]
        print("dry run: pruning path OK; the timing of dense vs semi-structured 2:4 kernels needs CUDA")
        return 0

    from torch.sparse import to_sparse_semi_structured

    stack = model.model
    rows = {}
    for tokens, batch in ((2048, 1), (512, 8), (1, 16)):
        x = torch.randint(3, args.vocab, (batch, tokens), device=device)
        with torch.inference_mode():
            rows[(batch, tokens)] = {"dense": timed(lambda: stack(x, use_cache=False), device, args.reps)}
    with torch.inference_mode():
        probe = torch.randint(3, args.vocab, (1, 256), device=device)
        ref = stack(probe, use_cache=False).last_hidden_state.float()
    for n in report["layers"]:  # the same pruned weights, now in the compressed 2:4 layout
        mod = layers[n]
        mod.weight = torch.nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
    with torch.inference_mode():
        out = stack(probe, use_cache=False).last_hidden_state.float()
    err = float((out - ref).abs().max() / ref.abs().max())
    for (batch, tokens), r in rows.items():
        x = torch.randint(3, args.vocab, (batch, tokens), device=device)
        with torch.inference_mode():
            r["2:4"] = timed(lambda: stack(x, use_cache=False), device, args.reps)
    print(f"{'batch x tokens':>15} {'dense ms':>9} {'2:4 ms':>9} {'speed-up':>9}")
    for (batch, tokens), r in rows.items():
        print(f"{batch:>6} x {tokens:<6} {r['dense'] * 1e3:9.2f} {r['2:4'] * 1e3:9.2f} {r['dense'] / r['2:4']:9.2f}x")
    print(f"max |2:4 - dense| / max |dense| of the stack's output: {err:.2e}")
    return 0 if err < 2e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
