"""LoRA through peft: wrap a model for `toucan train --finetuning_type lora`, and
`toucan merge-lora` to fold an adapter back into a full model directory.

An adapter directory (what a LoRA run's --output holds): adapter_config.json,
adapter_model.safetensors, the tokenizer, toucan.json. With an extended vocabulary the base's
embeddings are resized to the tokenizer first (new rows = mean of old, deterministic), so
merge-lora rebuilds exactly the model the adapter was trained on.
"""

from __future__ import annotations

import logging

from .config import MergeLoraConfig, TrainConfig

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
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)", cfg.lora_rank, cfg.lora_alpha,
             cfg.lora_target, trainable, total, 100 * trainable / total)
    return peft_model


def load_merged(base: str, adapter: str, tokenizer=None):
    """Base + adapter merged into a plain causal LM (fp32). The base is loaded explicitly:
    AutoPeftModelForCausalLM would try the Hub for a base without base_model_name_or_path."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .modeling import check_model_dir, load_tokenizer
    from .train import resize_embeddings

    check_model_dir(base)
    tokenizer = tokenizer or load_tokenizer(adapter)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, adapter)
    return model.merge_and_unload(), tokenizer


def run_merge_lora(cfg: MergeLoraConfig) -> int:
    """`toucan merge-lora --base DIR --adapter DIR --output DIR`: a full model directory."""
    from pathlib import Path

    from .errors import ModelError
    from .modeling import save_model_dir

    if not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise ModelError(f"{cfg.adapter}: no adapter_config.json (not a LoRA adapter directory)")
    model, tokenizer = load_merged(cfg.base, cfg.adapter)
    save_model_dir(cfg.output, model, tokenizer, command="merge-lora", config=cfg, inputs=[cfg.base, cfg.adapter])
    log.info("merged %s + %s -> %s", cfg.base, cfg.adapter, cfg.output)
    return 0
