"""Quantization benchmark: fp32 vs RTN-4bit-g128 vs GPTQ-4bit-g128 (with and without act-order).

For each: perplexity and KL(fp32 || quantized) on held-out text, quantization time, weights on
disk, CPU (or GPU) decode tokens/s; printed beside the fp32 / RTN baselines measured in the same
run, as ratios. Acceptance: GPTQ's KL <= 0.5x RTN's, and its perplexity increase <= RTN's.

The model: --model DIR (e.g. runs/demo's), or a LLaMA of hidden 256 (g128 needs layers >= 128
wide; MLP 768 is a multiple of 128) trained here with a plain torch loop on ../shared's
alpaca_zh_demo records rendered in the chat format. Records 0..899 train it and calibrate GPTQ
(the same 128 samples for every method that uses them); 900..999 are the held-out text.

The model is trained on windows of --train-seq tokens and scored (and calibrated) on windows of
the same length: positions it never saw in training would measure RoPE extrapolation, not the
quantizer. (An earlier version trained on 128 and scored on 512; there rounding noise happened to
*lower* the perplexity of the out-of-range positions, and the Δppl comparison meant nothing.)

    .venv/bin/python bench/quant.py                   # CPU, ~4 min on 2 idle cores (1.5 min once trained)
    .venv/bin/python bench/quant.py --device cuda     # GPU variant (bench/gpu.sh)

--sweep (issue 16) trains SWEEP_MODELS (several shapes, odd MLP widths among them) and measures
every SWEEP_VARIANTS row (sym/asym, act-order, damping, MSE scale search, GPTAQ, calibration count
and length) against RTN of the same bits/group/symmetry: how QuantizeConfig's defaults were chosen.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quant.py --sweep --threads 1 --train-steps 400 --train-seq 256 --train-batch 4
    OMP_NUM_THREADS=1 .venv/bin/python bench/quant.py --sweep --group-size 128 --out runs/bench-quant-g128 \
        --threads 1 --train-steps 500 --train-seq 256 --train-batch 4
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from toucan.config import QuantizeConfig  # noqa: E402
from toucan.manifest import read_manifest  # noqa: E402
from toucan.data import encode_prompt, encode_record, iter_records, record_prompt  # noqa: E402
from toucan.modeling import load_model, load_tokenizer, save_model_dir, tiny_llama  # noqa: E402
from toucan.ppl import evaluate, load_sequences  # noqa: E402
from toucan.prompts import build_prompt  # noqa: E402
from toucan.training import fit, prepare_model, training_arguments  # noqa: E402
from toucan.commands.quantize import run as run_quantize  # noqa: E402

SHARED = ROOT.parent / "shared"
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny_tokenizer"


def write_data(out: Path, data: Path) -> None:
    recs = list(iter_records(data))
    train, held = recs[:900], recs[900:]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for r in train:
            f.write(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output},
                               ensure_ascii=False) + "\n")
    # held-out *text*: the rendered chat (prompt + answer) of records the model never saw
    (out / "heldout.txt").write_text("\n\n".join(record_prompt(r) + r.output for r in held), encoding="utf-8")


def train(out: Path, args, seed: int = 0) -> Path:
    """A hidden-256 LLaMA trained on the chat-rendered records, by toucan.training.fit (the function
    `toucan train` calls): random --train-seq windows of the token stream, every token a label (the
    held-out score is on whole texts), AdamW with a cosine schedule after a 5% warm-up."""
    want = {"steps": args.train_steps, "seed": seed, "seq": args.train_seq, "batch": args.train_batch,
            "layers": args.layers, "trainer": "toucan.training.fit"}
    shape = dict(hidden_size=getattr(args, "hidden", 256), intermediate_size=getattr(args, "mlp", 768),
                 num_attention_heads=getattr(args, "heads", 4))
    if shape != dict(hidden_size=256, intermediate_size=768, num_attention_heads=4):  # the --sweep models
        want.update(shape)
    if (out / "fp32" / "toucan.json").is_file():
        had = read_manifest(out / "fp32").get("config") or {}
        if all(had.get(k) == v for k, v in want.items()):
            print(f"using the model trained before: {out / 'fp32'}")
            return out / "fp32"
        print(f"{out / 'fp32'} was trained with other settings ({had}): training again")
    tok = load_tokenizer(TOKENIZER)
    ids = []
    for r in iter_records(out / "train.jsonl"):
        ids += encode_record(tok, r, 10_000).input_ids
    steps, seq = args.train_steps, args.train_seq
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq - 1, (steps * args.train_batch,), generator=g).tolist()
    windows = [{"input_ids": ids[s:s + seq], "labels": ids[s:s + seq]} for s in starts]  # one pass: each step new windows
    model = tiny_llama(len(tok), seed=seed, tokenizer=tok, num_hidden_layers=args.layers, **shape)
    prepare_model(model, tok)
    targs = training_arguments(out / "fp32-checkpoints", per_device_train_batch_size=args.train_batch,
                               max_steps=steps, learning_rate=2e-3, weight_decay=0.01, lr_scheduler_type="cosine",
                               warmup_steps=0.05, max_grad_norm=1.0, logging_steps=25, save_strategy="no",
                               seed=seed, report_to="none", use_cpu=args.device == "cpu")
    t0 = time.perf_counter()
    res = fit(model, tok, windows, targs)
    print(f"trained {steps} steps, losses logged {[round(x, 3) for x in res.losses[-3:]]} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # overwrite: a model this bench trained before with other settings (checked above) is replaced
    save_model_dir(out / "fp32", res.saveable.float().cpu().eval(), tok, command="bench-quant-train",
                   config={**want, "seconds": round(time.perf_counter() - t0)}, overwrite=True)
    return out / "fp32"


def dir_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def decode_tok_s(model, tok, device: str, new_tokens: int) -> float:
    ids = encode_prompt(tok, build_prompt("介绍一下北京。"))
    x = {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), device=device)}
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(**x, max_new_tokens=4, do_sample=False)  # warm-up (kernel repacking, caches)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(5):  # median of 5: one 64-token run is a fraction of a second, at the mercy of the box
        t0 = time.perf_counter()
        model.generate(**x, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


# --sweep (issue 16): the GPTQ defaults chosen by measurement on several trained shapes.
SWEEP_MODELS = {  # name: shape; each trained here on the same records (cached in OUT/sweep/NAME/fp32)
    "h64-l5-mlp172": dict(hidden=64, layers=5, mlp=172, heads=4),  # odd MLP width (zero-padded to 192 for g32)
    "h128-l2-mlp512": dict(hidden=128, layers=2, mlp=512, heads=4),  # wide and shallow, MLP ratio 4
    "h96-l3-mlp256": dict(hidden=96, layers=3, mlp=256, heads=4),  # MLP ratio 2.67, head_dim 24
    # for g128 (the default group size: every input width must be a multiple of 128)
    "h128-l4-mlp344": dict(hidden=128, layers=4, mlp=344, heads=4),  # odd MLP width (padded to 384 for g128)
    "h256-l2-mlp688": dict(hidden=256, layers=2, mlp=688, heads=4),  # MLP ratio 2.69 (LLaMA's), padded to 768
}
SWEEP_G32 = ["h64-l5-mlp172", "h128-l2-mlp512", "h96-l3-mlp256"]
SWEEP_G128 = ["h128-l4-mlp344", "h128-l2-mlp512", "h256-l2-mlp688"]
# Every variant spells out all its settings (not QuantizeConfig's defaults, which this sweep chooses),
# so "GPTQ old default" stays the pre-issue-16 default: sym, natural order, damp 0.05, 128 samples.
OLD_DEFAULT = dict(method="gptq", sym=True, desc_act=False, damp_percent=0.05, mse=0.0, gptaq=False,
                   calib_samples=128)


def _v(**kw):
    return {**OLD_DEFAULT, **kw}


SWEEP_VARIANTS = {
    "RTN sym": dict(method="rtn", sym=True),
    "RTN asym": dict(method="rtn", sym=False),
    "GPTQ old default": _v(),
    "GPTQ sym act-order": _v(desc_act=True),
    "GPTQ sym damp0.01": _v(damp_percent=0.01),
    "GPTQ sym damp0.1": _v(damp_percent=0.1),
    "GPTQ sym mse2.4": _v(mse=2.4),
    "GPTQ sym gptaq": _v(gptaq=True),
    "GPTQ sym calib32": _v(calib_samples=32),
    "GPTQ sym calib256": _v(calib_samples=256),
    "GPTQ sym len64": _v(max_len=64),
    "GPTQ asym": _v(sym=False),
    "GPTQ asym act-order": _v(sym=False, desc_act=True),
    "GPTQ asym mse2.4": _v(sym=False, mse=2.4),
    "GPTQ sym act-order mse2.4": _v(desc_act=True, mse=2.4),
    "GPTQ asym act-order mse2.4": _v(sym=False, desc_act=True, mse=2.4),
    "GPTQ asym damp0.1": _v(sym=False, damp_percent=0.1),
    "GPTQ asym act-order damp0.1": _v(sym=False, desc_act=True, damp_percent=0.1),
    "GPTQ asym act-order mse2.4 damp0.1": _v(sym=False, desc_act=True, mse=2.4, damp_percent=0.1),
    "GPTQ asym act-order gptaq": _v(sym=False, desc_act=True, gptaq=True),
    "GPTQ asym act-order mse2.4 gptaq": _v(sym=False, desc_act=True, mse=2.4, gptaq=True),
    "config default": dict(method="gptq"),  # whatever config.py's QuantizeConfig says now
}


def sweep(args) -> int:
    """Each SWEEP_VARIANTS row on each SWEEP_MODELS model at --bits/--group-size: KL(fp32 || q) and Δppl
    on the held-out text, GPTQModel's quantize seconds; each GPTQ row's KL as a ratio to RTN's with
    the same symmetry, measured in the same run. Results accumulate in OUT/sweep/results.json (a rerun
    measures only the rows it lacks; --variants picks rows)."""
    out = Path(args.out) / "sweep"
    write_data(out, Path(args.data))
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    names = args.models.split(",") if args.models else SWEEP_G32 if args.group_size < 128 else SWEEP_G128
    if args.report:
        return sweep_report(results, names, args)
    variants = [v for v in SWEEP_VARIANTS if not args.variants or v in args.variants.split(",")]
    for mname in names:
        shape = SWEEP_MODELS[mname]
        targs = argparse.Namespace(**{**vars(args), **shape})
        write_data(out / mname, Path(args.data))  # train() reads its records from its own folder
        fp32 = train(out / mname, targs, seed=args.seed)
        tok = load_tokenizer(fp32)
        seqs = load_sequences(tok, out / "heldout.txt", ctx=args.ctx, stride=args.ctx, template="alpaca",
                              max_samples=args.eval_windows)
        ref = load_model(fp32, device=args.device)
        rows = results.setdefault(mname, {})
        if "fp32" not in rows:
            rows["fp32"] = dict(ppl=evaluate(ref, seqs, desc="fp32")["ppl"], mib=dir_mib(fp32))
        for vname in variants:
            if vname in rows and not (args.redo and vname in args.redo.split(",")):
                continue
            kw = {k: v for k, v in SWEEP_VARIANTS[vname].items()}
            kw.setdefault("max_len", args.ctx)
            if "sym" in kw:
                kw["asym"] = not kw["sym"]
            qdir = out / mname / "q"
            cfg = QuantizeConfig(model=str(fp32), output=str(qdir), bits=args.bits, group_size=args.group_size,
                                 data=str(out / "train.jsonl"), device=args.device, overwrite=True, **kw)
            try:
                run_quantize(cfg)
            except Exception as e:  # a variant GPTQModel cannot run here is a row, not the end of the sweep
                rows[vname] = dict(error=f"{type(e).__name__}: {e}"[:300])
                print(f"{mname} {vname}: FAILED {rows[vname]['error']}", flush=True)
                continue
            q = read_manifest(qdir)["quantization"]
            model = load_model(qdir, device=args.device)
            r = evaluate(model, seqs, reference=ref, desc=f"{mname} {vname}")
            del model
            rows[vname] = dict(ppl=r["ppl"], kl=r["kl"], quant_s=q["seconds"], mib=dir_mib(qdir),
                               sym=q["sym"], settings={k: getattr(cfg, k) for k in (
                                   "method", "sym", "desc_act", "damp_percent", "mse", "gptaq",
                                   "calib_samples", "max_len")},
                               full_precision=len(q["full_precision_layers"]), padding=q.get("mlp_padding"))
            print(f"{mname} {vname}: KL {r['kl']:.3e} ppl {r['ppl']:.4f} ({q['seconds']:.1f} s)", flush=True)
            res_path.write_text(json.dumps(results, indent=2))
        res_path.write_text(json.dumps(results, indent=2))
    return sweep_report(results, names, args)


def sweep_report(results: dict, names: list[str], args) -> int:
    print(f"\n{args.bits}-bit g{args.group_size}; ctx {args.ctx}; device {args.device}, {args.threads} torch threads")
    table = {}  # variant -> model -> (KL / RTN same sym, dppl, dppl RTN same sym, KL / old default)
    for m in names:
        rows = results[m]
        base = rows["fp32"]["ppl"]
        print(f"\n{m}: fp32 ppl {base:.4f}, {rows['fp32']['mib']:.2f} MiB (markdown: bench/RESULTS.md)\n")
        print("| variant | KL(fp32‖q) | KL / RTN same sym | Δppl | Δppl RTN same sym | KL / old default | quant s "
              "| MiB | size / fp32 |\n|---|---|---|---|---|---|---|---|---|")
        old = rows.get("GPTQ old default", {}).get("kl")
        for v, r in rows.items():
            if v == "fp32" or v not in SWEEP_VARIANTS:
                continue
            if "error" in r:
                print(f"| {v} | failed: {r['error']} |")
                continue
            rtn = rows.get("RTN sym" if r["sym"] else "RTN asym")
            ratio = r["kl"] / rtn["kl"] if rtn and "kl" in rtn else math.nan
            d, d_rtn = r["ppl"] - base, (rtn["ppl"] - base if rtn and "ppl" in rtn else math.nan)
            vs_old = r["kl"] / old if old else math.nan
            table.setdefault(v, {})[m] = (ratio, d, d_rtn, vs_old)
            print(f"| {v} | {r['kl']:.3e} | {ratio:.3f} | {d:+.4f} | {d_rtn:+.4f} | {vs_old:.3f} | "
                  f"{r['quant_s']:.1f} | {r['mib']:.3f} | {r['mib'] / rows['fp32']['mib']:.3f} |")
    print("\n| variant (all models) | mean KL / RTN | max KL / RTN | Δppl <= RTN on all | max KL / old default "
          "| mean quant s | <= 0.45x, <= RTN, <= old |\n|---|---|---|---|---|---|---|")
    for v, per in table.items():
        if v.startswith("RTN") or len(per) < len(names):
            continue
        ratios = [x[0] for x in per.values()]
        ok_ppl = all(x[1] <= x[2] for x in per.values())
        worst_old = max(x[3] for x in per.values())
        ok = max(ratios) <= 0.45 and ok_ppl and worst_old <= 1.0
        secs = statistics.mean(results[m][v]["quant_s"] for m in names)
        print(f"| {v} | {statistics.mean(ratios):.3f} | {max(ratios):.3f} | {'yes' if ok_ppl else 'no'} | "
              f"{worst_old:.3f} | {secs:.1f} | {'PASS' if ok else '-'} |")
    cd = table.get("config default")
    if cd and len(cd) == len(names):
        ok = all(x[0] <= 0.45 and x[1] <= x[2] for x in cd.values())
        print(f"\nconfig default: KL <= 0.45x RTN (same bits/group/sym) and dppl <= RTN's on every model: "
              f"{'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    return 0


def add_model_args(ap: argparse.ArgumentParser, out_help: str | None) -> None:
    """The benchmark model's options, shared with bench/prune.py (which reuses the model this
    script trains: the cached model is reused only when these settings match)."""
    ap.add_argument("--model", help="fp32 model directory to use instead of training one")
    ap.add_argument("--data", default=str(SHARED / "data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quant"), help=out_help)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--train-steps", type=int, default=650)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the benchmark model")
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows of ctx tokens to score (0 = all)")
    ap.add_argument("--calib-samples", type=int, default=128)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, out_help=None)
    ap.add_argument("--calib-max-len", type=int, help="default: --ctx")
    ap.add_argument("--ctx", type=int, help="scoring window; default: --train-seq (512 with --model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="issue 16: the GPTQ settings sweep over SWEEP_MODELS")
    ap.add_argument("--models", help="--sweep: comma-separated SWEEP_MODELS names (default: SWEEP_G32, or SWEEP_G128 for --group-size >= 128)")
    ap.add_argument("--variants", help="--sweep: comma-separated SWEEP_VARIANTS names (default: all)")
    ap.add_argument("--redo", help="--sweep: comma-separated variants to measure again")
    ap.add_argument("--report", action="store_true", help="--sweep: only print the tables of OUT/sweep/results.json")
    ap.add_argument("--bits", type=int, default=4, help="--sweep")
    ap.add_argument("--group-size", type=int, default=32, help="--sweep (32: the sweep models are 64-128 wide)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.sweep:
        args.ctx = args.ctx or args.train_seq
        if args.ctx > args.train_seq:
            sys.exit(f"--ctx {args.ctx} > --train-seq {args.train_seq}: the model never saw those positions")
        if not Path(args.data).is_file():
            sys.exit(f"{args.data} missing: this benchmark needs ../shared (or --data FILE)")
        return sweep(args)
    args.ctx = args.ctx or (512 if args.model else args.train_seq)
    args.calib_max_len = args.calib_max_len or args.ctx
    if not args.model and args.ctx > args.train_seq:
        sys.exit(f"--ctx {args.ctx} > --train-seq {args.train_seq}: the model never saw those positions")
    out = Path(args.out)
    if not Path(args.data).is_file():
        sys.exit(f"{args.data} missing: this benchmark needs ../shared (or --data FILE)")
    write_data(out, Path(args.data))
    fp32 = Path(args.model) if args.model else train(out, args, seed=args.seed)
    tok = load_tokenizer(fp32)
    seqs = load_sequences(tok, out / "heldout.txt", ctx=args.ctx, stride=args.ctx, template="alpaca",
                          max_samples=args.eval_windows)

    variants = {
        "RTN-4bit-g128": dict(method="rtn"),
        "GPTQ-4bit-g128": dict(method="gptq"),
        "GPTQ-4bit-g128-act-order": dict(method="gptq", desc_act=True),
    }
    rows = {}
    ref = load_model(fp32, device=args.device)
    base = evaluate(ref, seqs, desc="fp32")
    rows["fp32"] = dict(ppl=base["ppl"], kl=0.0, quant_s=0.0, mib=dir_mib(fp32),
                        tok_s=decode_tok_s(ref, tok, args.device, args.new_tokens))
    for name, kw in variants.items():
        qdir = out / name
        cfg = QuantizeConfig(model=str(fp32), output=str(qdir), bits=4, group_size=128,
                             data=str(out / "train.jsonl"), calib_samples=args.calib_samples,
                             max_len=args.calib_max_len, device=args.device, overwrite=True, **kw)
        t0 = time.perf_counter()
        run_quantize(cfg)
        quant_s = time.perf_counter() - t0
        model = load_model(qdir, device=args.device)
        r = evaluate(model, seqs, reference=ref, desc=name)
        rows[name] = dict(ppl=r["ppl"], kl=r["kl"], quant_s=quant_s, mib=dir_mib(qdir),
                          tok_s=decode_tok_s(model, tok, args.device, args.new_tokens))
        del model

    print(f"\nheld-out: {seqs and sum(sum(m[1:]) for _, m in seqs)} tokens, ctx {args.ctx} stride {args.ctx}; "
          f"calibration: {args.calib_samples} x <= {args.calib_max_len} tokens; device {args.device}, "
          f"{args.threads} threads")
    print(f"{'variant':26} {'ppl':>9} {'dppl':>8} {'KL(fp32||q)':>12} {'KL/RTN':>7} {'quant s':>8} "
          f"{'MiB':>7} {'size/fp32':>9} {'tok/s':>7} {'tok/s/fp32':>10}")
    rtn = rows["RTN-4bit-g128"]
    for name, r in rows.items():
        dppl = r["ppl"] - base["ppl"]
        print(f"{name:26} {r['ppl']:9.4f} {dppl:+8.4f} {r['kl']:12.3e} {r['kl'] / rtn['kl']:7.3f} "
              f"{r['quant_s']:8.1f} {r['mib']:7.2f} {r['mib'] / rows['fp32']['mib']:9.3f} "
              f"{r['tok_s']:7.1f} {r['tok_s'] / rows['fp32']['tok_s']:10.2f}")
    g = rows["GPTQ-4bit-g128"]
    kl_ratio = g["kl"] / rtn["kl"]
    d_g, d_r = g["ppl"] - base["ppl"], rtn["ppl"] - base["ppl"]
    ok1, ok2 = kl_ratio <= 0.5, d_g <= d_r
    print(f"\nGPTQ-4bit-g128 KL / RTN-4bit-g128 KL = {kl_ratio:.3f} (need <= 0.5): {'PASS' if ok1 else 'FAIL'}")
    print(f"perplexity increase GPTQ {d_g:+.4f} vs RTN {d_r:+.4f} (ratio {d_g / d_r if d_r else math.nan:.3f}, "
          f"need GPTQ <= RTN): {'PASS' if ok2 else 'FAIL'}")
    print(f"|perplexity change|: GPTQ {abs(d_g):.4f} vs RTN {abs(d_r):.4f} (GPTQ stays closer to fp32: "
          f"{'yes' if abs(d_g) <= abs(d_r) else 'no'})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "kl_ratio": kl_ratio, "args": vars(args)}, indent=2))
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
