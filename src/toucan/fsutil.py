"""Atomic outputs and streamed hashing. Everything toucan writes appears whole or not at all:
files via temp file + os.replace, directories via a sibling temp directory + rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: str | os.PathLike, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700 (private while being written); give the finished output
    the mode a plain open()/mkdir() would have, so other users can read models and results."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one record and fsync, so a SIGKILL loses at most the line being written.
    Readers (read_jsonl with tolerate_torn_tail) ignore a torn last line."""
    line = json.dumps(obj, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> list[dict]:
    """Read a JSON Lines file written by toucan. A torn final line (a killed writer) is dropped
    when tolerate_torn_tail; any other bad line raises DataError naming the line."""
    from .errors import DataError

    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and i == len(lines) and not line.endswith("\n"):
                break
            raise DataError(f"invalid JSON ({e.msg})", file=str(path), line=i) from None
    return out


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it is renamed to `target`.
    On any error it is removed, so an interrupted run leaves nothing that looks like a result.
    (A SIGKILL leaves only a `.name.tmp-*` directory, which no loader mistakes for a model.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
