"""Calibration sequences for GPTQ, as token ids.

Instruction data (JSON / JSON Lines) is rendered exactly as training renders it (toucan.data's
encode rule: [BOS] + prompt + response + [EOS]), so GPTQ sees the activations of the chat format the
model will be asked in. Plain text (.txt) is tokenized as one stream and cut into chunks of
max_len - 1 tokens, each given a BOS (the way the model always sees text start).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from ..data import encode_record, encode_text, iter_records, with_bos
from ..errors import DataError, QuantError

log = logging.getLogger(__name__)


def check_calibration(method: str, data: str | None, samples: int, damp_percent: float,
                      error: type = QuantError) -> None:
    """The calibration settings quantize and prune share, checked before any model is loaded;
    `error` is the command's own error type."""
    if not data:
        raise error(f"{method} needs calibration data: pass --data FILE (.json/.jsonl/.txt)")
    if not Path(data).is_file():
        raise error(f"calibration file {data}: no such file")
    if samples < 1:
        raise error(f"--calib-samples {samples}: need at least 1")
    if not 0 < damp_percent < 1:
        raise error(f"--damp-percent {damp_percent}: must be between 0 and 1")


def is_text_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".txt", ".text", ".md")


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read as UTF-8 text ({e})", file=str(path)) from None


def text_chunks(tokenizer, text: str, max_len: int) -> list[list[int]]:
    """[BOS] + consecutive max_len-1 token pieces of the text (the last one may be shorter)."""
    ids = encode_text(tokenizer, text)
    n = max_len - 1
    return [with_bos(tokenizer.bos_token_id, ids[i:i + n]) for i in range(0, len(ids), n)]


def calibration_samples(tokenizer, path: str | Path, n_samples: int, max_len: int,
                        template: str, seed: int = 0) -> list[list[int]]:
    """Up to n_samples token-id sequences of at most max_len tokens, picked with a fixed seed."""
    path = Path(path)
    if not path.is_file():
        raise QuantError(f"calibration file {path}: no such file")
    if max_len < 16:
        raise QuantError(f"--max-len {max_len}: too short to calibrate on (need >= 16)")
    rng = random.Random(seed)
    if is_text_file(path):
        seqs = text_chunks(tokenizer, read_text(path), max_len)
        if len(seqs) > n_samples:  # keep document order among the chosen chunks
            seqs = [seqs[i] for i in sorted(rng.sample(range(len(seqs)), n_samples))]
    else:
        records = list(iter_records(path))
        rng.shuffle(records)
        seqs = []
        for rec in records:
            enc = encode_record(tokenizer, rec, max_len, template)
            if enc is not None:
                seqs.append(enc.input_ids)
            if len(seqs) == n_samples:
                break
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise QuantError(f"calibration file {path}: no usable samples")
    if len(seqs) < n_samples:
        log.warning("calibration: only %d of the %d requested samples in %s", len(seqs), n_samples, path)
    return seqs
