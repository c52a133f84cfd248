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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import DataError
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
    line: int | None = None     # JSON Lines: 1-based line number
    index: int | None = None    # JSON array: 0-based element index

    def where(self) -> str:
        loc = f"line {self.line}" if self.line is not None else f"record {self.index}"
        return f"{self.file}, {loc}"


def _validate(obj, file: str, line: int | None, index: int | None) -> Record:
    def err(msg, fld=None):
        return DataError(msg, file=file, line=line, index=index, field=fld)

    if not isinstance(obj, dict):
        raise err(f"expected a JSON object, got {type(obj).__name__}")
    for k in REQUIRED:
        if k not in obj:
            raise err("missing", k)
        if not isinstance(obj[k], str):
            raise err(f"must be a string, got {type(obj[k]).__name__}", k)
    for k in OPTIONAL_STR:
        if k in obj and obj[k] is not None and not isinstance(obj[k], str):
            raise err(f"must be a string, got {type(obj[k]).__name__}", k)
    if not obj["instruction"].strip():
        raise err("is empty", "instruction")
    if not obj["output"].strip():
        raise err("is empty", "output")
    history = obj.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(s, str) for s in t) for t in history):
        raise err("must be a list of [question, answer] string pairs", "history")
    return Record(instruction=obj["instruction"], output=obj["output"], input=obj.get("input") or "",
                  history=[tuple(t) for t in history], file=file, line=line, index=index)


def iter_records(path: str | Path, skip_bad: bool = False, bad: list | None = None) -> Iterator[Record]:
    """Yield validated records. A bad record raises DataError (file, line/index, field) unless
    skip_bad, in which case the error is appended to `bad` and the record skipped."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror or e})", file=path) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text (byte {e.start})", file=path, line=line) from None

    def handle(e: DataError):
        if not skip_bad:
            raise e
        if bad is not None:
            bad.append(e)

    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None
        for i, obj in enumerate(arr):
            try:
                yield _validate(obj, path, None, i)
            except DataError as e:
                handle(e)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            handle(DataError(f"invalid JSON ({e.msg})", file=path, line=n))
            continue
        try:
            yield _validate(obj, path, n, None)
        except DataError as e:
            handle(e)


def record_prompt(rec: Record, template: str = DEFAULT_TEMPLATE) -> str:
    return build_prompt(rec.instruction, rec.input, rec.history, template)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, prompt: str, response: str, max_len: int) -> Encoded | None:
    """Tokenize one (prompt, response) pair by the rule in the module docstring.
    Returns None when the prompt leaves no room for a single response token."""
    p = [tokenizer.bos_token_id] + encode_text(tokenizer, prompt)
    r = encode_text(tokenizer, response) + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        return None
    truncated = len(p) + len(r) > max_len
    r = r[: max_len - len(p)]
    return Encoded(p + r, [IGNORE_INDEX] * len(p) + r, truncated)


def encode_record(tokenizer, rec: Record, max_len: int, template: str = DEFAULT_TEMPLATE) -> Encoded | None:
    return encode_example(tokenizer, record_prompt(rec, template), rec.output, max_len)
