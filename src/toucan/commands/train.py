"""`toucan train --model M --data FILE... --output OUT`: supervised fine-tuning (full or LoRA).

Config -> toucan.training: tokenizer and examples, TrainingArguments, the model (+ LoRA), `fit`,
then rank 0 saves OUT (a Hugging Face model directory, or an adapter) with its manifest. Every
rank runs this under torchrun / DeepSpeed / FSDP.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from ..config import TrainConfig
from ..errors import ConfigError
from ..fsutil import check_output
from ..lora import LoraSettings, apply_lora
from ..modeling import check_model_dir, load_tokenizer, save_model_dir
from ..training import (TrainResult, barrier, checkpoint_dir, data_files, fit, load_examples, load_model,
                        prepare_model, rank, resolve_resume, shutdown_distributed, training_arguments,
                        world_size)

log = logging.getLogger(__name__)

# TrainConfig fields that are TrainingArguments fields under the same name.
TRAINER_FIELDS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "learning_rate", "weight_decay", "lr_scheduler_type", "logging_steps", "save_steps",
                  "save_total_limit", "seed", "bf16", "fp16", "tf32", "report_to")


def trainer_args(cfg: TrainConfig, **overrides: Any):
    """The run's TrainingArguments: the config's Trainer fields, then its pass-through flags."""
    return training_arguments(checkpoint_dir(cfg.output), deepspeed=cfg.deepspeed, fsdp=cfg.fsdp,
                              gradient_checkpointing=cfg.gradient_checkpointing, extra_args=cfg.extra_args,
                              # transformers 5: a warmup_steps value < 1 is a fraction of the steps
                              warmup_steps=cfg.warmup_ratio,
                              **{k: getattr(cfg, k) for k in TRAINER_FIELDS}, **overrides)


def _inputs(cfg: TrainConfig) -> list:
    """What --output must never replace or contain (fsutil.check_output)."""
    return [cfg.model, cfg.tokenizer, *data_files(cfg.data),
            cfg.resume_from_checkpoint if cfg.resume_from_checkpoint not in (None, "auto") else None]


def train(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune and save; returns the loss history (for Python callers and tests)."""
    from transformers import set_seed

    if cfg.model is None or cfg.output is None or not cfg.data:
        raise ConfigError("--model, --data and --output are required")
    # Before hours of training: an output that could not be written at the end is refused now.
    check_output(cfg.output, overwrite=cfg.overwrite, inputs=_inputs(cfg))
    check_model_dir(cfg.model)  # a wrong --model is named as such, not as a missing tokenizer
    # Before the data (a bad pass-through flag fails at once) and before the model (with ZeRO-3,
    # TrainingArguments make from_pretrained load it partitioned).
    args = trainer_args(cfg)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    examples = load_examples(cfg.data, tokenizer, max_len=cfg.max_len, template=cfg.template, seed=cfg.seed,
                             skip_bad=cfg.skip_bad)
    log.info("%d training examples, %d tokens", len(examples), sum(len(e["input_ids"]) for e in examples))
    model = load_model(cfg.model, cfg.trust_remote_code)
    added = prepare_model(model, tokenizer)
    if cfg.finetuning_type == "lora":
        lora = LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target=cfg.lora_target, train_embeddings=cfg.lora_train_embeddings)
        model = apply_lora(model, lora, base=cfg.model, gradient_checkpointing=cfg.gradient_checkpointing)
    result = fit(model, tokenizer, examples, args, packing=cfg.packing, max_len=cfg.max_len, fsdp=cfg.fsdp,
                 resume=resolve_resume(cfg.resume_from_checkpoint, cfg.output), callbacks=callbacks)
    if rank() == 0:
        save_model_dir(cfg.output, result.saveable, tokenizer, command="train", config=cfg,
                       inputs=data_files(cfg.data), overwrite=cfg.overwrite, guard_inputs=_inputs(cfg),
                       manifest_extra={"train": {"global_step": result.global_step,
                                                 "examples": result.train_examples,
                                                 "packed_rows": result.train_rows if cfg.packing else None,
                                                 "world_size": world_size(),
                                                 "embedding_rows_added": added,
                                                 "finetuning_type": cfg.finetuning_type,
                                                 "log_history": result.log_history}})
        log.info("saved %s", cfg.output)
    barrier()
    return result


def run(cfg: TrainConfig) -> int:
    try:
        train(cfg)
    finally:
        shutdown_distributed()
    return 0
