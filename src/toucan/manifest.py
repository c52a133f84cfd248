"""toucan.json: what made a directory (command, config, versions, input hashes) and the sha256 of
every file in it, so a model directory can be checked after a copy, a merge or a download."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .errors import ManifestError
from .fsutil import MANIFEST, atomic_write_json, sha256_file


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"toucan": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "gptqmodel", "deepspeed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _config_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def hash_inputs(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """sha256 of input files; a directory contributes each file below it."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name != MANIFEST:
                    out[str(f)] = sha256_file(f)
        elif p.is_file():
            out[str(p)] = sha256_file(p)
    return out


def hash_outputs(directory: str | os.PathLike, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file below `directory`; `known` (relative name -> sha256) skips re-reading
    multi-GB files that were hashed while being written."""
    d, known = Path(directory), known or {}
    out = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            name = str(f.relative_to(d))
            out[name] = known[name] if name in known else sha256_file(f)
    return out


def write_manifest(directory: str | os.PathLike, command: str, config: Any = None,
                   inputs: Iterable[str | os.PathLike] = (), extra: dict | None = None,
                   known: dict[str, str] | None = None) -> dict:
    """Write toucan.json into `directory` (call it last, after every output file is written).
    `command`: the toucan command that made it, as the caller names it (never sys.argv: `toucan demo`
    makes models too); `config`: the options it ran with. `known`: sha256 of files already hashed
    while written (see hash_outputs)."""
    manifest = {
        "command": command,
        "config": _config_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "inputs": hash_inputs(inputs),
        "files": hash_outputs(directory, known),
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST} (not written by toucan, or incomplete)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p}: invalid JSON ({e.msg})") from None


def verify_manifest(directory: str | os.PathLike) -> list[str]:
    """Problems found (empty list = the directory matches its manifest)."""
    manifest = read_manifest(directory)
    actual = hash_outputs(directory)
    problems = []
    for name, digest in manifest.get("files", {}).items():
        if name not in actual:
            problems.append(f"missing: {name}")
        elif actual[name] != digest:
            problems.append(f"changed: {name}")
    for name in actual.keys() - manifest.get("files", {}).keys():
        problems.append(f"unexpected: {name}")
    return problems


def check_manifest(directory: str | os.PathLike) -> None:
    problems = verify_manifest(directory)
    if problems:
        raise ManifestError(f"{directory} does not match {MANIFEST}: " + "; ".join(problems))

