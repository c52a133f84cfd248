"""Tokenizing instruction data: toucan.data.encode_records (batched fast-tokenizer calls) against
the baseline of one encode_record call per record, on the same records in the same run.

  .venv/bin/python bench/data.py                       # ../shared alpaca_zh_demo.json x 4, LLaMA tokenizer
  .venv/bin/python bench/data.py --repeat 1 --threads 1
  .venv/bin/python bench/data.py --huge-mb 10     # one 10 MB answer: cut before tokenizing vs whole

Both paths must give identical ids (checked). Tokenization is CPU-only: no GPU variant.
With --huge-mb, each path runs in its own child process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _huge_child(tokenizer: str, mb: int, max_len: int, cut: bool, out) -> None:
    import random

    from toucan.data import Record, encode_record, encode_records
    from toucan.modeling import load_tokenizer

    tok = load_tokenizer(tokenizer)
    rng = random.Random(0)
    rec = Record(instruction="写一篇长文", output="".join(rng.choice("你好世界，谢谢。abc xyz 123\n")
                                                       for _ in range(mb * 1_000_000 // 2)))  # ~2 bytes/char
    t = time.perf_counter()
    e = encode_records(tok, [rec], max_len)[1][0] if cut else encode_record(tok, rec, max_len)
    out.put((time.perf_counter() - t, e.input_ids, e.labels))


def huge(args) -> None:
    ctx = mp.get_context("spawn")
    res = {}
    for cut in (True, False):  # the cut one first: RUSAGE_CHILDREN keeps the largest child's peak
        q = ctx.Queue()
        p = ctx.Process(target=_huge_child, args=(args.tokenizer, args.huge_mb, args.max_len, cut, q))
        p.start()
        res[cut] = q.get()
        p.join()
        res[cut] += (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,)
    assert res[True][1:3] == res[False][1:3], "cut and whole give different kept tokens"
    (t_cut, *_, rss_cut), (t_whole, *_, rss_whole) = res[True], res[False]
    print(f"one {args.huge_mb} MB record, max_len {args.max_len}, load average {os.getloadavg()[0]:.1f}")
    print(f"baseline, tokenized whole:   {t_whole:.2f} s, child peak RSS {rss_whole:.0f} MiB")
    print(f"cut before tokenizing:       {t_cut:.3f} s, child peak RSS {rss_cut:.0f} MiB")
    print(f"speed-up: {t_whole / t_cut:.0f}x; peak RSS {rss_whole / rss_cut:.1f}x lower; same kept tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/tokenizers/llama_tokenizer.model"))
    ap.add_argument("--repeat", type=int, default=4, help="copies of the records (more work per timing)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="RAYON_NUM_THREADS for the Rust tokenizer (0 = its default)")
    ap.add_argument("--huge-mb", type=int, default=0, help="instead: one record of this many MB, cut vs whole")
    args = ap.parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    if args.huge_mb:
        return huge(args)

    from toucan.data import encode_record, encode_records, load_dataset_spec
    from toucan.modeling import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    records, _ = load_dataset_spec([args.data], dedup=False, shuffle=False)
    records = records * args.repeat

    t = time.perf_counter()
    one_by_one = [encode_record(tok, r, args.max_len) for r in records]
    base = time.perf_counter() - t

    t = time.perf_counter()
    _, batched, _ = encode_records(tok, records, args.max_len)
    ours = time.perf_counter() - t

    assert [(e.input_ids, e.labels) for e in batched] == [(e.input_ids, e.labels) for e in one_by_one if e]
    n = len(records)
    print(f"{n} records, cpu_count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"baseline encode_record one by one: {base:.2f} s ({n / base:.0f} records/s)")
    print(f"encode_records (batched):          {ours:.2f} s ({n / ours:.0f} records/s)")
    print(f"speed-up: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
