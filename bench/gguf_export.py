"""`toucan export gguf` benchmark: fidelity of the GGUF files in llama.cpp, and the exporter's memory.

Fidelity, on a model trained by bench/quant.py's recipe (hidden 256, 2 layers, --train-steps on
windows of --ctx tokens; cached in runs/bench-gguf/fp32; its held-out text, windows of --ctx): llama.cpp's logits (logits_all) for f16 / q8_0 / q4_0
exports against the HF fp32 model: mean per-token KL(fp32 || gguf), max |logit difference|, argmax
agreement. Then toucan's GPTQ 4-bit sym g32 (no act-order), exported to q4_0 (exact blocks, no
second rounding), against the direct q4_0 export of the fp32 model, both in llama.cpp, same text.
Acceptance: f16 matches; q8_0's KL <= q4_0's / 10; GPTQ-g32 -> q4_0 KL < direct q4_0 KL.

Memory: a LLaMA of ~1.1 B parameters (hidden 2048, 22 layers, MLP 5632, vocab 32000: TinyLlama's
shape) with random bf16 weights, written tensor by tensor, exported to q4_0 and f16 in a child
process; its peak RSS (ru_maxrss) beside the budget "largest tensor (fp32) + 1.5 GB" and beside
the RSS of the same child that only imports torch + gguf (the interpreter's floor).

    .venv/bin/python bench/gguf_export.py                 # both parts, ~10 min on 2 cores once trained
    .venv/bin/python bench/gguf_export.py --skip-memory   # (training the model first: ~13 min idle)

A copy of bench/quant.py's runs/bench-quant/fp32 in runs/bench-gguf/fp32 is used as is when its
manifest records the same recipe (the training is the slow part on a busy box).
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import quant  # noqa: E402  (bench/quant.py: its data split and trained model)
from toucan.config import QuantizeConfig  # noqa: E402
from toucan.gguf_export import export_gguf  # noqa: E402
from toucan.modeling import load_model, load_tokenizer  # noqa: E402
from toucan.ppl import load_sequences  # noqa: E402
from toucan.commands.quantize import run as run_quantize  # noqa: E402

SHARED = ROOT.parent / "shared"


def logsoftmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    kls, diffs, agree, n = [], 0.0, 0, 0
    for r, g in zip(ref, got):
        lr, lg = logsoftmax(r), logsoftmax(g)
        kls.append((np.exp(lr) * (lr - lg)).sum(-1))
        diffs = max(diffs, float(np.abs(r - g).max()))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        n += r.shape[0]
    return {"kl": float(np.concatenate(kls).mean()), "max_abs": diffs, "argmax": agree / n, "tokens": n}


def hf_logits(model_dir: Path, seqs) -> list[np.ndarray]:
    model = load_model(model_dir, device="cpu")
    out = []
    with torch.inference_mode():
        for ids in seqs:
            out.append(model(torch.tensor([ids])).logits[0].double().numpy())
    return out


def llama_logits(path: Path, seqs, threads: int, n_ctx: int) -> list[np.ndarray]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=threads, n_batch=n_ctx,
                verbose=False)
    out = []
    try:
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[:len(ids)], dtype=np.float64))
    finally:
        llm.close()
    return out


def fidelity(args) -> dict:
    out = Path(args.out)
    qargs = argparse.Namespace(train_steps=args.train_steps, train_seq=args.ctx, train_batch=2, layers=2,
                               device="cpu")
    quant.write_data(out, Path(args.data))
    fp32 = quant.train(out, qargs)
    tok = load_tokenizer(fp32)
    seqs = load_sequences(tok, out / "heldout.txt", ctx=args.ctx, stride=args.ctx, template="alpaca",
                          max_samples=args.windows)
    seqs = [list(map(int, ids)) for ids, _ in seqs]  # stride = ctx: every position of every window
    ref = hf_logits(fp32, seqs)
    res = {}
    g = out / "gguf"
    g.mkdir(exist_ok=True)
    for t in ("f16", "q8_0", "q4_0"):
        f = g / f"fp32-{t}.gguf"
        export_gguf(fp32, f, t, overwrite=True)
        res[f"fp32 -> {t}"] = compare(ref, llama_logits(f, seqs, args.threads, args.ctx))
    qdir = out / "GPTQ-4bit-g32"
    if not (qdir / "toucan.json").is_file():
        run_quantize(QuantizeConfig(model=str(fp32), output=str(qdir), bits=4, group_size=32, sym=True,
                                    data=str(out / "train.jsonl"), calib_samples=128, max_len=args.ctx,
                                    device="cpu", overwrite=True))
    res["GPTQ-g32 (transformers)"] = compare(ref, hf_logits(qdir, seqs))
    f = g / "gptq-g32-q4_0.gguf"
    m = export_gguf(qdir, f, "q4_0", overwrite=True)
    paths = {}
    for t in m["tensors"]:
        paths[t["path"].split(" (")[0]] = paths.get(t["path"].split(" (")[0], 0) + 1
    res["GPTQ-g32 -> q4_0"] = dict(compare(ref, llama_logits(f, seqs, args.threads, args.ctx)), paths=paths)
    return res


CHILD = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch, gguf  # the floor: what every export pays before reading a tensor
if sys.argv[2] != "floor":
    from toucan.gguf_export import export_gguf
    t0 = time.time()
    export_gguf(sys.argv[3], sys.argv[4], sys.argv[2], overwrite=True)
    print("seconds", round(time.time() - t0, 1))
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def big_model(d: Path) -> tuple[Path, int]:
    """~1.1 B random bf16 LLaMA written tensor by tensor (never all in memory). Returns (dir,
    bytes of the largest tensor in fp32)."""
    import shutil

    from toucan.delta_io import ShardWriter, make_header
    from toucan.modeling import tiny_llama_config

    cfg = tiny_llama_config(32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                            intermediate_size=5632, max_position_embeddings=2048)
    cfg.num_key_value_heads = 4  # TinyLlama's grouped-query attention
    cfg.architectures = ["LlamaForCausalLM"]
    shapes = {"model.embed_tokens.weight": [32000, 2048], "model.norm.weight": [2048], "lm_head.weight": [32000, 2048]}
    kv = 2048 // 32 * 4
    for i in range(22):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": [2048], p + "post_attention_layernorm.weight": [2048],
                       p + "self_attn.q_proj.weight": [2048, 2048], p + "self_attn.k_proj.weight": [kv, 2048],
                       p + "self_attn.v_proj.weight": [kv, 2048], p + "self_attn.o_proj.weight": [2048, 2048],
                       p + "mlp.gate_proj.weight": [5632, 2048], p + "mlp.up_proj.weight": [5632, 2048],
                       p + "mlp.down_proj.weight": [2048, 5632]})
    largest = max(math.prod(s) for s in shapes.values()) * 4
    if (d / "model.safetensors").is_file():
        return d, largest
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(d))
    shutil.copy(SHARED / "tokenizers/llama_tokenizer.model", d / "tokenizer.model")
    w = ShardWriter(d / "model.safetensors", make_header([(n, torch.bfloat16, s) for n, s in shapes.items()]),
                    hash=False)
    g = torch.Generator().manual_seed(0)
    for n, s in shapes.items():
        w.write((torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)).result()
    w.close()
    return d, largest


def memory(args) -> dict:
    d, largest = big_model(Path(args.out) / "big-1b")
    from toucan.delta_io import read_header

    header = read_header(d / "model.safetensors")[1]
    n = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    res = {"parameters": n, "largest_tensor_fp32_mib": largest / 2**20}
    for what in ("floor", "q4_0", "f16"):
        outp = Path(args.out) / f"big-1b-{what}.gguf"
        r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "src"), what, str(d), str(outp)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        lines = dict(line.split() for line in r.stdout.splitlines() if line.split()[0] in ("seconds", "maxrss_kib"))
        res[what] = {"peak_rss_mib": int(lines["maxrss_kib"]) / 1024, "seconds": float(lines.get("seconds", 0)),
                     "file_mib": outp.stat().st_size / 2**20 if outp.exists() else 0}
        if outp.exists():
            outp.unlink()
            outp.with_name(outp.name + ".toucan.json").unlink(missing_ok=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-gguf"))
    ap.add_argument("--train-steps", type=int, default=650, help="bench/quant.py's recipe")
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--ctx", type=int, default=512, help="training and scoring window")
    ap.add_argument("--windows", type=int, default=20, help="held-out windows to score (0 = all)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"llama.cpp threads {args.threads}")
    ok = True
    if not args.skip_fidelity:
        res = fidelity(args)
        print(f"\n{'model':28} {'KL(fp32||q)':>12} {'max|dlogit|':>12} {'argmax':>8}  tokens {res['fp32 -> f16']['tokens']}")
        for k, v in res.items():
            print(f"{k:28} {v['kl']:12.3e} {v['max_abs']:12.3e} {v['argmax']:8.4f}" + (f"  paths {v['paths']}" if "paths" in v else ""))
        q8, q4, gq = res["fp32 -> q8_0"]["kl"], res["fp32 -> q4_0"]["kl"], res["GPTQ-g32 -> q4_0"]["kl"]
        print(f"\nq4_0 KL / q8_0 KL = {q4 / q8:.1f}x (acceptance >= 10x): {'PASS' if q4 >= 10 * q8 else 'FAIL'}")
        print(f"GPTQ-g32 -> q4_0 KL / direct q4_0 KL = {gq / q4:.2f}x (acceptance < 1): {'PASS' if gq < q4 else 'FAIL'}")
        ok &= q4 >= 10 * q8 and gq < q4
    if not args.skip_memory:
        m = memory(args)
        budget = m["largest_tensor_fp32_mib"] + 1536
        print(f"\n~1B export memory: {m['parameters'] / 1e9:.2f} B parameters (random bf16), largest tensor "
              f"{m['largest_tensor_fp32_mib']:.0f} MiB in fp32; budget largest + 1.5 GB = {budget:.0f} MiB")
        print(f"  floor (python + torch + gguf imported): peak RSS {m['floor']['peak_rss_mib']:.0f} MiB")
        for t in ("q4_0", "f16"):
            r = m[t]
            print(f"  export {t:5}: peak RSS {r['peak_rss_mib']:.0f} MiB = {r['peak_rss_mib'] / budget:.2f}x budget, "
                  f"{r['seconds']:.0f} s, file {r['file_mib']:.0f} MiB: {'PASS' if r['peak_rss_mib'] <= budget else 'FAIL'}")
            ok &= r["peak_rss_mib"] <= budget
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
