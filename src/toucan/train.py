"""`toucan train`: supervised fine-tuning (full or LoRA) with the Hugging Face Trainer.

One code path for a laptop CPU and a multi-GPU node: the same function runs alone, under
`torchrun --nproc_per_node=N` (DDP), with DeepSpeed ZeRO-2/3 (`--deepspeed zero3`, configs shipped
in toucan/configs), or sharded with FSDP (`--fsdp`).

    records (toucan.data) -> encode_record (prompt masked, response + EOS kept) -> [pack]
      -> SFTCollator (right-pad: input_ids with pad id, labels with -100) -> Trainer -> save_model_dir

Layout of an output: `--output OUT` is a standard Hugging Face model directory (safetensors,
tokenizer, config, toucan.json manifest), written atomically at the end. Trainer checkpoints go to
`OUT-checkpoints/` (a sibling, so the final atomic write of OUT never touches them and
`toucan verify OUT` sees only the model); `--resume-from-checkpoint auto` looks there.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from .config import TrainConfig
from .collate import PackedCollator, SFTCollator, pack_examples, response_loss
from .data import IGNORE_INDEX, encode_records, load_dataset_spec, parse_spec
from .errors import ConfigError, DataError
from .fsutil import atomic_write_json, check_output
from .lora import apply_lora
# resize_embeddings is also what LoRA adapters load with (modeling.load_adapter)
from .modeling import (check_model_dir, check_remote_code, load_error, load_errors, load_tokenizer,
                       resize_embeddings, save_model_dir)

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"   # shipped DeepSpeed configs (zero2.json, zero3.json, ...)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def shutdown_distributed() -> None:
    """Destroy the process group (set up by accelerate, DeepSpeed or train_fsdp_cpu) while the
    interpreter is still whole. Every rank calls it last, after train() (which ends in a barrier).

    Left to interpreter exit, gloo's worker threads can still be dropping their last references to
    the tensors of finished collectives (the final barrier, ZeRO-3's async all-gathers) while Python
    is finalizing; that decref needs the GIL, and a rank that trained and saved fine dies with
    SIGABRT, failing the whole torchrun (pytorch/pytorch#190489; torch 2.13 has no atexit hook for
    it, #157193 is still open). destroy_process_group joins those threads first."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(str(cfg.output).rstrip("/") + "-checkpoints")


# ----------------------------------------------------------------------------------------------
# Data

def data_files(specs: Sequence[str]) -> list[str]:
    """The files behind data specs (`FILE`, `FILE:N`, `FILE:0.5`), for the manifest's hashes."""
    return [parse_spec(s)[0] for s in specs]


def _inputs(cfg: TrainConfig) -> list:
    """What --output must never replace or contain (fsutil.check_output)."""
    return [cfg.model, cfg.tokenizer, *data_files(cfg.data),
            cfg.resume_from_checkpoint if cfg.resume_from_checkpoint not in (None, "auto") else None]


def load_examples(cfg: TrainConfig, tokenizer) -> list[dict]:
    """Records from every --data file (sampling, dedup, seeded shuffle: toucan.data), tokenized by
    toucan.data's rule (prompt masked, response + EOS kept)."""
    records, _ = load_dataset_spec(list(cfg.data), seed=cfg.seed, skip_bad=cfg.skip_bad)
    _, encoded, rep = encode_records(tokenizer, records, cfg.max_len, cfg.template)
    if rep.truncated or rep.dropped_no_room or rep.dropped_short:
        log.info("%d example(s) truncated to %d tokens, %d dropped", rep.truncated, cfg.max_len,
                 rep.dropped_no_room + rep.dropped_short)
    if not encoded:
        raise DataError(f"no usable training examples (max length {cfg.max_len})",
                        file=", ".join(cfg.data))
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


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


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when it first sets up
    communication (2-6 minutes on 2 cores). Only its inference all-reduce uses that op; training
    collectives go through torch.distributed (gloo). Marking it unavailable in DeepSpeed's own
    table of compatible ops (a dict it keeps for this) lets a CPU run start at once."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _cpu_distributed(values: dict, extra_args: Sequence[str]) -> None:
    """Make torchrun on CPUs really distributed (transformers 5.24 / accelerate 1.15, probed):
    - plain: without use_cpu, TrainingArguments on a GPU-less machine sets up DistributedType.NO
      with world_size 1, so each process silently trains its own copy; use_cpu gives MULTI_CPU
      (DDP over gloo).
    - DeepSpeed: TrainingArguments passes no backend to accelerate on this path, which then counts
      1 process while DeepSpeed counts N (its batch-size check fails). We set up accelerate's
      shared state ourselves with gloo and tell TrainingArguments to use it."""
    if not values.get("deepspeed"):
        values["use_cpu"] = True
        return
    from accelerate import PartialState

    _skip_deepspeed_shm_op()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"   # what TrainingArguments itself sets around this call
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    if "--accelerator_config" not in extra_args:
        values["accelerator_config"] = '{"use_configured_state": true}'


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
    if cfg.fsdp and _cuda_available():
        # on GPUs the Trainer's own FSDP2 shards for real (on CPU see train_fsdp_cpu)
        values.update(fsdp="full_shard auto_wrap",
                      fsdp_config='{"version": 2, "state_dict_type": "FULL_STATE_DICT"}')
    values.update(overrides)
    if world_size() > 1 and not _cuda_available():
        _cpu_distributed(values, cfg.extra_args)
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
# Checkpoints: complete or invisible

CHECKPOINT_MARKER = "toucan-checkpoint.json"


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once every rank has written it: a file list with sizes, written
    atomically last. The Trainer writes checkpoint-N/ in place, so a run killed mid-save (or
    mid-rotation) leaves a folder that looks like a checkpoint; `auto` resume takes only marked
    ones whose files are all still there."""

    def on_save(self, args, state, control, **kw):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()   # every rank's shards are on disk
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            files = {str(f.relative_to(ckpt)): f.stat().st_size
                     for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != CHECKPOINT_MARKER}
            atomic_write_json(ckpt / CHECKPOINT_MARKER, {"global_step": state.global_step, "files": files})
        return control


def checkpoint_complete(path: str | os.PathLike) -> bool:
    import json

    marker = Path(path) / CHECKPOINT_MARKER
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((Path(path) / name).is_file() and (Path(path) / name).stat().st_size == size
               for name, size in files.items())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint-N with the highest N; incomplete ones are skipped with a warning."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in d.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, p in reversed(steps):
        if checkpoint_complete(p):
            return p
        log.warning("%s is incomplete (no valid %s): skipped", p, CHECKPOINT_MARKER)
    return None


def resolve_resume(cfg: TrainConfig) -> str | None:
    r = cfg.resume_from_checkpoint
    if not r:
        return None
    if r == "auto":
        found = latest_checkpoint(checkpoint_dir(cfg))
        log.info("resume: %s", found or f"no complete checkpoint in {checkpoint_dir(cfg)}, starting fresh")
        return str(found) if found else None
    if not checkpoint_complete(r):
        raise ConfigError(f"--resume_from_checkpoint {r}: not a complete checkpoint (no valid {CHECKPOINT_MARKER})")
    return r


# ----------------------------------------------------------------------------------------------
# Training

@dataclass
class TrainResult:
    output: Path
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0
    train_examples: int = 0
    model: Any = field(default=None, repr=False)     # the trained (possibly wrapped/sharded) model
    trainer: Any = field(default=None, repr=False)   # the HF Trainer (None on the FSDP-on-CPU path)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.log_history if "loss" in h]


def _load_model(cfg: TrainConfig):
    import torch
    from transformers import AutoModelForCausalLM


    check_model_dir(cfg.model)
    check_remote_code(cfg.model, cfg.trust_remote_code)
    # fp32 master weights: mixed precision (--bf16/--fp16) is the Trainer's job, and fp32 is the
    # fast path on CPUs without AMX.
    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32,
                                                    trust_remote_code=cfg.trust_remote_code)
    except load_errors() as e:
        raise load_error(cfg.model, e) from None


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
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    return None


def train(cfg: TrainConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune and save; returns the loss history. Every rank calls this under torchrun.
    `callbacks`: extra transformers TrainerCallbacks (Python API)."""
    import torch
    from transformers import Trainer, set_seed


    if cfg.model is None or cfg.output is None or not cfg.data:
        raise ConfigError("--model, --data and --output are required")
    # Before hours of training: an output that could not be written at the end is refused now.
    check_output(cfg.output, overwrite=cfg.overwrite, inputs=_inputs(cfg))
    check_model_dir(cfg.model)  # a wrong --model is named as such, not as a missing tokenizer
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    examples = load_examples(cfg, tokenizer)
    log.info("%d training examples, %d tokens", len(examples), sum(len(e["input_ids"]) for e in examples))

    # TrainingArguments before the model: with ZeRO-3 this makes from_pretrained load partitioned.
    args = training_arguments(cfg)
    model = _load_model(cfg)
    model.config.use_cache = False
    added = resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.finetuning_type == "lora":

        model = apply_lora(model, cfg)

    collator = SFTCollator(tokenizer.pad_token_id)
    n_examples = len(examples)
    if cfg.packing:
        examples = pack_examples(examples, cfg.max_len)
        collator = PackedCollator(tokenizer.pad_token_id, one_row=True)
        fill = sum(len(r["input_ids"]) for r in examples) / (len(examples) * cfg.max_len)
        log.info("packed %d examples into %d rows of %d tokens (%.1f%% full)", n_examples, len(examples),
                 cfg.max_len, 100 * fill)
    if cfg.fsdp and not _cuda_available():
        result, state_dict, saved_model = train_fsdp_cpu(cfg, model, examples, collator, args)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                          processing_class=tokenizer, callbacks=[*callbacks, CheckpointMarker()],
                          compute_loss_func=response_loss if cfg.packing else None)
        trainer.train(resume_from_checkpoint=resolve_resume(cfg))
        result = TrainResult(Path(cfg.output), list(trainer.state.log_history), trainer.state.global_step,
                             model=trainer.model_wrapped, trainer=trainer)
        state_dict = _final_state_dict(trainer)
        saved_model = trainer.accelerator.unwrap_model(trainer.model)
    result.train_examples = n_examples
    log.info("training done: %d steps, last loss %s", result.global_step, result.losses[-1:] or "n/a")

    if rank() == 0:
        saveable = saved_model if state_dict is None else _StateDictSaver(saved_model, state_dict)
        save_model_dir(cfg.output, saveable, tokenizer, command="train", config=cfg,
                       inputs=data_files(cfg.data), overwrite=cfg.overwrite, guard_inputs=_inputs(cfg),
                       manifest_extra={"train": {"global_step": result.global_step,
                                                 "examples": n_examples,
                                                 "packed_rows": len(examples) if cfg.packing else None,
                                                 "world_size": world_size(),
                                                 "embedding_rows_added": added,
                                                 "finetuning_type": cfg.finetuning_type,
                                                 "log_history": result.log_history}})
        log.info("saved %s", cfg.output)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result


def train_fsdp_cpu(cfg: TrainConfig, model, examples: list[dict], collator, args):
    """FSDP on CPU: shard with torch FSDP2 `fully_shard` over gloo and run a plain loop.

    Hand-written because nothing maintained does this: the HF Trainer (through accelerate) enables
    FSDP only on GPU-like devices and silently runs DDP for --fsdp on CPU. The loop keeps the
    Trainer's semantics: a seeded shuffled sampler per epoch, gradient accumulation, AdamW with the
    same schedule and warm-up, gradient clipping, per-token mean loss, logging every
    --logging_steps. It has no mid-run checkpoints (resume is a Trainer-path feature); on GPUs
    --fsdp goes through the Trainer. Returns (result, full state dict on every rank, model)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if cfg.resume_from_checkpoint:
        raise ConfigError("--resume_from_checkpoint is not available with --fsdp on CPU (use DDP or DeepSpeed)")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:          # one FSDP unit per decoder layer, then the rest
        fully_shard(layer)
    fully_shard(model)

    sampler = DistributedSampler(examples, shuffle=True, seed=cfg.seed, drop_last=False)
    loader = DataLoader(examples, batch_size=cfg.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collator)
    gas = cfg.gradient_accumulation_steps
    per_epoch = max(1, len(loader) // gas)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * cfg.num_train_epochs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            weight_decay=cfg.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon)
    sched = get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total),
                          num_training_steps=total)
    history: list[dict] = []
    model.train()
    step, epoch, window = 0, 0, []
    bar = tqdm(total=total, disable=rank() != 0, desc="train (FSDP2, CPU)")
    while step < total:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        while step < total:
            micro = [b for _, b in zip(range(gas), batches)]
            if len(micro) < gas:
                break
            # per-token mean over the whole optimizer step on all ranks, as the Trainer computes it
            n_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro))
            dist.all_reduce(n_tokens)
            step_loss = torch.zeros(())
            for b in micro:
                if "logits_to_keep" in b:
                    labels = b.pop("labels")
                    loss = response_loss(model(**b), labels, n_tokens)
                else:
                    loss = model(**b, num_items_in_batch=n_tokens).loss
                (loss * dist.get_world_size()).backward()   # FSDP averages gradients over ranks
                step_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            dist.all_reduce(step_loss)
            window.append(step_loss.item())
            if step % cfg.logging_steps == 0 or step == total:
                history.append({"loss": sum(window) / len(window), "grad_norm": float(grad_norm.full_tensor()
                                if hasattr(grad_norm, "full_tensor") else grad_norm),
                                "learning_rate": sched.get_last_lr()[0], "epoch": epoch, "step": step})
                window = []
                log.info("step %d: %s", step, history[-1])
        epoch += 1
    bar.close()
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return TrainResult(Path(cfg.output), history, step, model=model), state_dict, model


def run_train(cfg: TrainConfig) -> int:
    """`toucan train`; Python callers can use `train(cfg)` to get the loss history back."""
    try:
        train(cfg)
    finally:
        shutdown_distributed()
    return 0
