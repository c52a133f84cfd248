"""Eval-set and judge-prompt loading, class names, item ids, and the answers/scores file format.

File format (answers.jsonl and scores.jsonl): JSON Lines whose first line is `{"_meta": {...}}`
(model, eval set, generation and judge settings) and every other line one item keyed by `id`.
answers.jsonl is appended to (one fsync'd line per answer, so a killed run resumes); scores.jsonl is
written whole, atomically, at the end of a judge run.
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

from ..errors import DataError, EvalError
from ..fsutil import read_jsonl

# The ten classes of the BELLE eval set, in the order of the published table.
CLASSES = ("math", "code", "classification", "extract", "open qa", "closed qa", "generation",
           "brainstorming", "rewrite", "summarization")
# eval_prompt.json also has a judge prompt for this class, which the set no longer uses.
PROMPT_ONLY_CLASSES = ("translation",)


def normalize_class(name: str) -> str:
    """'open QA', 'closed\\u00a0qa', ' Closed  QA ' -> 'open qa', 'closed qa'. BELLE's two files
    spell classes differently (case, a non-breaking space): compare only normalised names."""
    return " ".join(unicodedata.normalize("NFKC", name).split()).lower()


def item_id(index: int, question: str) -> str:
    """Stable id: position in the eval set plus a hash of the question, so answers made from a
    different (reordered or edited) eval set are never mistaken for these."""
    return f"{index:04d}-{hashlib.sha256(question.encode('utf-8')).hexdigest()[:10]}"


def _read_json_records(path: str | os.PathLike) -> list[tuple[int | None, object]]:
    """(line, record) pairs of a JSON Lines file or a JSON array (line None for arrays)."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{path}: no such file")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return [(None, r) for r in json.loads(text)]
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg})", file=str(path), line=e.lineno) from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", file=str(path), line=i) from None
    return out


def _field(rec: object, key: str, path, line, index, allow_empty: bool = False) -> str:
    if not isinstance(rec, dict):
        raise DataError("expected a JSON object", file=str(path), line=line, index=index)
    v = rec.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise DataError("missing, empty or not a string", file=str(path), line=line, index=index, field=key)
    return v


def _class_error(msg: str, path, line, index) -> EvalError:
    # Located like a DataError (file, line, field) but typed as an evaluation error.
    return EvalError(str(DataError(msg, file=str(path), line=line, index=index, field="class")))


def load_eval_set(path: str | os.PathLike) -> list[dict]:
    """The eval set as items {id, index, class, question, std_answer}; an unknown class is an error."""
    items = []
    for index, (line, rec) in enumerate(_read_json_records(path)):
        where = dict(path=path, line=line, index=None if line else index)
        question = _field(rec, "question", **where)
        cls = normalize_class(_field(rec, "class", **where))
        if cls not in CLASSES:
            raise _class_error(f"unknown class {rec['class']!r}; known: {', '.join(CLASSES)}", **where)
        std = _field(rec, "std_answer", **where, allow_empty=True) if "std_answer" in rec else ""
        items.append({"id": item_id(index, question), "index": index, "class": cls,
                      "question": question, "std_answer": std})
    if not items:
        raise EvalError(f"{path}: no questions")
    return items


def load_judge_prompts(path: str | os.PathLike) -> dict[str, str]:
    """eval_prompt.json -> {normalised class: judge prompt}."""
    prompts: dict[str, str] = {}
    for index, (line, rec) in enumerate(_read_json_records(path)):
        where = dict(path=path, line=line, index=None if line else index)
        cls = normalize_class(_field(rec, "class", **where))
        if cls not in CLASSES + PROMPT_ONLY_CLASSES:
            raise _class_error(f"unknown class {rec['class']!r}", **where)
        if cls in prompts:
            raise _class_error(f"a second prompt for class {cls!r}", **where)
        prompts[cls] = _field(rec, "prompt", **where)
    missing = [c for c in CLASSES if c not in prompts]
    if missing:
        raise EvalError(f"{path}: no judge prompt for class(es) {', '.join(missing)}")
    return prompts


def read_records(path: str | os.PathLike, kind: str) -> tuple[dict, list[dict]]:
    """(meta, items) of an answers or scores file. A torn last line (a killed writer) is dropped."""
    if not Path(path).is_file():
        raise EvalError(f"{path}: no such {kind} file")
    rows = read_jsonl(path, tolerate_torn_tail=True)
    if not rows or "_meta" not in rows[0]:
        raise EvalError(f"{path}: not a toucan {kind} file (its first line must be the _meta record)")
    meta, items = rows[0]["_meta"], rows[1:]
    if meta.get("kind") != kind:
        raise EvalError(f"{path}: is a {meta.get('kind')} file, expected {kind}")
    return meta, items


def repair_torn_tail(path: str | os.PathLike) -> None:
    """Cut a partial last line left by a SIGKILL mid-write, so the next append starts a clean line
    (read_jsonl skips a torn tail, but appending after one would glue two records together)."""
    p = Path(path)
    if not p.is_file() or p.stat().st_size == 0:
        return
    with open(p, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
