"""Edge benchmark: llama.cpp (GGUF files from `toucan export gguf`) beside transformers, in one run.

Speed, on a LLaMA of 134 M parameters with random weights (hidden 768, 12 layers, MLP 2048, the
32,000-piece LLaMA tokenizer; random weights decode as fast as trained ones): decode tokens/s at
batch 1 for transformers `generate` in fp32, 4-bit GPTQ through transformers (GPTQModel's CPU
kernel), and llama.cpp f16 / q8_0 / q4_0 / q4_k_m through toucan's engine (LlamaCppEngine, what
`toucan chat --model FILE.gguf` runs); the size of each on disk. Acceptance: llama.cpp q4_0 decodes
>= 5x faster than transformers fp32, measured in this run.

Quality, on bench/quant.py's trained model (hidden 256, 2 layers, its default 650 steps at 512
tokens; trained here once by bench/quant.py's own code and cached in runs/bench-edge/quant/fp32)
and its held-out text: KL(fp32 || q) and Δppl for the llama.cpp f16 / q8_0 / q4_0 / q4_k_m exports
of the fp32 model, toucan's RTN-4bit-g32 and GPTQ-4bit-g32 in transformers, and those two exported
to q4_0 (their symmetric group-32 blocks are Q4_0's layout: no second rounding). All through
toucan.ppl.evaluate (llama.cpp's logits come from `logits_all`). Acceptance:
GPTQ-g32 -> q4_0 has a lower KL than the direct q4_0 export of the fp32 model.

Threads: --threads for torch and llama.cpp alike (default 2). On a shared box use --threads 1:
with other processes on the cores, 2 threads spin-wait for each other (llama.cpp syncs its threads
at every op) and the figures mean little. Absolute tok/s move with the load; the ratios are
measured in the same run, each backend timed as the median of --repeats runs after a warm-up.

    .venv/bin/python bench/edge.py --threads 1        # CPU, ~15 min the first time (GPTQ, training), ~5 min after
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import quant  # noqa: E402  (bench/quant.py: its data split and trained model)
from toucan.config import QuantizeConfig  # noqa: E402
from toucan.data import encode_prompt  # noqa: E402
from toucan.engine import Engine  # noqa: E402
from toucan.gguf_export import export_gguf  # noqa: E402
from toucan.modeling import load_model, load_tokenizer, save_model_dir, tiny_llama  # noqa: E402
from toucan.ppl import evaluate, load_sequences  # noqa: E402
from toucan.prompts import build_prompt  # noqa: E402
from toucan.sampling import SamplingParams  # noqa: E402
from toucan.commands.quantize import run as run_quantize  # noqa: E402

SHARED = ROOT.parent / "shared"
GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
PROMPT = build_prompt("介绍一下北京。")


def mib(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) / 2**20


def speed_model(out: Path) -> Path:
    d = out / "speed-fp32"
    if (d / "toucan.json").is_file():
        return d
    tok = load_tokenizer(SHARED / "tokenizers" / "llama_tokenizer.model")
    model = tiny_llama(len(tok), seed=0, tokenizer=tok, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=2048, max_position_embeddings=1024)
    save_model_dir(d, model, tok, command="bench-edge", overwrite=True)
    return d


def median_tok_s(run, new_tokens: int, repeats: int) -> float:
    run(4)  # warm-up: kernel repacking, caches, mmap'd weights paged in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(new_tokens)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def hf_tok_s(model_dir: Path, new_tokens: int, repeats: int) -> float:
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    ids = encode_prompt(tok, PROMPT)
    x = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}

    def run(n):
        with torch.inference_mode():
            out = model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == len(ids) + n

    return median_tok_s(run, new_tokens, repeats)


def gguf_tok_s(path: Path, new_tokens: int, repeats: int, threads: int) -> float:
    eng = Engine.from_dir(path, threads=threads)

    def run(n):
        eng.llm.n_tokens = 0  # no KV-cache reuse between runs: every run evaluates the prompt, as HF does
        c = eng.generate(PROMPT, SamplingParams(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                temperature=0.0, repetition_penalty=1.0))
        assert c.completion_tokens == n

    return median_tok_s(run, new_tokens, repeats)


class LlamaCppLM:
    """toucan.ppl.evaluate's view of a model (parameters() for the device, __call__ -> .logits)
    over llama.cpp's logits of every position (logits_all), so both backends are scored alike."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)

    def parameters(self):
        yield torch.zeros(())

    def __call__(self, x):
        ids = x[0].tolist()
        self.llm.reset()
        self.llm.eval(ids)
        return SimpleNamespace(logits=torch.from_numpy(self.llm.scores[: len(ids)].copy())[None])

    def close(self):
        self.llm.close()


def speed(args, out: Path) -> dict:
    fp32 = speed_model(out)
    n_params = sum(p.numel() for p in load_model(fp32, device="cpu").parameters())
    rows = {"transformers fp32": {"path": fp32}}
    gptq = out / "speed-gptq-4bit-g128"
    if not (gptq / "toucan.json").is_file():
        t0 = time.perf_counter()
        run_quantize(QuantizeConfig(model=str(fp32), output=str(gptq), method="gptq", bits=4, group_size=128,
                                    data=str(out / "data" / "train.jsonl"), calib_samples=args.calib_samples,
                                    max_len=128, device="cpu", overwrite=True))
        print(f"GPTQ of the speed model: {time.perf_counter() - t0:.0f} s")
    rows["transformers GPTQ-4bit-g128"] = {"path": gptq}
    for t in GGUF_TYPES:
        f = out / f"speed-{t}.gguf"
        if not f.is_file():
            export_gguf(fp32, f, t, overwrite=True, threads=args.threads)
        rows[f"llama.cpp {t}"] = {"path": f}
    for name, r in rows.items():
        p = r["path"]
        r["mib"] = mib(p)
        r["tok_s"] = (gguf_tok_s(p, args.new_tokens, args.repeats, args.threads) if p.suffix == ".gguf"
                      else hf_tok_s(p, args.new_tokens, args.repeats))
        print(f"  {name:28} {r['tok_s']:8.1f} tok/s  {r['mib']:8.1f} MiB", flush=True)
    return {"parameters": n_params, "rows": rows}


def quality(args, out: Path) -> dict:
    qa = SimpleNamespace(train_steps=650, train_seq=512, train_batch=2, layers=2, device="cpu")
    qout = out / "quant"  # a cache of our own: other benchmarks train other models in runs/bench-quant
    quant.write_data(qout, Path(args.data))
    fp32 = quant.train(qout, qa, seed=0)  # bench/quant.py's model and settings; trained once, then reused
    tok = load_tokenizer(fp32)
    seqs = load_sequences(tok, qout / "heldout.txt", ctx=512, stride=512, template="alpaca",
                          max_samples=args.eval_windows)
    ref = load_model(fp32, device="cpu")
    base = evaluate(ref, seqs, desc="fp32")
    rows = {"transformers fp32": dict(ppl=base["ppl"], kl=0.0, mib=mib(fp32))}
    hf_dirs = {}
    for name, method in (("RTN-4bit-g32", "rtn"), ("GPTQ-4bit-g32", "gptq")):
        d = out / f"quality-{name}"
        run_quantize(QuantizeConfig(model=str(fp32), output=str(d), method=method, bits=4, group_size=32, sym=True,
                                    desc_act=False, data=str(qout / "train.jsonl"), calib_samples=128, max_len=512,
                                    device="cpu", overwrite=True))
        hf_dirs[name] = d
        r = evaluate(load_model(d, device="cpu"), seqs, reference=ref, desc=name)
        rows[f"transformers {name}"] = dict(ppl=r["ppl"], kl=r["kl"], mib=mib(d))
    files = {f"llama.cpp {t}": (fp32, t) for t in GGUF_TYPES}
    files.update({f"llama.cpp {name} -> q4_0": (d, "q4_0") for name, d in hf_dirs.items()})
    for name, (src, t) in files.items():
        f = out / ("quality-" + name.split(" ", 1)[1].replace(" -> ", "-to-") + ".gguf")
        m = export_gguf(src, f, t, overwrite=True, threads=args.threads)
        lm = LlamaCppLM(f, 512, args.threads)
        r = evaluate(lm, seqs, reference=ref, desc=name)
        lm.close()
        paths = sorted({x["path"].split(" (")[0] for x in m["tensors"]})
        rows[name] = dict(ppl=r["ppl"], kl=r["kl"], mib=mib(f), paths=paths)
    for r in rows.values():
        r["dppl"] = r["ppl"] - base["ppl"]
    return {"tokens": base["tokens"], "windows": len(seqs), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-edge"))
    ap.add_argument("--data", default=str(SHARED / "data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration rows for the speed model")
    ap.add_argument("--eval-windows", type=int, default=0, help="held-out 512-token windows to score (0 = all)")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not Path(args.data).is_file() or not (SHARED / "tokenizers" / "llama_tokenizer.model").is_file():
        sys.exit("this benchmark needs ../shared (alpaca_zh_demo.json and the LLaMA tokenizer)")
    quant.write_data(out / "data", Path(args.data))
    t0 = time.perf_counter()

    print(f"speed: batch 1, {args.new_tokens} new tokens, median of {args.repeats}, {args.threads} threads")
    sp = speed(args, out)
    base = sp["rows"]["transformers fp32"]
    print(f"\nspeed model: {sp['parameters'] / 1e6:.1f} M parameters (random weights)")
    print(f"{'backend':30} {'tok/s':>8} {'x fp32':>7} {'MiB':>8} {'size/fp32':>9}")
    for name, r in sp["rows"].items():
        print(f"{name:30} {r['tok_s']:8.1f} {r['tok_s'] / base['tok_s']:7.2f} {r['mib']:8.1f} {r['mib'] / base['mib']:9.3f}")
    ratio = sp["rows"]["llama.cpp q4_0"]["tok_s"] / base["tok_s"]
    ok_speed = ratio >= 5
    print(f"\nllama.cpp q4_0 / transformers fp32 decode = {ratio:.2f}x (need >= 5): {'PASS' if ok_speed else 'FAIL'}")

    ok_kl, ql = True, None
    if not args.skip_quality:
        ql = quality(args, out)
        rows = ql["rows"]
        print(f"\nquality: bench/quant.py's trained model, {ql['windows']} held-out windows of 512, {ql['tokens']} tokens")
        print(f"{'variant':40} {'ppl':>9} {'dppl':>8} {'KL(fp32||q)':>12} {'KL/q4_0':>8} {'MiB':>7}")
        q40 = rows["llama.cpp q4_0"]["kl"]
        for name, r in rows.items():
            print(f"{name:40} {r['ppl']:9.4f} {r['dppl']:+8.4f} {r['kl']:12.3e} {r['kl'] / q40:8.3f} {r['mib']:7.2f}")
        g = rows["llama.cpp GPTQ-4bit-g32 -> q4_0"]
        ok_kl = g["kl"] < q40
        print(f"\nGPTQ-4bit-g32 -> q4_0 KL / direct q4_0 KL = {g['kl'] / q40:.3f} (need < 1): {'PASS' if ok_kl else 'FAIL'}"
              f"  (tensor paths: {', '.join(g['paths'])})")
        print(f"q8_0 KL / q4_0 KL = {rows['llama.cpp q8_0']['kl'] / q40:.4f}")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {args.threads} threads (torch and llama.cpp); "
          f"total {time.perf_counter() - t0:.0f} s")
    res = {"speed": sp, "quality": ql, "q4_0_over_fp32": ratio, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    return 0 if ok_speed and ok_kl else 1


if __name__ == "__main__":
    sys.exit(main())
