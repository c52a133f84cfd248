"""`toucan verify DIR`: check a directory against its toucan.json; print problems, exit 1 if any."""

from __future__ import annotations

from ..config import VerifyConfig
from ..fsutil import MANIFEST
from ..manifest import read_manifest, verify_manifest


def run(cfg: VerifyConfig) -> int:
    problems = verify_manifest(cfg.directory)
    if problems:
        for p in problems:
            print(p)
        print(f"{cfg.directory}: {len(problems)} problem(s)")
        return 1
    n = len(read_manifest(cfg.directory).get("files", {}))
    print(f"{cfg.directory}: OK ({n} files match {MANIFEST})")
    return 0
