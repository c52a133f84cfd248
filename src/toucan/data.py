"""Instruction data: load and validate Alpaca-format records, and tokenize them for SFT.

Record format (Alpaca / BELLE / alpaca_gpt4(_zh)): {"instruction": str, "input": str (optional),
"output": str, "history": [[q, a], ...] (optional)}, as a JSON array or as JSON Lines.

Tokenization rule (the contract every command relies on):
    input_ids = [BOS] + tokens(prompt) + tokens(output) + [EOS]
    labels    = [-100] * (1 + len(tokens(prompt))) + tokens(output) + [EOS]
The prompt comes from toucan.prompts. EOS is an id, never text. Truncation: when an example is
longer than max_len, the response is cut from its end and the EOS goes with it (the model must not
learn to stop mid-answer); such examples are counted and reported as truncated, or dropped with
drop_too_long. An example whose prompt leaves no room for a response token is dropped, counted.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .defaults import SEED
from .errors import ConfigError, DataError
from .prompts import DEFAULT_TEMPLATE, build_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
REQUIRED = ("instruction", "output")
OPTIONAL_STR = ("input",)


@dataclass
class Record:
    instruction: str
    output: str
    input: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    file: str = ""
    line: int | None = None     # 1-based line where the record starts (JSON Lines and arrays)
    index: int | None = None    # JSON array: 0-based element index

    def where(self) -> str:
        loc = [f"line {self.line}"] if self.line is not None else []
        loc += [f"record {self.index}"] if self.index is not None else []
        return ", ".join([self.file, *loc])


def _validate(obj, file: str, line: int | None, index: int | None) -> Record:
    def err(msg, fld=None):
        return DataError(msg, file=file, line=line, index=index, field=fld)

    if not isinstance(obj, dict):
        raise err(f"expected a JSON object, got {_json_type(obj)}")
    for k in REQUIRED:
        if k not in obj:
            raise err("missing", k)
        if not isinstance(obj[k], str):
            raise err(f"must be a string, got {_json_type(obj[k])}", k)
    for k in OPTIONAL_STR:
        if k in obj and obj[k] is not None and not isinstance(obj[k], str):
            raise err(f"must be a string, got {_json_type(obj[k])}", k)
    if not obj["instruction"].strip():
        raise err("is empty", "instruction")
    if not obj["output"].strip():
        raise err("is empty", "output")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise err("must be a list of [question, answer] string pairs", "history")
    # JSON's \ud800-style escapes can smuggle in lone surrogates, which are valid Python str but
    # cannot be tokenized or written back as UTF-8: reject them here, where we can name the field.
    for k in (*REQUIRED, *OPTIONAL_STR):
        if isinstance(obj.get(k), str) and _has_surrogate(obj[k]):
            raise err("contains an unpaired UTF-16 surrogate escape", k)
    if any(_has_surrogate(s) for t in history for s in t):
        raise err("contains an unpaired UTF-16 surrogate escape", "history")
    return Record(instruction=obj["instruction"], output=obj["output"], input=obj.get("input") or "",
                  history=[tuple(t) for t in history], file=file, line=line, index=index)


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _has_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


_DECODER = json.JSONDecoder()
_WS = " \t\n\r"
_HUGE_INT = f"invalid JSON (an integer of more than {sys.get_int_max_str_digits()} digits)"


def _iter_array(text: str, path: str, line_of) -> Iterator[tuple[int, int, object]]:
    """Yield (index, line, value) for each element of a top-level JSON array.

    Written by hand because json.loads gives no element positions (we want every record's line)
    and fails the whole file on one bad element; datasets/pyarrow's JSON reader reports neither.
    A syntax error inside the array cannot be skipped (we would not know where the next element
    starts), so it always raises, naming its line and the index of the record it is in (or after)."""
    def fail(msg, pos, index):
        raise DataError(msg, file=path, line=line_of(pos), index=index) from None

    pos = text.index("[") + 1
    n = len(text)
    i = 0
    while True:
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos >= n:
            fail("invalid JSON (unterminated array: expected ']')", pos, i)
        if text[pos] == "]" and i == 0:
            pos += 1
            break
        start = pos
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(f"invalid JSON ({e.msg})", e.pos, i)
        except RecursionError:
            fail("invalid JSON (nested too deeply)", start, i)
        except ValueError:  # int() refuses huge digit strings (sys.set_int_max_str_digits): not a JSONDecodeError
            fail(_HUGE_INT, start, i)
        yield i, line_of(start), value
        i += 1
        while pos < n and text[pos] in _WS:
            pos += 1
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            pos += 1
            break
        if pos >= n:
            fail("invalid JSON (unterminated array: expected ']' after the last record)", pos, i - 1)
        fail("invalid JSON (expected ',' or ']' after this record)", pos, i - 1)
    while pos < n and text[pos] in _WS:
        pos += 1
    if pos < n:
        fail("invalid JSON (extra data after the array)", pos, None)


def iter_records(path: str | Path, skip_bad: bool = False, bad: list | None = None) -> Iterator[Record]:
    """Yield validated records from a JSON array or JSON Lines file.

    A bad record raises DataError (file, line and/or array index, field) unless skip_bad, in which
    case the error is appended to `bad` and the record skipped. Errors that leave no record to
    skip to (unreadable file, a non-UTF-8 or syntactically broken JSON array) always raise.
    Lines are counted on b"\n" like editors do (str.splitlines would also split on U+2028 etc.)."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror or e})", file=path) from None
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM (Windows editors)
        raw = raw[3:]
    if not raw.strip(b" \t\r\n"):  # a 0-byte file is a failed export or a wrong path, not "0 records"
        raise DataError("empty file (no records)", file=path)

    def handle(e: DataError):
        if not skip_bad:
            raise e
        if bad is not None:
            bad.append(e)

    if raw.lstrip(b" \t\r\n").startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text (byte {e.start})", file=path,
                            line=raw[:e.start].count(b"\n") + 1) from None
        # line of a character offset; offsets only grow, so count newlines incrementally (O(n))
        state = [0, 1]  # last offset, its line

        def line_of(pos: int) -> int:
            if pos >= state[0]:
                state[1] += text.count("\n", state[0], pos)
                state[0] = pos
                return state[1]
            return text.count("\n", 0, pos) + 1

        for i, ln, obj in _iter_array(text, path, line_of):
            try:
                yield _validate(obj, path, ln, i)
            except DataError as e:
                handle(e)
        return
    for n, bline in enumerate(raw.split(b"\n"), 1):
        if not bline.strip():
            continue
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            handle(DataError(f"not UTF-8 text (byte {e.start} of the line)", file=path, line=n))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            handle(DataError(f"invalid JSON ({e.msg})", file=path, line=n))
            continue
        except RecursionError:
            handle(DataError("invalid JSON (nested too deeply)", file=path, line=n))
            continue
        except ValueError:  # a huge integer (see _HUGE_INT)
            handle(DataError(_HUGE_INT, file=path, line=n))
            continue
        try:
            yield _validate(obj, path, n, None)
        except DataError as e:
            handle(e)


# ----------------------------------------------------------------------------------------------
# Several files -> one list of records: the spec syntax shared by `toucan data` and `toucan train`.

@dataclass
class FileReport:
    spec: str
    path: str
    sample: str = "all"          # "all", "fraction 0.5", "count 1000"
    read: int = 0                # valid records in the file
    bad: int = 0                 # skipped with --skip-bad
    duplicates: int = 0          # dropped as repeats (of this file or an earlier one)
    kept: int = 0                # after dedup and sampling


@dataclass
class DataReport:
    files: list[FileReport] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)   # "file, line N, field 'x': message"
    records: int = 0

    def to_dict(self) -> dict:
        return {"records": self.records, "files": [vars(f) for f in self.files], "bad": self.bad}


def parse_spec(spec: str) -> tuple[str, float | int | None]:
    """"FILE" -> (FILE, None); "FILE:0.5" -> fraction (has a '.'; 0 < x <= 1); "FILE:1000" -> count.
    An existing file whose name contains ':' is taken as a plain path."""
    path, sep, tail = spec.rpartition(":")
    if not sep or Path(spec).exists() or not path:
        return spec, None
    try:
        if any(c in tail for c in ".eE"):
            frac = float(tail)
            if not 0 < frac <= 1:
                raise ConfigError(f"{spec}: a sampling fraction must be in (0, 1], got {tail}")
            return path, frac
        count = int(tail)
    except ValueError:
        return spec, None  # not a sampling suffix: let the read fail naming the whole spec
    if count < 0:
        raise ConfigError(f"{spec}: a sampling count must be >= 0, got {tail}")
    return path, count


def dedup_key(rec: Record) -> tuple:
    return (rec.instruction.strip(), rec.input.strip(), rec.output.strip(),
            tuple((q.strip(), a.strip()) for q, a in rec.history))


def load_dataset_spec(paths: Sequence[str], seed: int = SEED, shuffle: bool = True, dedup: bool = True,
                      skip_bad: bool = False) -> tuple[list[Record], DataReport]:
    """The final list of records for `toucan data` / `toucan train` from CLI-style specs.

    Order of operations: read and validate each file; drop repeats (the first occurrence, across
    all files in the given order, wins); sample each file (`FILE:0.5` keeps a seeded random half
    of what is left, `FILE:1000` 1000 records, all if fewer); concatenate; shuffle (seeded).
    Sampled records keep file order, so with shuffle=False the output follows the inputs."""
    if not paths:
        raise ConfigError("no data files given")
    report = DataReport()
    seen: set[tuple] = set()
    out: list[Record] = []
    for i, spec in enumerate(paths):
        path, amount = parse_spec(spec)
        fr = FileReport(spec=spec, path=path)
        bad: list[DataError] = []
        recs = []
        for rec in iter_records(path, skip_bad=skip_bad, bad=bad):
            fr.read += 1
            if dedup:
                key = dedup_key(rec)
                if key in seen:
                    fr.duplicates += 1
                    continue
                seen.add(key)
            recs.append(rec)
        fr.bad = len(bad)
        report.bad += [str(e) for e in bad]
        if amount is not None:
            k = round(len(recs) * amount) if isinstance(amount, float) else min(amount, len(recs))
            fr.sample = f"fraction {amount}" if isinstance(amount, float) else f"count {amount}"
            if isinstance(amount, int) and amount > len(recs):
                log.warning("%s: asked for %d records, only %d available: using all", spec, amount, len(recs))
            # str seeds hash deterministically (sha512), unlike hash() of a tuple under PYTHONHASHSEED
            keep = sorted(random.Random(f"{seed}/{i}/{path}").sample(range(len(recs)), k))
            recs = [recs[j] for j in keep]
        fr.kept = len(recs)
        report.files.append(fr)
        out += recs
    if shuffle:
        random.Random(seed).shuffle(out)
    report.records = len(out)
    for msg in report.bad[:20]:
        log.warning("skipped bad record: %s", msg)
    if len(report.bad) > 20:
        log.warning("... and %d more bad records", len(report.bad) - 20)
    return out, report


def record_prompt(rec: Record, template: str = DEFAULT_TEMPLATE) -> str:
    return build_prompt(rec.instruction, rec.input, rec.history, template)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def with_bos(bos_id: int, ids: list[int]) -> list[int]:
    """[BOS] + ids: how every sequence toucan gives a model starts (training examples, prompts in
    both engines, calibration chunks, perplexity text). The one place the rule is written."""
    assert bos_id is not None, "tokenizer has no BOS (modeling.load_tokenizer refuses those)"
    return [bos_id] + ids


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt side of the rule: [BOS] + tokens(prompt). What the engine feeds a model is
    exactly what training put before the response."""
    return with_bos(tokenizer.bos_token_id, encode_text(tokenizer, prompt))


def _assemble(tokenizer, prompt_ids: list[int], response_ids: list[int], max_len: int) -> Encoded | None:
    p = with_bos(tokenizer.bos_token_id, prompt_ids)
    r = response_ids + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        return None
    truncated = len(p) + len(r) > max_len
    r = r[: max_len - len(p)]
    return Encoded(p + r, [IGNORE_INDEX] * len(p) + r, truncated)


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> Encoded | None:
    """Tokenize one (prompt, response) pair by the rule in the module docstring.
    Returns None when the prompt leaves no room for a single response token."""
    return _assemble(tokenizer, encode_text(tokenizer, prompt), encode_text(tokenizer, response), max_len)


def encode_record(tokenizer, rec: Record, max_len: int, template: str = DEFAULT_TEMPLATE) -> Encoded | None:
    return encode_example(tokenizer, record_prompt(rec, template), rec.output, max_len)


# ----------------------------------------------------------------------------------------------
# Many records at once: token lengths, length filtering, the --stats report.
#
# Why not datasets.map here: the records are already validated Python objects (datasets' JSON
# reader cannot name the bad line), an in-memory Dataset.from_list().map() gets no disk cache, and
# on 2 cores num_proc only adds pickling. What does help is the fast tokenizer's batched call
# (Rust; bench/data.py measures it against one call per record). The HF Trainer takes the
# encoded examples as a plain list (a map-style dataset), so `datasets` is not a dependency.

BATCH = 1000

# A text far longer than max_len is cut, in characters, before it is tokenized: one 50 MB answer
# otherwise costs ~70 s and ~10 GB in the tokenizer for tokens that are all thrown away. The cut
# keeps chars_per_token * (need + CUT_MARGIN) characters, where chars_per_token is the longest
# piece in the vocabulary: no token covers more characters than its piece, so the cut text still
# gives at least need + CUT_MARGIN tokens. Only the last few of them can differ from the full
# text's (a merge across the cut); the CUT_MARGIN spare tokens keep that away from anything an
# example keeps. A cut text that still gives fewer than need + CUT_MARGIN tokens (a normalizer
# folding many characters into one) is tokenized again in full, so the result never depends on the cut.
CUT_MARGIN = 64


def chars_per_token(tokenizer) -> int:
    """The longest vocabulary piece, in characters (byte pieces like <0xE4> over-count: harmless)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max([len(p) for p in pieces if p] + [4])


def _tokenize(tokenizer, texts: list[str], cut_at: int | None, need: int) -> tuple[list[list[int]], list[int]]:
    """Token ids of each text (no BOS/EOS) and the positions of the texts that were cut."""
    ids = tokenizer([t[:cut_at] for t in texts] if cut_at else texts, add_special_tokens=False)["input_ids"]
    cut = [j for j, t in enumerate(texts) if cut_at and len(t) > cut_at]
    for j in [j for j in cut if len(ids[j]) < need + CUT_MARGIN]:
        ids[j] = encode_text(tokenizer, texts[j])  # the cut was too tight for this text: no cut
        cut.remove(j)
    return ids, cut


def token_lengths(tokenizer, records: Sequence[Record], template: str = DEFAULT_TEMPLATE,
                  cut_at: int | None = None, need: int = 0) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(prompt ids, response ids) per record, without BOS/EOS, tokenized in batches, and the indices
    of the records whose prompt or response was cut to `cut_at` characters before tokenizing
    because only their first `need` tokens can matter (see CUT_MARGIN; cut_at=None: no cut)."""
    prompts, responses, cut = [], [], set()
    for i in range(0, len(records), BATCH):
        chunk = records[i:i + BATCH]
        p, cut_p = _tokenize(tokenizer, [record_prompt(r, template) for r in chunk], cut_at, need)
        r, cut_r = _tokenize(tokenizer, [r.output for r in chunk], cut_at, need)
        prompts += p
        responses += r
        cut.update(i + j for j in cut_p + cut_r)
    return prompts, responses, sorted(cut)


@dataclass
class LengthReport:
    max_len: int
    lengths: list[int] = field(default_factory=list)   # full example length (BOS..EOS), before truncation
    truncated: int = 0            # longer than max_len: response cut, EOS lost
    cut_chars: int | None = None  # texts longer than this many characters were cut before tokenizing
    cut_before_tokenizing: int = 0  # records so long they were cut: their length is a lower bound (> max_len)
    dropped_too_long: int = 0     # dropped with drop_too_long
    dropped_no_room: int = 0      # prompt alone fills max_len
    dropped_short: int = 0        # response shorter than min_response_tokens

    def percentiles(self) -> dict[str, int]:
        if not self.lengths:
            return {}
        import numpy as np

        a = np.asarray(self.lengths)
        # inverted_cdf: every figure is a length some example really has
        out = {f"p{q}": int(np.percentile(a, q, method="inverted_cdf")) for q in (50, 90, 95, 99)}
        out["max"] = int(a.max())
        out["mean"] = round(float(a.mean()), 1)
        return out

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items() if k != "lengths"}
        d["examples"] = len(self.lengths)
        d["token_length"] = self.percentiles()
        return d


def encode_records(tokenizer, records: Sequence[Record], max_len: int, template: str = DEFAULT_TEMPLATE,
                   drop_too_long: bool = False, min_response_tokens: int = 1
                   ) -> tuple[list[Record], list[Encoded], LengthReport]:
    """Tokenize records by the module rule and apply the length filters.
    Returns (kept records, their Encoded examples, report); `report.lengths` covers every input."""
    rep = LengthReport(max_len=max_len)
    kept, enc = [], []
    # no example keeps more than max_len tokens; min_response_tokens may count beyond that
    need = max(max_len, min_response_tokens)
    rep.cut_chars = chars_per_token(tokenizer) * (need + CUT_MARGIN)
    prompts, responses, cut = token_lengths(tokenizer, records, template, rep.cut_chars, need)
    rep.cut_before_tokenizing = len(cut)
    if cut:
        log.info("%d record(s) longer than %d characters were cut to that before tokenizing (only their "
                 "first %d tokens can be kept)", len(cut), rep.cut_chars, max_len)
    for rec, p, r in zip(records, prompts, responses):
        n = 1 + len(p) + len(r) + 1
        rep.lengths.append(n)
        if len(r) < min_response_tokens:
            rep.dropped_short += 1
            continue
        if n > max_len and drop_too_long:
            rep.dropped_too_long += 1
            continue
        e = _assemble(tokenizer, p, r, max_len)
        if e is None:
            rep.dropped_no_room += 1
            continue
        rep.truncated += e.truncated
        kept.append(rec)
        enc.append(e)
    return kept, enc, rep


def record_to_json(rec: Record) -> dict:
    d = {"instruction": rec.instruction, "input": rec.input, "output": rec.output}
    if rec.history:
        d["history"] = [list(t) for t in rec.history]
    return d
