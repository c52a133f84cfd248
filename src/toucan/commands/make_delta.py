"""`toucan make-delta --base B --model M --output D`: the weights of M as a delta against B."""

from __future__ import annotations

from ..config import MakeDeltaConfig
from ..delta import make_delta


def run(cfg: MakeDeltaConfig) -> int:
    info = make_delta(cfg.base, cfg.model, cfg.output, cfg.max_shard_size, cfg, overwrite=cfg.overwrite)
    print(f"{cfg.output}: delta of {len(info['tensors'])} tensors "
          f"({sum(p['base'] is None for p in info['tensors'].values())} stored as they are, "
          f"{sum(p['base_rows'] is not None for p in info['tensors'].values())} with new vocabulary rows)")
    return 0
