"""LoRA through peft: wrap a model for `toucan train --finetuning-type lora` (apply_lora), and
fold an adapter back into a full model (load_merged, what `toucan merge-lora` writes). (Commands
that take --model also load an adapter directly: toucan.modeling.load_adapter.)

An adapter directory (what a LoRA run's --output holds): adapter_config.json,
adapter_model.safetensors, the tokenizer, toucan.json. With an extended vocabulary the base's
embeddings are resized to the tokenizer first (new rows = mean of old, deterministic), so
merge-lora rebuilds exactly the model the adapter was trained on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .modeling import adapter_base, load_adapter, load_tokenizer

log = logging.getLogger(__name__)

EMBEDDING_MODULES = ["embed_tokens", "lm_head"]


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA run adapts and how; no defaults here (they are `toucan train`'s flags)."""

    rank: int
    alpha: float
    dropout: float
    target: Sequence[str]           # module names, or ["all-linear"]
    train_embeddings: bool          # also train (and save) embed_tokens and lm_head in full


def lora_config(s: LoraSettings):
    from peft import LoraConfig, TaskType

    target = "all-linear" if list(s.target) == ["all-linear"] else list(s.target)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=s.rank, lora_alpha=s.alpha,
                      lora_dropout=s.dropout, target_modules=target,
                      # A new vocabulary's rows start as the mean: the embeddings and head must
                      # learn them, so both are trained in full and saved with the adapter.
                      modules_to_save=list(EMBEDDING_MODULES) if s.train_embeddings else None)


def apply_lora(model, s: LoraSettings, base: str | os.PathLike, gradient_checkpointing: bool = False):
    """`model` (loaded from the directory `base`) wrapped with fresh LoRA adapters."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # frozen inputs give checkpointed blocks no grad to carry back to the adapters
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(s))
    # peft records the base as given (--model runs/base): make it absolute, so `chat --model
    # ADAPTER` finds the base from any working directory (--base overrides it when moved).
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)", s.rank, s.alpha,
             list(s.target), trainable, total, 100 * trainable / total)
    return peft_model


def load_merged(base: str | None, adapter: str, tokenizer=None, trust_remote_code: bool = False):
    """Base + adapter merged into a plain causal LM (fp32, on the CPU), and the tokenizer.
    `base` None: the one recorded in the adapter (modeling.adapter_base)."""
    b = adapter_base(adapter, base)
    tokenizer = tokenizer or load_tokenizer(adapter, trust_remote_code=trust_remote_code, base=b)
    model = load_adapter(adapter, b, device="cpu", dtype="float32", merge=True,
                         trust_remote_code=trust_remote_code, tokenizer=tokenizer)
    return model, tokenizer
