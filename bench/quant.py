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
from toucan.quant import run_quantize  # noqa: E402

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
    """A hidden-256 LLaMA trained on the chat-rendered records (plain AdamW loop, one-cycle LR)."""
    want = {"steps": args.train_steps, "seed": seed, "seq": args.train_seq, "batch": args.train_batch,
            "layers": args.layers}
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
    data = torch.tensor(ids)
    steps, device, seq = args.train_steps, args.device, args.train_seq
    model = tiny_llama(len(tok), seed=seed, tokenizer=tok, hidden_size=256, num_hidden_layers=args.layers,
                       num_attention_heads=4, intermediate_size=768).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (args.train_batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts]).to(device)
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            print(f"train step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # overwrite: a model this bench trained before with other settings (checked above) is replaced
    save_model_dir(out / "fp32", model.float().cpu().eval(), tok, command="bench-quant-train",
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="fp32 model directory to use instead of training one")
    ap.add_argument("--data", default=str(SHARED / "data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quant"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--train-steps", type=int, default=650)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="training seed of the benchmark model")
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out windows of ctx tokens to score (0 = all)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-max-len", type=int, help="default: --ctx")
    ap.add_argument("--ctx", type=int, help="scoring window; default: --train-seq (512 with --model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
