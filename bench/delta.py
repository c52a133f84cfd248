"""apply-delta on a ~1B-parameter LLaMA in fp16: peak RSS and time, against the largest single
tensor and against copying the same files with cp, measured in the same run.

Builds a random base (TinyLlama-1.1B shape, 32,000 rows) and a "fine-tuned" target (every weight
moved, vocabulary grown to 49,954 rows like Toucan's: Chinese pieces + [PAD]) tensor by tensor
into several safetensors shards (one tensor of each model in memory, no 2x), makes the delta,
then runs `toucan apply-delta` as a subprocess under /usr/bin/time -v. Everything lives in one
temporary directory, deleted at the end. apply-delta is disk/CPU work only: there is no GPU variant.

  .venv/bin/python bench/delta.py                 # the recorded run (~1.2B parameters, ~2.4 GB)
  .venv/bin/python bench/delta.py --layers 2      # a quick smoke run

Acceptance (issue 4): peak RSS <= largest tensor + 1.5 GB; time <= 3x cp of the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from toucan.delta import _shards
from toucan.delta_io import ShardWriter, make_header

TOUCAN = str(Path(sys.executable).with_name("toucan"))
GB = 1024 ** 3


class ModelWriter:
    """A model directory written tensor by tensor into n_shards safetensors files + index."""

    def __init__(self, directory: Path, config, n_shards: int):
        from transformers import LlamaForCausalLM

        with torch.device("meta"):  # names and shapes without allocating the model
            self.shapes = {n: list(t.shape) for n, t in LlamaForCausalLM(config).state_dict().items()}
        sizes = {n: 2 * torch.Size(s).numel() for n, s in self.shapes.items()}
        self.groups = _shards(list(self.shapes), sizes, -(-sum(sizes.values()) // n_shards))
        self.file = {n: f"model-{i + 1:05d}-of-{len(self.groups):05d}.safetensors"
                     for i, g in enumerate(self.groups) for n in g}
        self.dir, self.writer = directory, None
        directory.mkdir(parents=True)
        config.save_pretrained(str(directory))
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": self.file}, indent=2))
        self.largest = max(sizes.values())

    def write(self, name: str, t: torch.Tensor) -> None:
        group = next((g for g in self.groups if g[0] == name), None)
        if group is not None:  # first tensor of a new shard
            self.close()
            self.writer = ShardWriter(self.dir / self.file[name], make_header(
                [(n, torch.float16, self.shapes[n]) for n in group], {"format": "pt"}))
        self.writer.write(t)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def build(tmp: Path, layers: int, shards: int) -> tuple[Path, Path, int, int]:
    from transformers import LlamaConfig

    kw = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    base = ModelWriter(tmp / "base", LlamaConfig(vocab_size=32000, **kw), shards)
    target = ModelWriter(tmp / "target", LlamaConfig(vocab_size=49954, **kw), shards)
    assert list(base.shapes) == list(target.shapes)
    gen = torch.Generator().manual_seed(0)
    for name, shape in target.shapes.items():
        b = (torch.randn(base.shapes[name], generator=gen) * 0.02).half()
        base.write(name, b)
        t = torch.empty(shape, dtype=torch.float16)
        rows = b.shape[0]
        t[:rows] = b + (torch.randn(b.shape, generator=gen) * 1e-3).half()  # "fine-tuned"
        if shape[0] > rows:  # new vocabulary rows
            t[rows:] = (torch.randn([shape[0] - rows, *shape[1:]], generator=gen) * 0.02).half()
        target.write(name, t)
    base.close()
    target.close()
    params = sum(torch.Size(s).numel() for s in target.shapes.values())
    return base.dir, target.dir, target.largest, params


def timed(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds until the command returns, peak RSS bytes, wall seconds until its output is
    on disk) of a subprocess, via GNU time -v. Dirty pages are flushed first so that neither cp nor
    apply-delta pays for the other's writeback. The durable time (command + `sync`) is the fair
    one: cp returns while its 2 GB still sit in the page cache, and the kernel throttles the next
    writer to flush them, so "returned" favours whichever command runs first on a clean cache."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    subprocess.run(["sync"], check=True)
    durable = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, rss_kb * 1024, durable


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22 = TinyLlama-1.1B)")
    ap.add_argument("--shards", type=int, default=4, help="safetensors shards per model")
    ap.add_argument("--repeat", type=int, default=2, help="runs of cp and of apply-delta (best of each)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary models go")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toucan-bench-delta-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        base, target, largest, params = build(tmp, args.layers, args.shards)
        size = du(target)
        print(f"built base + target in {time.perf_counter() - t0:.0f} s: {params / 1e9:.2f}B parameters, "
              f"fp16, target {size / GB:.2f} GiB in {args.shards} shards, largest tensor {largest / GB:.3f} GiB")
        make_s, make_rss, _ = timed([TOUCAN, "-q", "make-delta", "--base", str(base), "--model", str(target),
                                  "--output", str(tmp / "delta"), "--max-shard-size", "1GB"])
        print(f"make-delta: {make_s:.1f} s, peak RSS {make_rss / GB:.2f} GiB")
        cp_runs, apply_runs = [], []
        for i in range(args.repeat):
            cp_runs.append(timed(["cp", "-r", str(target), str(tmp / f"copy{i}")]))
            apply_runs.append(timed([TOUCAN, "-q", "apply-delta", "--base", str(base), "--delta", str(tmp / "delta"),
                                     "--output", str(tmp / f"restored{i}")]))
            shutil.rmtree(tmp / f"copy{i}")
            if i:
                shutil.rmtree(tmp / f"restored{i}")
        shards = sorted(p.name for p in target.glob("*.safetensors"))
        identical = all(subprocess.run(["cmp", "-s", str(target / f), str(tmp / "restored0" / f)]).returncode == 0
                        for f in shards)
        # What two mandatory sha256 passes cost (the base check before writing, then the restored
        # target): one pass over the same bytes, single-threaded, with coreutils.
        sha_s, _, _ = timed(["sha256sum", *map(str, sorted(target.glob("*.safetensors")))])
        cp_s, cp_d = min(w for w, _, _ in cp_runs), min(d for _, _, d in cp_runs)
        apply_s, apply_d = min(w for w, _, _ in apply_runs), min(d for _, _, d in apply_runs)
        apply_rss = max(r for _, r, _ in apply_runs)
        fmt = lambda runs, i: ", ".join(f"{r[i]:.2f}" for r in runs)  # noqa: E731
        print(f"cp -r target ({size / GB:.2f} GiB): returned {fmt(cp_runs, 0)} s, on disk {fmt(cp_runs, 2)} s")
        print(f"apply-delta: returned {fmt(apply_runs, 0)} s, on disk {fmt(apply_runs, 2)} s "
              f"(includes ~2 s of Python/torch start-up)")
        print(f"sha256sum of the target's shards (one hash pass): {sha_s:.2f} s = {sha_s / cp_s:.2f}x cp")
        print(f"time, until on disk (best): apply-delta {apply_d:.2f} s / cp {cp_d:.2f} s = {apply_d / cp_d:.2f}x"
              f"   (limit 3x)")
        print(f"time, until the command returns (best): apply-delta {apply_s:.2f} s / cp {cp_s:.2f} s = "
              f"{apply_s / cp_s:.2f}x")
        print(f"peak RSS: apply-delta {apply_rss / GB:.2f} GiB = largest tensor {largest / GB:.3f} GiB "
              f"+ {(apply_rss - largest) / GB:.2f} GiB   (limit + 1.5 GB); "
              f"{apply_rss / size:.2f}x the model size ({size / GB:.2f} GiB)")
        print(f"restored shards byte-identical to the target's ({len(shards)} files, cmp): {identical}")
        print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
