"""GPU decode path: a static KV cache plus torch.compile (CUDA graphs) for greedy decode, against HF
`generate` and against the memory-bandwidth floor, measured in the same run.

    python bench/decode.py --device cuda                  # LLaMA-7B shape, random bf16, batch 1 and 16
    python bench/decode.py --dry-run                      # tiny shapes on CPU: checks the code path only

Why by hand (gpt-fast style): HF `generate` with cache_implementation="static" re-enters its Python
loop, mask building and logits processors every step, and torch.compile of the whole generate was
slower on an H200 (FACTS.md: 3.0-3.4 tok/s vs 12-14 eager), while mode="reduce-overhead" crashed
because generate keeps CUDA-graph outputs across steps. Here only the one-token forward is
compiled (fullgraph, fixed shapes: StaticCache, cache_position as a tensor), each step starts with
cudagraph_mark_step_begin and its logits are cloned out of the graph's buffers, and the greedy
token is taken on the device.

Bandwidth floor: each decode step reads every weight once (plus the KV cache, small at these
lengths), so step time >= weight bytes / memory bandwidth; the bandwidth is measured here with a
device-to-device copy. Batch 16 has the same floor per step (16x the tokens). Prints tok/s for HF
generate (dynamic cache), the compiled static path, the floor, and the ratios; checks the compiled
path gives HF generate's greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5."""
    import torch

    n = nbytes // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 2 / best


def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.dry_run:  # tiny, fp32 (bf16 matmuls are ~50x slower on this CPU)
        cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
        dtype = torch.float32
    else:  # LLaMA-7B
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    return model, dtype


def hf_generate(model, ids, tokens: int):
    import torch

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


class StaticDecoder:
    """Prefill eager, then a compiled one-token step over a StaticCache (see the module docstring)."""

    def __init__(self, model, batch: int, max_len: int, backend: str, mode: str | None):
        import torch
        from transformers import StaticCache

        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        params = __import__("inspect").signature(model.forward).parameters
        self.kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.24 renamed it
        self.step = torch.compile(self._step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.graphs = mode == "reduce-overhead"

    def _step(self, tok, pos):
        out = self.model(input_ids=tok, position_ids=pos[None].expand(tok.shape[0], 1), cache_position=pos,
                         use_cache=True, **{self.kw: self.cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def generate(self, ids, tokens: int):
        import torch

        n = ids.shape[1]
        with torch.inference_mode():
            self.cache.reset()  # its tensors were made under inference mode
            out = self.model(input_ids=ids, cache_position=torch.arange(n, device=ids.device), use_cache=True,
                             **{self.kw: self.cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            got = [tok]
            for i in range(tokens - 1):
                pos = torch.tensor([n + i], device=ids.device)
                if self.graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                tok = self.step(tok, pos).clone()  # out of the CUDA graph's reused output buffer
                got.append(tok)
        return torch.cat(got, dim=1)


def timed(fn, device: str, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, torch.compile backend 'eager' "
                                                            "(traces the step; no inductor build, no CUDA graphs)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (dry run)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    if args.dry_run:
        args.device, args.tokens, args.repeats = "cpu", min(args.tokens, 16), 1
        torch.set_num_threads(args.threads)
    backend, mode = ("eager", None) if args.dry_run else ("inductor", "reduce-overhead")
    model, dtype = build_model(args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = bandwidth(args.device, 1 << 26 if args.dry_run else 1 << 32)
    floor = bw / weight_bytes  # decode steps per second the weights' reads allow
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params, {dtype}, {weight_bytes / 2**30:.1f} GiB; "
          f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}); "
          f"copy bandwidth {bw / 1e12:.2f} TB/s -> floor {floor:.0f} steps/s; torch {torch.__version__}, "
          f"compile backend {backend} mode {mode}")
    results = []
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(3, model.config.vocab_size, (b, args.prompt), generator=g).to(args.device)
        with torch.inference_mode():
            t_hf, ref = timed(lambda: hf_generate(model, ids, args.tokens), args.device, args.repeats)
        dec = StaticDecoder(model, b, args.prompt + args.tokens, backend, mode)
        t0 = time.perf_counter()
        dec.generate(ids, args.tokens)  # compiles (and records the CUDA graph)
        sync(args.device)
        t_compile = time.perf_counter() - t0
        t_st, got = timed(lambda: dec.generate(ids, args.tokens), args.device, args.repeats)
        same = bool(torch.equal(got.cpu(), ref.cpu()))
        r = {"batch": b, "hf_tok_s": b * args.tokens / t_hf, "static_compiled_tok_s": b * args.tokens / t_st,
             "floor_tok_s": b * floor, "compile_s": t_compile, "same_tokens_as_generate": same}
        r["vs_floor"] = r["static_compiled_tok_s"] / r["floor_tok_s"]
        r["vs_hf"] = r["static_compiled_tok_s"] / r["hf_tok_s"]
        results.append(r)
        print(f"batch {b}: HF generate {r['hf_tok_s']:.1f} tok/s; static cache + compile {r['static_compiled_tok_s']:.1f} "
              f"tok/s ({r['vs_hf']:.2f}x generate, {r['vs_floor']:.0%} of the bandwidth floor {r['floor_tok_s']:.0f} tok/s; "
              f"target >= 70%); first call (compile) {t_compile:.1f} s; same greedy tokens as generate: {same}")
        del dec
    if args.out:
        Path(args.out).write_text(json.dumps({"bandwidth_bytes_s": bw, "weight_bytes": weight_bytes, "runs": results},
                                             indent=2))
    return 0 if all(r["same_tokens_as_generate"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
