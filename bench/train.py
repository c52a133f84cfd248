"""Training throughput: effective (non-pad) tokens/s of full SFT, the original Toucan recipe vs toucan's best.

CPU (default): the length distribution of ../shared/data/alpaca/alpaca_zh_demo.json tokenized with
../shared/tokenizers/llama_tokenizer.model by toucan's rule (max length 512), a small randomly
initialised LLaMA (32,000-piece vocabulary), the HF Trainer with fp32 AdamW, the same seed and
thread count for both recipes, each in its own subprocess (so each peak RSS is its own):

  original   per-device batch 2, shuffled, right-padded to the longest in the batch (as Stanford
             Alpaca / the original Toucan train.py did), attention mask
  toucan     `toucan train --packing --per_device_train_batch_size 1 --gradient_accumulation_steps 2`:
             examples packed into 512-token rows (position ids restart per example, block-diagonal
             attention), 2 rows per optimizer step, and the LM head + loss computed only where a
             label follows (not on prompt tokens)

Both train on the same examples for the same wall-clock budget; a step's effective tokens are its
non-pad tokens, counted in the collator. The first steps are warm-up and not timed.

    .venv/bin/python bench/train.py                       # CPU, prints both and the ratio
    .venv/bin/python bench/train.py --device cuda         # GPU: LLaMA-7B shape, bf16, see gpu_main

GPU (`--device cuda`): LLaMA-7B-shaped model with random bf16 weights, gradient checkpointing,
fused AdamW, packed 1024-token rows of real alpaca_zh tokens when ../shared is there (random tokens
otherwise); prints tokens/s and model TFLOP/s (6N + 12*layers*hidden*seq FLOPs per token, the
PaLM/MFU convention), beside the plain-HF reference of 6,444 tok/s (277 TFLOP/s) on one H200.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TOUCAN_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data/alpaca/alpaca_zh_demo.json"
TOKENIZER = SHARED / "tokenizers/llama_tokenizer.model"


def load_examples(max_len: int):
    from toucan.data import encode_records, load_dataset_spec
    from toucan.modeling import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    records, _ = load_dataset_spec([str(DATA)], seed=0)
    _, enc, rep = encode_records(tok, records, max_len)
    return tok, [{"input_ids": e.input_ids, "labels": e.labels} for e in enc], rep


class TokenCounter:
    """Counts the non-pad tokens the model really runs on (a forward pre-hook), while `on`."""

    def __init__(self, model):
        self.on, self.tokens = False, 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.on and module.training:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()


def run_recipe(args) -> dict:
    """One recipe in this process; prints a JSON line. Both train through toucan.training.fit, the
    function `toucan train` calls; only the data layout and batch shape differ."""
    import torch
    from transformers import TrainerCallback

    from toucan.modeling import tiny_llama
    from toucan.training import fit, prepare_model, training_arguments

    torch.set_num_threads(args.threads)
    tok, examples, rep = load_examples(args.max_len)
    model = tiny_llama(len(tok), tokenizer=tok, seed=0, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, intermediate_size=args.intermediate,
                       max_position_embeddings=args.max_len)
    prepare_model(model, tok)
    counter = TokenCounter(model)
    # original: 2 examples per step. toucan: 2 packed rows per step, as micro-batches of 1 row
    # (attention inside a row is dense over the block-diagonal mask, so shorter rows cost less).
    batch, accum = (2, 1) if args.recipe == "original" else (1, 2)
    targs = training_arguments(Path(args.tmp) / args.recipe, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accum, learning_rate=2e-5, warmup_steps=0.03,
                               max_steps=100000, logging_steps=100000, save_strategy="no", seed=0,
                               lr_scheduler_type="cosine", report_to="none", disable_tqdm=True)

    class Clock(TrainerCallback):
        """Stops after the time budget; times (and counts tokens of) only the steps after warm-up."""

        def __init__(self):
            self.t0, self.steps = None, 0

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup_steps:
                self.t0, counter.on = time.perf_counter(), True

        def on_step_end(self, a, state, control, **kw):
            if self.t0 is not None:
                self.steps += 1
                self.elapsed, self.tokens = time.perf_counter() - self.t0, counter.tokens
                if self.elapsed >= args.seconds:
                    control.should_training_stop = True
            return control

    clock = Clock()
    res = fit(model, tok, examples, targs, packing=args.recipe == "toucan", max_len=args.max_len, callbacks=[clock])
    return {"recipe": args.recipe, "threads": args.threads, "timed_steps": clock.steps, "seconds": round(clock.elapsed, 2),
            "effective_tokens": clock.tokens, "tokens_per_s": round(clock.tokens / clock.elapsed, 1),
            "train_rows": res.train_rows, "examples": len(examples),
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "length_p50_p90_max": [rep.percentiles().get(k) for k in ("p50", "p90", "max")]}


def cpu_main(args) -> None:
    # Both recipes run at the same time, one thread each, so whatever else the machine is doing
    # slows both alike (a 2-core box shared with other work: sequential runs were too noisy).
    procs = {}
    for recipe in ("original", "toucan"):
        cmd = [sys.executable, __file__, "--recipe", recipe] + sys.argv[1:]
        procs[recipe] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    results = {}
    for recipe, proc in procs.items():
        out, err = proc.communicate()
        line = [l for l in out.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{recipe} failed:\n{err[-4000:]}")
        results[recipe] = res = json.loads(line[-1])
        print(f"{recipe:9s} {res['tokens_per_s']:8.1f} effective tok/s  ({res['effective_tokens']} tokens in "
              f"{res['seconds']} s, {res['timed_steps']} steps, peak RSS {res['peak_rss_MiB']} MiB)", flush=True)
    ratio = results["toucan"]["tokens_per_s"] / results["original"]["tokens_per_s"]
    o = results["original"]
    print(f"model {o['params_M']}M params, {o['examples']} examples (token length p50/p90/max "
          f"{o['length_p50_p90_max']}), torch threads {args.threads}")
    print(f"toucan (packing, LM head on response tokens only) / original (pad to longest, batch 2): "
          f"{ratio:.2f}x effective tokens/s")
    print(json.dumps({"ratio": round(ratio, 3), **{k: v for k, v in results.items()}}))


def gpu_main(args) -> None:
    """LLaMA-7B shape on one GPU: bf16 weights, gradient checkpointing, fused AdamW, 1024-token rows,
    through toucan.training.fit (what `toucan train --packing --bf16 --gradient-checkpointing` runs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from toucan.modeling import load_tokenizer
    from toucan.training import fit, training_arguments

    assert torch.cuda.is_available(), "--device cuda needs a GPU"
    seq = args.gpu_seq
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.gpu_layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=max(seq, 2048),
                      rms_norm_eps=1e-6, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)   # random bf16 weights: throughput does not need real ones
    torch.set_default_dtype(torch.float32)
    if DATA.is_file() and TOKENIZER.is_file():
        tok, examples, _ = load_examples(512)
    else:  # random tokens in full rows; the tokenizer only gives fit its pad id
        tok = load_tokenizer(ROOT / "tests" / "fixtures" / "tiny_tokenizer")
        g = torch.Generator().manual_seed(0)
        examples = [{"input_ids": (ids := torch.randint(3, 32000, (seq,), generator=g).tolist()), "labels": ids}
                    for _ in range(512)]
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    counter = TokenCounter(model)
    targs = training_arguments(Path(args.tmp) / "gpu", gradient_checkpointing=True, per_device_train_batch_size=1,
                               gradient_accumulation_steps=args.gpu_batch, bf16=True, optim="adamw_torch_fused",
                               learning_rate=1e-5, max_steps=args.gpu_steps, save_strategy="no",
                               logging_steps=10 ** 6, report_to="none", dataloader_num_workers=2,
                               disable_tqdm=True, seed=0)

    class Clock(TrainerCallback):
        t0 = None

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup_steps:
                torch.cuda.synchronize()
                self.t0, counter.on = time.perf_counter(), True

        def on_train_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            self.elapsed, self.tokens = time.perf_counter() - self.t0, counter.tokens

    clock = Clock()
    torch.cuda.reset_peak_memory_stats()
    fit(model, tok, examples, targs, packing=True, max_len=seq, callbacks=[clock])
    timed_steps = args.gpu_steps - args.warmup_steps
    tps = clock.tokens / clock.elapsed
    tflops = tps * flops_per_token / 1e12
    print(f"GPU {torch.cuda.get_device_name()}: LLaMA-7B shape ({n_params / 1e9:.2f}B params, {cfg.num_hidden_layers} layers), "
          f"bf16 + gradient checkpointing + fused AdamW, packed {seq}-token rows, {args.gpu_batch} per step")
    print(f"toucan {tps:,.0f} tok/s = {tflops:.0f} model TFLOP/s; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"reference (plain HF Trainer, fixed 1024-token rows, one H200): 6,444 tok/s = 277 TFLOP/s; "
          f"ratio {tps / 6444:.2f}x")
    print(json.dumps({"tokens_per_s": round(tps, 1), "model_tflops": round(tflops, 1), "params": n_params,
                      "seq": seq, "batch": args.gpu_batch, "steps_timed": timed_steps,
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per recipe (set explicitly: ratios are only comparable at the same count)")
    p.add_argument("--seconds", type=float, default=60, help="timed wall-clock budget per recipe")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--gpu-layers", type=int, default=32)
    p.add_argument("--gpu-seq", type=int, default=1024)
    p.add_argument("--gpu-batch", type=int, default=4, help="packed rows per optimizer step (micro-batches of 1)")
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--tmp", default="/tmp/toucan-bench-train")
    p.add_argument("--recipe", choices=["original", "toucan"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        gpu_main(args)
    elif args.recipe:
        print(json.dumps(run_recipe(args)), flush=True)
    else:
        if not DATA.is_file() or not TOKENIZER.is_file():
            sys.exit(f"needs {DATA} and {TOKENIZER} (../shared)")
        cpu_main(args)


if __name__ == "__main__":
    main()
