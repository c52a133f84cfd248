"""Atomic outputs and streamed hashing. Everything toucan writes appears whole or not at all:
files via temp file + os.replace, directories via a sibling temp directory + rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError, OutputError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MANIFEST = "toucan.json"  # toucan.manifest's file name (manifest imports fsutil, so it lives here)


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
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}-", suffix=".tmp", dir=path.parent)
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


# ----------------------------------------------------------------------------------------------
# Stale temporary outputs. A SIGKILL (or a power cut) leaves the hidden temporary beside the output
# that atomic_dir / atomic_write_bytes were filling: full-size, and nothing else ever removes it.
# Each temporary's name records its writer (pid and a hash of the host name), so the next write of
# the same output can tell a dead writer's leftovers from a concurrent live run's and remove only
# those. A pid that is alive (or reused by another process) keeps its temporary: the safe mistake.

def _host_tag() -> str:
    # A hash, not the name: host names may hold characters that do not belong in file names, and
    # a temporary on a shared file system written by another host must never look like ours.
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _owner() -> str:
    return f"{os.getpid()}-{_host_tag()}"


def temp_prefix(target: str | os.PathLike) -> str:
    """The name prefix of a temporary that stands for `target` while it is written (a sibling of
    it): remove_stale_temps(target) recognises it once its process is gone."""
    return f".{Path(os.path.abspath(target)).name}.tmp-{_owner()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove `.NAME.tmp-*` directories, `.NAME.old-*` leftovers and `.NAME.*.tmp` files of
    `target` whose writing process (on this host) is gone; log each one. Returns what was removed."""
    target = Path(target)
    name = re.escape(target.name)
    pattern = re.compile(rf"^\.{name}\.(?:tmp-|old-|)(\d+)-([0-9a-f]{{8}})(?:-.*|\.tmp)?$")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:  # parent missing or unreadable: nothing of ours there
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if not m or m.group(2) != _host_tag() or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        log.warning("removed %s: a temporary left by an interrupted run (process %s is gone)", p, m.group(1))
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------
# The output guard: every command that writes a file or directory calls check_output first (and
# atomic_dir calls it again before replacing anything), so no command deletes data it did not write.

def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable = (),
                 markers: Iterable[str] = (MANIFEST,), is_dir: bool = True) -> None:
    """Raise OutputError unless writing `target` can only replace a previous output of toucan.

    - An existing non-empty output is refused unless `overwrite`.
    - Even with `overwrite`, never: an output that is, or contains, one of `inputs` (the same
      command's); the working directory or one of its parents; a directory without any of
      `markers` (toucan.json, or the file by which a command recognises its own output); a
      directory where a file is expected, or a file where a directory is.
    """
    t = Path(os.path.abspath(target))
    real = Path(os.path.realpath(target))
    for inp in inputs:
        if inp is None:
            continue
        i = Path(os.path.realpath(inp))
        if _within(i, real):
            what = "is" if i == real else "contains"
            raise OutputError(f"output {target} {what} an input of this command ({inp}): choose another output")
    if not os.path.lexists(t):
        return
    cwd = Path(os.path.realpath(os.getcwd()))
    if _within(cwd, real):
        raise OutputError(f"output {target} is the working directory or one of its parents: choose another output")
    if real.is_dir():
        if not is_dir:
            raise OutputError(f"output {target} is a directory: give a file name")
        if not any(real.iterdir()):
            return
        markers = tuple(markers)
        if not overwrite:
            raise OutputError(f"output {target} exists and is not empty: pass --overwrite to replace it, "
                              f"or choose another output")
        if not any((real / m).is_file() for m in markers):
            raise OutputError(f"output {target} was not written by toucan (no {' or '.join(markers)} in it): "
                              f"refusing to replace it, even with --overwrite")
        return
    if is_dir:
        raise OutputError(f"output {target} is a file, not a directory: refusing to replace it")
    if real.stat().st_size and not overwrite:
        raise OutputError(f"output {target} exists: pass --overwrite to replace it, or choose another output")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (),
               markers: Iterable[str] = (MANIFEST,)) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it is renamed to `target`.
    On any error it is removed, so an interrupted run leaves nothing that looks like a result.
    (A SIGKILL leaves only a `.name.tmp-PID-HOST-*` directory, which no loader mistakes for a model
    and the next atomic_dir of the same target removes.) An existing `target` is replaced only as
    check_output allows (`overwrite`, `inputs`, `markers`), checked before and after the work."""
    target = Path(os.path.abspath(target))  # "out/" or "a/.." must name the folder itself
    markers = tuple(markers)
    check_output(target, overwrite=overwrite, inputs=inputs, markers=markers)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        yield tmp
        _publish_mode(tmp, is_dir=True)
        # again: the work may have taken hours, and something may have appeared there meanwhile
        check_output(target, overwrite=overwrite, inputs=inputs, markers=markers)
        if os.path.lexists(target):
            old = target.with_name(f".{target.name}.old-{_owner()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
