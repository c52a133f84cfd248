"""`toucan merge-lora --model ADAPTER [--base DIR] --output DIR`: a full model directory."""

from __future__ import annotations

import logging

from ..config import MergeLoraConfig
from ..errors import ModelError
from ..fsutil import check_output
from ..lora import load_merged
from ..modeling import adapter_base, is_adapter, save_model_dir

log = logging.getLogger(__name__)


def run(cfg: MergeLoraConfig) -> int:
    if not is_adapter(cfg.model):
        raise ModelError(f"{cfg.model}: no adapter_config.json (not a LoRA adapter directory)")
    base = adapter_base(cfg.model, cfg.base)
    inputs = [str(base), cfg.model]
    check_output(cfg.output, overwrite=cfg.overwrite, inputs=inputs)  # before the merge, not after
    model, tokenizer = load_merged(str(base), cfg.model, trust_remote_code=cfg.trust_remote_code)
    save_model_dir(cfg.output, model, tokenizer, command="merge-lora", config=cfg, inputs=inputs,
                   overwrite=cfg.overwrite)
    log.info("merged %s + %s -> %s", base, cfg.model, cfg.output)
    return 0
