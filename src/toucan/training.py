"""Supervised fine-tuning (full or LoRA) with the Hugging Face Trainer: the library behind
`toucan train` (toucan.commands.train), bench/train.py and bench/quant.py.

One code path for a laptop CPU and a multi-GPU node: the same function (`fit`) runs alone, under
`torchrun --nproc_per_node=N` (DDP), with DeepSpeed ZeRO-2/3 (`--deepspeed zero3`, configs shipped
in toucan/configs), or sharded with FSDP (`--fsdp`).

    records (toucan.data) -> encode_record (prompt masked, response + EOS kept) -> [pack]
      -> SFTCollator (right-pad: input_ids with pad id, labels with -100) -> Trainer
      -> TrainResult.saveable -> save_model_dir (by the caller, rank 0)

Layout of an output: `--output OUT` is a standard Hugging Face model directory (safetensors,
tokenizer, config, toucan.json manifest), written atomically at the end. Trainer checkpoints go to
`OUT-checkpoints/` (a sibling, so the final atomic write of OUT never touches them and
`toucan verify OUT` sees only the model); `--resume-from-checkpoint auto` looks there.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from .collate import PackedCollator, SFTCollator, pack_examples, response_loss
from .data import IGNORE_INDEX, encode_records, load_dataset_spec, parse_spec
from .errors import ConfigError, DataError
from .fsutil import atomic_write_json
# resize_embeddings is also what LoRA adapters load with (modeling.load_adapter)
from .modeling import check_model_dir, check_remote_code, load_error, load_errors, resize_embeddings

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


def checkpoint_dir(output: str | os.PathLike) -> Path:
    """Where the Trainer's checkpoints of a run writing `output` go: a sibling, OUTPUT-checkpoints/."""
    return Path(str(output).rstrip("/") + "-checkpoints")


# ----------------------------------------------------------------------------------------------
# Data

def data_files(specs: Sequence[str]) -> list[str]:
    """The files behind data specs (`FILE`, `FILE:N`, `FILE:0.5`), for the manifest's hashes."""
    return [parse_spec(s)[0] for s in specs]


def load_examples(specs: Sequence[str], tokenizer, *, max_len: int, template: str, seed: int,
                  skip_bad: bool = False) -> list[dict]:
    """Records from every data spec (sampling, dedup, seeded shuffle: toucan.data), tokenized by
    toucan.data's rule (prompt masked, response + EOS kept)."""
    records, _ = load_dataset_spec(list(specs), seed=seed, skip_bad=skip_bad)
    _, encoded, rep = encode_records(tokenizer, records, max_len, template)
    if rep.truncated or rep.dropped_no_room or rep.dropped_short:
        log.info("%d example(s) truncated to %d tokens, %d dropped", rep.truncated, max_len,
                 rep.dropped_no_room + rep.dropped_short)
    if not encoded:
        raise DataError(f"no usable training examples (max length {max_len})", file=", ".join(specs))
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]


# ----------------------------------------------------------------------------------------------
# Trainer arguments

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


def _cpu_distributed(values: dict, extra: dict) -> None:
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
    if "accelerator_config" not in extra:
        values["accelerator_config"] = {"use_configured_state": True}


_UNSET = object()


def parse_trainer_flags(flags: Sequence[str]) -> dict[str, Any]:
    """{field: value} of HF TrainingArguments command-line flags (`--max_grad_norm 0.5 ...`), parsed
    by transformers' own HfArgumentParser so every Trainer flag works exactly as in the original
    scripts. Only the flags given are returned: every field starts as a marker that argparse leaves
    alone (it fills in defaults only for attributes the namespace lacks)."""
    from transformers import HfArgumentParser, TrainingArguments

    if not flags:
        return {}
    # exit_on_error=False: a bad value raises ArgumentError instead of exiting the process
    parser = HfArgumentParser(TrainingArguments, exit_on_error=False)
    names = [f.name for f in fields(TrainingArguments) if f.init]
    try:
        ns, unknown = parser.parse_known_args(list(flags), namespace=argparse.Namespace(**dict.fromkeys(names, _UNSET)))
    except argparse.ArgumentError as e:
        raise ConfigError(f"invalid Trainer flag: {e}") from None
    if unknown:
        raise ConfigError(f"invalid Trainer flag(s): {' '.join(unknown)} (not a TrainingArguments field)")
    return {k: v for k, v in vars(ns).items() if v is not _UNSET}


def training_arguments(output_dir: str | os.PathLike, *, deepspeed: str | None = None, fsdp: bool = False,
                       gradient_checkpointing: bool = False, extra_args: Sequence[str] = (), **trainer_args: Any):
    """TrainingArguments for `fit`: `trainer_args` are TrainingArguments fields (learning_rate,
    max_steps, ...); `extra_args` further Trainer flags as on a command line (parse_trainer_flags),
    which win. deepspeed: a JSON file or a shipped config's name; fsdp: shard (see fit)."""
    from transformers import TrainingArguments

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        save_strategy="steps",
        logging_strategy="steps",
        deepspeed=resolve_deepspeed(deepspeed),
        remove_unused_columns=False,         # our dataset is already exactly the model's inputs
        dataloader_num_workers=0,
        dataloader_pin_memory=_cuda_available(),
        disable_tqdm=rank() != 0,
        # transformers 5 renamed gradient_checkpointing; only pass it when asked (no warning otherwise)
        activation_checkpointing=True if gradient_checkpointing else None,
    )
    values.update(trainer_args)
    if fsdp and _cuda_available():
        # on GPUs the Trainer's own FSDP2 shards for real (on CPU see train_fsdp_cpu)
        values.update(fsdp="full_shard auto_wrap", fsdp_config={"version": 2, "state_dict_type": "FULL_STATE_DICT"})
    extra = parse_trainer_flags(extra_args)
    if world_size() > 1 and not _cuda_available():
        _cpu_distributed(values, extra)
    values.update(extra)
    try:
        return TrainingArguments(**{k: v for k, v in values.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid Trainer arguments: {e}") from None


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


def resolve_resume(r: str | None, output: str | os.PathLike) -> str | None:
    """The checkpoint to resume the run writing `output` from: `r` itself (checked complete), or
    for "auto" the latest complete one in checkpoint_dir(output), or None."""
    if not r:
        return None
    if r == "auto":
        found = latest_checkpoint(checkpoint_dir(output))
        log.info("resume: %s", found or f"no complete checkpoint in {checkpoint_dir(output)}, starting fresh")
        return str(found) if found else None
    if not checkpoint_complete(r):
        raise ConfigError(f"--resume_from_checkpoint {r}: not a complete checkpoint (no valid {CHECKPOINT_MARKER})")
    return r


# ----------------------------------------------------------------------------------------------
# Training

@dataclass
class TrainResult:
    log_history: list[dict] = field(default_factory=list)
    global_step: int = 0
    train_examples: int = 0
    train_rows: int = 0                                # rows trained on: examples, or packed rows
    model: Any = field(default=None, repr=False)     # the trained (possibly wrapped/sharded) model
    trainer: Any = field(default=None, repr=False)   # the HF Trainer (None on the FSDP-on-CPU path)
    saveable: Any = field(default=None, repr=False)  # what save_model_dir writes: full weights on every rank

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.log_history if "loss" in h]


def load_model(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model to fine-tune, in fp32. Load it after training_arguments: with ZeRO-3 the
    TrainingArguments make from_pretrained load it partitioned."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    check_remote_code(path, trust_remote_code)
    # fp32 master weights: mixed precision (--bf16/--fp16) is the Trainer's job, and fp32 is the
    # fast path on CPUs without AMX.
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except load_errors() as e:
        raise load_error(path, e) from None


def prepare_model(model, tokenizer) -> int:
    """Ready a loaded model for training on `tokenizer`: embeddings and head grown to its vocabulary
    (exact-mean rows), its pad id, no KV cache. Returns the embedding rows added."""
    model.config.use_cache = False
    added = resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return added


class _StateDictSaver:
    """Lets save_model_dir write a model whose full weights exist only as a gathered state dict
    (DeepSpeed ZeRO-3, FSDP): save_pretrained with that state dict instead of the empty shards."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kw):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kw)


def _trainer_saveable(trainer):
    """The trained model for save_model_dir. Under ZeRO-3/FSDP the full weights are gathered on
    every rank (a collective: every rank calls this)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled:
        return _StateDictSaver(model, trainer.accelerator.get_state_dict(trainer.deepspeed))
    if trainer.is_fsdp_enabled:
        return _StateDictSaver(model, trainer.accelerator.get_state_dict(trainer.model))
    return model


def fit(model, tokenizer, examples: list[dict], args, *, packing: bool = False, max_len: int | None = None,
        fsdp: bool = False, resume: str | None = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train `model` (prepare_model'd, possibly LoRA-wrapped) on tokenized `examples` with the
    TrainingArguments `args` (training_arguments). Every rank calls this under torchrun.

    packing: join examples into `max_len`-token rows (no cross-example attention, LM head only where
    a label follows). fsdp: shard with FSDP (pass the same to training_arguments); on CPU this runs
    train_fsdp_cpu, as the Trainer cannot. resume: a checkpoint (resolve_resume). callbacks: extra
    TrainerCallbacks, e.g. a benchmark's clock. The result's `saveable` holds the full weights."""
    from transformers import Trainer

    collator = SFTCollator(tokenizer.pad_token_id)
    n_examples = len(examples)
    if packing:
        examples = pack_examples(examples, max_len)
        collator = PackedCollator(tokenizer.pad_token_id, one_row=True)
        fill = sum(len(r["input_ids"]) for r in examples) / (len(examples) * max_len)
        log.info("packed %d examples into %d rows of %d tokens (%.1f%% full)", n_examples, len(examples),
                 max_len, 100 * fill)
    if fsdp and not _cuda_available():
        if resume:
            raise ConfigError("--resume_from_checkpoint is not available with --fsdp on CPU (use DDP or DeepSpeed)")
        result = train_fsdp_cpu(model, examples, collator, args, packed=packing)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                          processing_class=tokenizer, callbacks=[*callbacks, CheckpointMarker()],
                          compute_loss_func=response_loss if packing else None)
        trainer.train(resume_from_checkpoint=resume)
        result = TrainResult(list(trainer.state.log_history), trainer.state.global_step,
                             model=trainer.model_wrapped, trainer=trainer, saveable=_trainer_saveable(trainer))
    result.train_examples, result.train_rows = n_examples, len(examples)
    log.info("training done: %d steps, last loss %s", result.global_step, result.losses[-1:] or "n/a")
    return result


def barrier() -> None:
    """Wait for every rank (no-op when not distributed): rank 0 saves, the others wait for it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train_fsdp_cpu(model, examples: list[dict], collator, args, packed: bool = False) -> TrainResult:
    """FSDP on CPU: shard with torch FSDP2 `fully_shard` over gloo and run a plain loop.

    Hand-written because nothing maintained does this: the HF Trainer (through accelerate) enables
    FSDP only on GPU-like devices and silently runs DDP for --fsdp on CPU. It shares the Trainer
    path's collator, loss (the model's per-token mean, or response_loss for packed rows) and saving
    (TrainResult.saveable), and keeps the Trainer's semantics from the same TrainingArguments: a
    seeded shuffled sampler per epoch, gradient accumulation, AdamW with the same schedule and
    warm-up, gradient clipping, per-token mean loss over the whole optimizer step, logging every
    logging_steps. It has no mid-run checkpoints (resume is a Trainer-path feature); on GPUs --fsdp
    goes through the Trainer. tests/test_train_distributed.py checks its losses against one process."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:          # one FSDP unit per decoder layer, then the rest
        fully_shard(layer)
    fully_shard(model)

    sampler = DistributedSampler(examples, shuffle=True, seed=args.seed, drop_last=False)
    loader = DataLoader(examples, batch_size=args.per_device_train_batch_size, sampler=sampler,
                        collate_fn=collator)
    gas = args.gradient_accumulation_steps
    per_epoch = max(1, len(loader) // gas)
    total = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                            weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                            eps=args.adam_epsilon)
    sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(total),
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
                if packed:
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
            if step % args.logging_steps == 0 or step == total:
                history.append({"loss": sum(window) / len(window), "grad_norm": float(grad_norm.full_tensor()
                                if hasattr(grad_norm, "full_tensor") else grad_norm),
                                "learning_rate": sched.get_last_lr()[0], "epoch": epoch, "step": step})
                window = []
                log.info("step %d: %s", step, history[-1])
        epoch += 1
    bar.close()
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return TrainResult(history, step, model=model, saveable=_StateDictSaver(model, state_dict))
