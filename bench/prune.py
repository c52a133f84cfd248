"""Pruning benchmark: magnitude vs Wanda vs SparseGPT at 50 % unstructured and 2:4, and 2:4
composed with 4-bit GPTQ, on bench/quant.py's trained model (trained there once and cached).

For each variant: KL(dense || variant) and perplexity change on held-out text, measured sparsity,
the fraction of 2:4 groups that hold, and the wall time of the method; printed beside the
baselines measured in the same run (magnitude for Wanda, Wanda for SparseGPT, 2:4 alone and 4-bit
alone for 2:4 + 4-bit) as ratios. Acceptance (issue 14): Wanda 50 %'s KL <= 0.5x magnitude 50 %'s;
SparseGPT 2:4's KL <= Wanda 2:4's; 2:4 + GPTQ 4-bit keeps the pattern in 100 % of groups.

    .venv/bin/python bench/prune.py                  # CPU: trains bench/quant's model if not cached
    .venv/bin/python bench/prune.py --device cuda    # the same on a GPU (bench/gpu.sh)

Speed is not measured here: on a CPU (and in llama.cpp) a pruned model runs exactly as fast as the
dense one, because dense kernels multiply the zeros too. bench/gpu.sh times 2:4 kernels on a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from toucan.config import PruneConfig, QuantizeConfig  # noqa: E402
from toucan.manifest import read_manifest  # noqa: E402
from toucan.modeling import load_model, load_tokenizer  # noqa: E402
from toucan.ppl import evaluate, load_sequences  # noqa: E402
from toucan.commands.prune import run as run_prune  # noqa: E402
from toucan.prune import iter_decoder_weights, measure_sparsity  # noqa: E402
from toucan.commands.quantize import run as run_quantize  # noqa: E402


def bench_quant():
    """bench/quant.py as a module: its data split and its cached, trained model."""
    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "bench" / "quant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def zeros_kept(src: Path, dst: Path) -> float:
    """Fraction of src's zero weights that are still exactly zero in dst (dequantized)."""
    a, b = dict(iter_decoder_weights(src)), dict(iter_decoder_weights(dst))
    z = sum(int((w == 0).sum()) for n, w in a.items() if n in b)
    kept = sum(int((b[n][w == 0] == 0).sum()) for n, w in a.items() if n in b)
    return kept / max(1, z)


def activation_spread(model, seqs) -> dict[str, float]:
    """max / median of the input-column norms ||X_j||_2 of each kind of decoder Linear (the largest
    over the layers), on the calibration sequences. Wanda differs from magnitude only where this is
    large: LLaMA-7B's outlier features reach ~100x; a small model trained briefly has few."""
    from toucan.prune import InputStats

    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            stats[name] = InputStats(mod.in_features, "cpu", hessian=False)
            hooks.append(mod.register_forward_hook(lambda _m, a, _o, s=stats[name]: s.add(a[0].cpu())))
    with torch.inference_mode():
        for ids in seqs:
            model(torch.tensor([ids], device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    out: dict[str, float] = {}
    for name, st in stats.items():
        kind = name.split(".layers.")[1].split(".", 1)[1]
        norms = st.sq.sqrt()
        out[kind] = max(out.get(kind, 0.0), float(norms.max() / norms.median()))
    return out


def main() -> int:
    bq = bench_quant()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bq.add_model_args(ap, out_help="bench/quant.py's folder (its trained model is reused); results go to OUT/prune/")
    ap.add_argument("--ctx", type=int, default=512, help="calibration and scoring window")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} missing: this benchmark needs ../shared (or --data FILE)")
    bq.write_data(out, Path(args.data))
    dense = Path(args.model) if args.model else bq.train(out, args, seed=args.seed)
    work = out / "prune"
    calib = out / "train.jsonl"
    tok = load_tokenizer(dense)
    seqs = load_sequences(tok, out / "heldout.txt", ctx=args.ctx, stride=args.ctx, template="alpaca",
                          max_samples=args.eval_windows)
    ref = load_model(dense, device=args.device)
    base = evaluate(ref, seqs, desc="dense")
    from toucan.quant.calib import calibration_samples

    spread = activation_spread(ref, calibration_samples(tok, calib, 32, args.ctx, "alpaca"))

    def prune(name, method, **kw):
        cfg = PruneConfig(model=str(dense), output=str(work / name), method=method, data=str(calib),
                          calib_samples=args.calib_samples, max_len=args.ctx, device=args.device,
                          overwrite=True, **kw)
        t0 = time.perf_counter()
        run_prune(cfg)
        return work / name, time.perf_counter() - t0, read_manifest(work / name)["pruning"]["seconds"]

    def quantize(name, src, **kw):
        cfg = QuantizeConfig(model=str(src), output=str(work / name), bits=4, group_size=128, data=str(calib),
                             calib_samples=args.calib_samples, max_len=args.ctx, device=args.device,
                             overwrite=True, **kw)
        t0 = time.perf_counter()
        run_quantize(cfg)
        return work / name, time.perf_counter() - t0, read_manifest(work / name)["quantization"]["seconds"]

    rows = {}

    def score(name, d, wall, method_s, src=None):
        model = load_model(d, device=args.device)
        r = evaluate(model, seqs, reference=ref, desc=name)
        del model
        sp = measure_sparsity(d, "2:4")
        rows[name] = dict(kl=r["kl"], ppl=r["ppl"], dppl=r["ppl"] - base["ppl"], sparsity=sp["sparsity"],
                          kept24=sp["pattern_kept"], zeros_kept=zeros_kept(src, d) if src else None,
                          wall_s=wall, method_s=method_s)

    for pat, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))):
        for method in ("magnitude", "wanda", "sparsegpt"):
            name = f"{method} {pat}"
            d, wall, s = prune(name.replace(" ", "-").replace("%", "pct").replace(":", "of"), method, **kw)
            score(name, d, wall, s)
    d24 = work / "sparsegpt-2of4"  # the best 2:4 model, quantized below
    q, wall, s = quantize("gptq4", dense)
    score("GPTQ 4-bit g128", q, wall, s)
    q, wall, s = quantize("sparsegpt-2of4-gptq4", d24)
    score("sparsegpt 2:4 + GPTQ 4-bit", q, wall, s, src=d24)
    q, wall, s = quantize("sparsegpt-2of4-gptq4-plain", d24, keep_sparsity=False)
    score("  (plain GPTQ, --no-keep-sparsity)", q, wall, s, src=d24)

    print(f"\nheld-out: {base['tokens']} tokens, ctx {args.ctx}; dense ppl {base['ppl']:.4f}; calibration "
          f"{args.calib_samples} x <= {args.ctx} tokens; device {args.device}, {args.threads} threads")
    print(f"{'variant':36} {'KL(dense||v)':>12} {'ppl':>9} {'dppl':>8} {'sparsity':>8} {'2:4 kept':>8} "
          f"{'zeros kept':>10} {'method s':>8} {'wall s':>7}")
    for name, r in rows.items():
        zk = f"{r['zeros_kept']:10.2%}" if r["zeros_kept"] is not None else f"{'':>10}"
        print(f"{name:36} {r['kl']:12.4e} {r['ppl']:9.4f} {r['dppl']:+8.4f} {r['sparsity']:8.2%} "
              f"{r['kept24']:8.2%} {zk} {r['method_s']:8.1f} {r['wall_s']:7.1f}")
    kl = {k: v["kl"] for k, v in rows.items()}
    r1 = kl["wanda 50%"] / kl["magnitude 50%"]
    r2 = kl["sparsegpt 2:4"] / kl["wanda 2:4"]
    combo = rows["sparsegpt 2:4 + GPTQ 4-bit"]
    ok1, ok2, ok3 = r1 <= 0.5, r2 <= 1.0, combo["kept24"] == 1.0 and combo["zeros_kept"] == 1.0
    print(f"\nWanda 50% KL / magnitude 50% KL = {r1:.3f} (need <= 0.5): {'PASS' if ok1 else 'FAIL'}")
    print(f"SparseGPT 2:4 KL / Wanda 2:4 KL = {r2:.3f} (need <= 1): {'PASS' if ok2 else 'FAIL'}")
    print("input-column norm spread max/median (largest over layers): "
          + ", ".join(f"{k} {v:.1f}x" for k, v in spread.items()))
    print(f"SparseGPT 50% KL / Wanda 50% KL = {kl['sparsegpt 50%'] / kl['wanda 50%']:.3f} (reported)")
    print(f"2:4 + GPTQ 4-bit: 2:4 groups kept {combo['kept24']:.2%}, zeros kept {combo['zeros_kept']:.2%} "
          f"(need 100 %): {'PASS' if ok3 else 'FAIL'}; KL {combo['kl']:.4e} = "
          f"{combo['kl'] / kl['sparsegpt 2:4']:.3f}x 2:4 alone, {combo['kl'] / kl['GPTQ 4-bit g128']:.2f}x 4-bit alone")
    plain = rows["  (plain GPTQ, --no-keep-sparsity)"]
    print(f"plain GPTQ on the same 2:4 model: 2:4 groups kept {plain['kept24']:.2%}, zeros kept "
          f"{plain['zeros_kept']:.2%}, KL {plain['kl']:.4e}")
    (work / "results.json").write_text(json.dumps({"dense_ppl": base["ppl"], "rows": rows, "spread": spread, "args": vars(args)},
                                                  indent=2))
    return 0 if ok1 and ok2 and ok3 else 1


if __name__ == "__main__":
    sys.exit(main())
