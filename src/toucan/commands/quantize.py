"""`toucan quantize --model M --output O [--method gptq|rtn] [--bits 4] [--group-size 128] --calib-data D`."""

from __future__ import annotations

from ..config import QuantizeConfig
from ..quant.gptq import GptqSettings, quantize_model


def settings(cfg: QuantizeConfig) -> GptqSettings:
    """The quantizer's settings from the flags (--asym overrides --sym)."""
    return GptqSettings(method=cfg.method, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym and not cfg.asym,
                        desc_act=cfg.desc_act, damp_percent=cfg.damp_percent, mse=cfg.mse, gptaq=cfg.gptaq,
                        keep_sparsity=cfg.keep_sparsity, calib_samples=cfg.calib_samples, max_len=cfg.max_len,
                        template=cfg.template, seed=cfg.seed, device=cfg.device)


def run(cfg: QuantizeConfig) -> int:
    r = quantize_model(cfg.model, cfg.output, settings(cfg), data=cfg.data, base=cfg.base, overwrite=cfg.overwrite,
                       trust_remote_code=cfg.trust_remote_code, config=cfg)
    padded = f", MLP width {r.padding[0]} zero-padded to {r.padding[1]}" if r.padding else ""
    print(f"{r.output}: {r.method} {r.bits}-bit group {r.group_size}, {len(r.quantized)} layers quantized, "
          f"{len(r.skipped)} kept in full precision{padded}, weights {r.size_mib:.2f} MiB, {r.seconds:.1f} s")
    return 0
