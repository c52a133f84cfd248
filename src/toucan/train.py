"""`toucan train`: supervised fine-tuning (full or LoRA) with the Hugging Face Trainer.

One code path for a laptop CPU and a multi-GPU node: the same function runs alone, under
`torchrun --nproc_per_node=N` (DDP), with DeepSpeed ZeRO-2/3 (`--deepspeed zero3`, configs shipped
in toucan/configs), or sharded with FSDP (`--fsdp`).

    records (toucan.data) -> encode_record (prompt masked, response + EOS kept) -> [pack]
      -> SFTCollator (right-pad: input_ids with pad id, labels with -100) -> Trainer -> save_model_dir

Layout of an output: `--output_dir OUT` is a standard Hugging Face model directory (safetensors,
tokenizer, config, toucan.json manifest), written atomically at the end. Trainer checkpoints go to
`OUT-checkpoints/` (a sibling, so the final atomic write of OUT never touches them and
`toucan verify OUT` sees only the model); `--resume_from_checkpoint auto` looks there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import TrainConfig
from .data import IGNORE_INDEX, encode_records, load_dataset_spec, parse_spec
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"   # shipped DeepSpeed configs (zero2.json, zero3.json, ...)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(str(cfg.output_dir).rstrip("/") + "-checkpoints")


# ----------------------------------------------------------------------------------------------
# Data

def data_files(specs: Sequence[str]) -> list[str]:
    """The files behind data specs (`FILE`, `FILE:N`, `FILE:0.5`), for the manifest's hashes."""
    return [parse_spec(s)[0] for s in specs]


def load_examples(cfg: TrainConfig, tokenizer) -> list[dict]:
    """Records from every --data_path (sampling, dedup, seeded shuffle: toucan.data), tokenized by
    toucan.data's rule (prompt masked, response + EOS kept)."""
    records, _ = load_dataset_spec(list(cfg.data_path), seed=cfg.seed, skip_bad=cfg.skip_bad)
    _, encoded, rep = encode_records(tokenizer, records, cfg.model_max_length, cfg.template)
    if rep.truncated or rep.dropped_no_room or rep.dropped_short:
        log.info("%d example(s) truncated to %d tokens, %d dropped", rep.truncated, cfg.model_max_length,
                 rep.dropped_no_room + rep.dropped_short)
    if not encoded:
        raise DataError(f"no usable training examples (max length {cfg.model_max_length})",
                        file=", ".join(cfg.data_path))
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


@dataclass
class SFTCollator:
    """Right-pad a batch: input_ids with the pad id, labels with -100, attention_mask 0 on padding.

    Labels are padded with IGNORE_INDEX explicitly rather than derived from input_ids == pad_id:
    LLaMA tokenizers often have pad == eos, and deriving the mask from the pad id would drop every
    EOS from the loss, so the model never learns to stop (the classic Alpaca/LLaMA bug)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = math.ceil(n / self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------
# Trainer arguments

# TrainConfig fields that are TrainingArguments fields under the same name.
_TA_FIELDS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "learning_rate", "weight_decay", "lr_scheduler_type", "logging_steps", "save_steps",
              "save_total_limit", "seed", "bf16", "fp16", "tf32", "report_to")


def resolve_deepspeed(spec: str | None) -> str | None:
    """A DeepSpeed config path: a JSON file, or the name of a shipped config (zero3, zero3_offload...)."""
    if not spec:
        return None
    if os.path.isfile(spec):
        return spec
    shipped = CONFIGS / (spec if spec.endswith(".json") else f"{spec}.json")
    if shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in CONFIGS.glob("*.json"))
    raise ConfigError(f"--deepspeed {spec}: no such file and no shipped config of that name "
                      f"(shipped: {', '.join(names) or 'none'})")


def training_arguments(cfg: TrainConfig, **overrides: Any):
    """TrainingArguments from the config plus the pass-through flags (`extra_args`), parsed by
    HfArgumentParser so every Trainer flag works exactly as in the original scripts."""
    from transformers import HfArgumentParser, TrainingArguments

    values: dict[str, Any] = {k: getattr(cfg, k) for k in _TA_FIELDS}
    values.update(
        output_dir=str(checkpoint_dir(cfg)),
        warmup_steps=cfg.warmup_ratio,       # transformers 5: a value < 1 is a fraction of the steps
        save_strategy="steps",
        logging_strategy="steps",
        deepspeed=resolve_deepspeed(cfg.deepspeed),
        remove_unused_columns=False,         # our dataset is already exactly the model's inputs
        dataloader_num_workers=0,
        dataloader_pin_memory=_cuda_available(),
        disable_tqdm=rank() != 0,
        # transformers 5 renamed gradient_checkpointing; only pass it when asked (no warning otherwise)
        activation_checkpointing=True if cfg.gradient_checkpointing else None,
    )
    values.update(overrides)
    argv: list[str] = []
    for k, v in values.items():
        if v is None:
            continue
        argv += [f"--{k}", str(v)]
    parser = HfArgumentParser(TrainingArguments)
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv + list(cfg.extra_args))
    except SystemExit:
        raise ConfigError(f"invalid Trainer flag(s) among: {' '.join(cfg.extra_args)}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return args


# ----------------------------------------------------------------------------------------------
# Training

@dataclass
class TrainResult:
    output_dir: Path
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0
    train_examples: int = 0

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.log_history if "loss" in h]


def _load_model(cfg: TrainConfig):
    import torch
    from transformers import AutoModelForCausalLM

    from .modeling import check_model_dir

    check_model_dir(cfg.model_name_or_path)
    # fp32 master weights: mixed precision (--bf16/--fp16) is the Trainer's job, and fp32 is the
    # fast path on CPUs without AMX.
    return AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=torch.float32)


def resize_embeddings(model, vocab_size: int) -> int:
    """Grow embed_tokens and lm_head to `vocab_size` rows, new rows = the mean of the old rows.
    Returns how many rows were added. Works under DeepSpeed ZeRO-3, where parameters are
    partitioned and a naive `weight.shape[0]` reads 0 (the original Toucan's bug).

    Written here rather than using transformers' `mean_resizing=True`: that samples new rows from
    a Gaussian around the mean (random), whereas the exact mean is deterministic, so merge-lora
    and a frozen-embedding LoRA run rebuild bit-identical rows from the base alone."""
    import contextlib

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    old = model.config.vocab_size   # the config, not weight.shape: under ZeRO-3 that shape is 0
    if vocab_size <= old:
        return 0
    model.resize_token_embeddings(vocab_size, mean_resizing=False)   # ZeRO-3 aware in transformers
    params = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not params[0]:
        params.append(head.weight)
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with gather, torch.no_grad():
        for w in params:
            w[old:] = w[:old].mean(dim=0, keepdim=True)
    log.info("resized embeddings and lm_head: %d -> %d rows (new rows = mean of old)", old, vocab_size)
    return vocab_size - old


class _StateDictSaver:
    """Lets save_model_dir write a model whose full weights exist only as a gathered state dict
    (DeepSpeed ZeRO-3, FSDP): save_pretrained with that state dict instead of the empty shards."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kw):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kw)


def _final_state_dict(trainer):
    """Full weights for saving, gathered on every rank (a collective under ZeRO-3); None when the
    unwrapped model already holds them."""
    if trainer.is_deepspeed_enabled:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return None


def train(cfg: TrainConfig) -> TrainResult:
    """Fine-tune and save; returns the loss history. Every rank calls this under torchrun."""
    import torch
    from transformers import Trainer, set_seed

    from .modeling import load_tokenizer, save_model_dir

    if cfg.model_name_or_path is None or cfg.output_dir is None or not cfg.data_path:
        raise ConfigError("--model_name_or_path, --data_path and --output_dir are required")
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
    examples = load_examples(cfg, tokenizer)
    log.info("%d training examples, %d tokens", len(examples), sum(len(e["input_ids"]) for e in examples))

    # TrainingArguments before the model: with ZeRO-3 this makes from_pretrained load partitioned.
    args = training_arguments(cfg)
    model = _load_model(cfg)
    model.config.use_cache = False
    added = resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.finetuning_type == "lora":
        from .lora import apply_lora

        model = apply_lora(model, cfg)

    trainer = Trainer(model=model, args=args, train_dataset=examples,
                      data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    out = trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    log.info("training done: %d steps, train_loss %.4f", trainer.state.global_step, out.training_loss)

    state_dict = _final_state_dict(trainer)
    if trainer.is_world_process_zero():
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        saveable = unwrapped if state_dict is None else _StateDictSaver(unwrapped, state_dict)
        save_model_dir(cfg.output_dir, saveable, tokenizer, command="train", config=cfg,
                       inputs=data_files(cfg.data_path),
                       manifest_extra={"train": {"global_step": trainer.state.global_step,
                                                 "train_loss": out.training_loss,
                                                 "examples": len(examples),
                                                 "world_size": world_size(),
                                                 "embedding_rows_added": added,
                                                 "finetuning_type": cfg.finetuning_type,
                                                 "log_history": trainer.state.log_history}})
        log.info("saved %s", cfg.output_dir)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return TrainResult(Path(cfg.output_dir), list(trainer.state.log_history), trainer.state.global_step,
                       len(examples))


def run_train(cfg: TrainConfig) -> int:
    """`toucan train`; Python callers can use `train(cfg)` to get the loss history back."""
    train(cfg)
    return 0
