"""`toucan apply-delta --base B --delta D --output M`: restore the model, verified tensor by tensor."""

from __future__ import annotations

from ..config import ApplyDeltaConfig
from ..delta import apply_delta


def run(cfg: ApplyDeltaConfig) -> int:
    apply_delta(cfg.base, cfg.delta, cfg.output, cfg, verify_sha256=cfg.verify_sha256, overwrite=cfg.overwrite)
    print(f"{cfg.output}: restored and verified against {cfg.delta} "
          f"({'sha256' if cfg.verify_sha256 else 'xxh3-128'} of the base and of every restored tensor)")
    return 0
