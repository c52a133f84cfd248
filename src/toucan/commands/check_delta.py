"""`toucan check-delta --base B --delta D [--model M]`: one line per tensor; exit 1 on a mismatch."""

from __future__ import annotations

from ..config import CheckDeltaConfig
from ..delta import check_delta


def run(cfg: CheckDeltaConfig) -> int:
    rows = check_delta(cfg.base, cfg.delta, cfg.model)
    for status, what, name in rows:
        print(f"{status:8s} {what:6s} {name}")
    bad = [r for r in rows if r[0] != "match"]
    print(f"{len(rows) - len(bad)} match, {len(bad)} mismatch")
    return 1 if bad else 0
