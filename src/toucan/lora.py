"""LoRA through peft: wrap a model for `toucan train --finetuning-type lora`, and
`toucan merge-lora` to fold an adapter back into a full model directory. (Commands that take
--model also load an adapter directly: toucan.modeling.load_adapter.)

An adapter directory (what a LoRA run's --output holds): adapter_config.json,
adapter_model.safetensors, the tokenizer, toucan.json. With an extended vocabulary the base's
embeddings are resized to the tokenizer first (new rows = mean of old, deterministic), so
merge-lora rebuilds exactly the model the adapter was trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import MergeLoraConfig, TrainConfig
from .errors import ModelError
from .fsutil import check_output
from .modeling import adapter_base, is_adapter, load_adapter, load_tokenizer, save_model_dir

log = logging.getLogger(__name__)

EMBEDDING_MODULES = ["embed_tokens", "lm_head"]


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig, TaskType

    targets = cfg.lora_target
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=target,
                      # A new vocabulary's rows start as the mean: the embeddings and head must
                      # learn them, so both are trained in full and saved with the adapter.
                      modules_to_save=list(EMBEDDING_MODULES) if cfg.lora_train_embeddings else None)


def apply_lora(model, cfg: TrainConfig):
    from peft import get_peft_model

    if cfg.gradient_checkpointing:
        # frozen inputs give checkpointed blocks no grad to carry back to the adapters
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(cfg))
    # peft records the base as given (--model runs/base): make it absolute, so `chat --model
    # ADAPTER` finds the base from any working directory (--base overrides it when moved).
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(cfg.model).resolve())
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)", cfg.lora_rank, cfg.lora_alpha,
             cfg.lora_target, trainable, total, 100 * trainable / total)
    return peft_model


def load_merged(base: str | None, adapter: str, tokenizer=None, trust_remote_code: bool = False):
    """Base + adapter merged into a plain causal LM (fp32, on the CPU), and the tokenizer.
    `base` None: the one recorded in the adapter (modeling.adapter_base)."""
    b = adapter_base(adapter, base)
    tokenizer = tokenizer or load_tokenizer(adapter, trust_remote_code=trust_remote_code, base=b)
    model = load_adapter(adapter, b, device="cpu", dtype="float32", merge=True,
                         trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    return model, tokenizer


def run_merge_lora(cfg: MergeLoraConfig) -> int:
    """`toucan merge-lora --model ADAPTER [--base DIR] --output DIR`: a full model directory."""
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
