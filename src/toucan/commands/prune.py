"""`toucan prune --model M --output O --method magnitude|wanda|sparsegpt --sparsity 0.5 [--pattern 2:4]`."""

from __future__ import annotations

from ..config import PruneConfig
from ..prune import check_method, parse_target, prune_dir


def run(cfg: PruneConfig) -> int:
    target = parse_target(cfg.sparsity, cfg.pattern)
    check_method(cfg.method, cfg.blocksize, cfg.data, cfg.calib_samples, cfg.damp_percent)
    p = prune_dir(cfg.model, cfg.output, cfg.method, target, data=cfg.data, calib_samples=cfg.calib_samples,
                  max_len=cfg.max_len, template=cfg.template, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                  blocksize=cfg.blocksize, damp_percent=cfg.damp_percent, overwrite=cfg.overwrite,
                  trust_remote_code=cfg.trust_remote_code, config=cfg)
    print(f"{cfg.output}: {cfg.method} {target}, {len(p['layers'])} layers pruned to "
          f"{p['measured_sparsity']:.2%} zeros, {len(p['skipped'])} skipped, {p['seconds']:.1f} s")
    return 0
