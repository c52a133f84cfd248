"""Tokenizing instruction data: toucan.data.encode_records (batched fast-tokenizer calls) against
the baseline of one encode_record call per record, on the same records in the same run.

  .venv/bin/python bench/data.py                       # ../shared alpaca_zh_demo.json x 4, LLaMA tokenizer
  .venv/bin/python bench/data.py --repeat 1 --threads 1

Both paths must give identical ids (checked). Tokenization is CPU-only: no GPU variant.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/alpaca/alpaca_zh_demo.json"))
    ap.add_argument("--tokenizer", default=str(ROOT.parent / "shared/tokenizers/llama_tokenizer.model"))
    ap.add_argument("--repeat", type=int, default=4, help="copies of the records (more work per timing)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="RAYON_NUM_THREADS for the Rust tokenizer (0 = its default)")
    args = ap.parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)

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
