"""GPTQ or RTN weight quantization through GPTQModel (`quantize_model`; the `toucan quantize`
command is toucan/commands/quantize.py), written in the standard GPTQ checkpoint layout (qweight /
qzeros / scales / g_idx in safetensors, quantization_config in config.json) that transformers +
optimum + GPTQModel load, plus tokenizer and toucan.json.

GPTQModel does the quantizing (GPTQConfig) and has RTN in the same format (RTNConfig), so nothing
here re-implements either. What we add: calibration from toucan's chat format, a per-layer plan
that keeps layers no kernel can run in full precision (see `layer_problem`), and the manifest.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuantError
from ..fsutil import atomic_dir, atomic_write_json, check_output, remove_stale_temps, temp_prefix
from ..manifest import write_manifest
from ..tokenizer import finish_tokenizer_dir
from ..modeling import (adapter_base, check_model_dir, check_remote_code, gptqmodel_env, is_adapter, is_quantized,
                        load_error, load_errors, load_tokenizer, merged_model_dir, resolve_device, resolve_dtype)
from .calib import calibration_samples, check_calibration
from .sparse import keep_zeros, pruning_record

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what GPTQModel's kernels accept
BLOCK_RE = re.compile(r"(^|\.)layers\.\d+\.")          # decoder blocks: what GPTQModel quantizes
# model types whose MLP is gate_proj/up_proj/down_proj with config.intermediate_size (mlp_padding)
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")


@dataclass(frozen=True)
class GptqSettings:
    """How `quantize_model` quantizes. No defaults here: toucan.config.QuantizeConfig's (the flags')
    are the ones.

    method: "gptq" or "rtn"; bits, group_size (-1 = per output channel); sym: a symmetric grid
    (False: a zero point per group); desc_act, gptaq: GPTQ's act-order and GPTAQ, None = on except
    for a pruned model; keep_sparsity: keep every zero weight zero, None = for a pruned model;
    damp_percent, mse: GPTQ's Hessian dampening and scale search; calib_samples, max_len,
    template, seed: the calibration sequences (GPTQ); device: cpu, cuda, cuda:N or auto."""

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool | None
    damp_percent: float
    mse: float
    gptaq: bool | None
    keep_sparsity: bool | None
    calib_samples: int
    max_len: int
    template: str
    seed: int
    device: str


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize_model` made: the layers quantized and those kept in full precision (name:
    why), the MLP padding ((width, padded width) or None), the weights' size and the seconds the
    quantizing itself took."""

    output: str | os.PathLike
    method: str
    bits: int
    group_size: int
    quantized: list[str]
    skipped: dict[str, str]
    padding: tuple[int, int] | None
    size_mib: float
    seconds: float


@contextlib.contextmanager
def _gptqmodel_logs_elsewhere():
    """GPTQModel 7.6 writes a per-layer log file into ./logs of whatever directory the user runs
    from (a hard-coded relative path): point it at a temporary directory instead."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # another GPTQModel layout: leave it be
        yield
        return
    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    with tempfile.TemporaryDirectory(prefix="toucan-gptq-logs-") as d:
        loop_processor._PROJECT_LOG_DIR = Path(d)
        try:
            yield
        finally:
            if saved is not None:
                loop_processor._PROJECT_LOG_DIR = saved


def layer_problem(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """Why a Linear of this shape cannot be stored/run as a GPTQ layer, or None if it can.

    GPTQModel tries to pad such layers, but then crashes while packing (3-bit zeros need N % 32)
    or the saved checkpoint crashes at load / first forward on CPU (torch's int4 kernel needs
    K % group == 0 and N % 16 == 0), so we keep them in full precision instead and say so.
    Real LLaMA widths (4096, 11008, ...) pass.
    """
    if group_size > 0 and in_features % group_size:
        return f"in_features {in_features} is not a multiple of group size {group_size}"
    pack = 32 // math.gcd(32, bits)  # values of `bits` bits that fill whole int32 words
    if in_features % pack:
        return f"in_features {in_features} is not a multiple of {pack} ({bits}-bit int32 packing)"
    if out_features % pack:  # qzeros are packed along the output dim the same way
        return f"out_features {out_features} is not a multiple of {pack} ({bits}-bit int32 packing of zeros)"
    if bits == 4 and out_features % 16:
        return f"out_features {out_features} is not a multiple of 16 (torch's CPU int4 kernel)"
    return None


def mlp_multiple(bits: int, group_size: int) -> int:
    """The MLP width must be a multiple of this for gate/up/down_proj to pass `layer_problem`:
    down_proj's in_features (group size, int32 packing) and gate/up's out_features (packing of
    the zeros; 16 for torch's CPU int4 kernel at 4 bits)."""
    pack = 32 // math.gcd(32, bits)
    return math.lcm(pack, group_size if group_size > 0 else 1, 16 if bits == 4 else 1)


def mlp_padding(model_dir: str | Path, bits: int, group_size: int) -> tuple[int, int] | None:
    """(intermediate_size, padded width) when the MLP width needs padding for this grid, else None.

    Padding the MLP's inner dimension with zeros is exact for a gated MLP: a zero row of up_proj
    makes that channel act(gate) * 0 = 0 whatever act is, and the zero column of down_proj reads
    it, so the padded model computes the same function; GPTQ sees a zero Hessian column there
    (a dead input, whose weights it sets to 0) and RTN rounds zero weights to exactly 0 (0 is on
    both grids). The result is an ordinary checkpoint with a larger intermediate_size that every
    GPTQ loader (transformers + optimum + GPTQModel kernels, `toucan export gguf`) reads as is.
    The hidden size cannot be padded this way (RMSNorm averages over it), so a layer whose input
    is the hidden state still goes to `layer_problem`."""
    c = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    width = c.get("intermediate_size")
    if c.get("model_type") not in GATED_MLP or not isinstance(width, int) or width <= 0:
        return None  # other MLPs: their odd-width layers stay in full precision (layer_problem)
    m = mlp_multiple(bits, group_size)
    return None if width % m == 0 else (width, -(-width // m) * m)


def _pad_mlp(model, width: int) -> int:
    """Zero-pad every gated MLP (gate_proj/up_proj/down_proj Linears) of `model` to `width`
    inner channels, in place. Returns how many MLPs were padded."""
    import torch

    def grown(lin, out_f, in_f):
        new = torch.nn.Linear(in_f, out_f, bias=lin.bias is not None, dtype=lin.weight.dtype,
                              device=lin.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:lin.out_features, :lin.in_features] = lin.weight
            if lin.bias is not None:
                new.bias.zero_()
                new.bias[:lin.out_features] = lin.bias
        return new

    n = 0
    for mod in model.modules():
        gate, up, down = (getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj"))
        if not all(isinstance(x, torch.nn.Linear) for x in (gate, up, down)):
            continue
        mod.gate_proj = grown(gate, width, gate.in_features)
        mod.up_proj = grown(up, width, up.in_features)
        mod.down_proj = grown(down, down.out_features, width)
        if hasattr(mod, "intermediate_size"):
            mod.intermediate_size = width
        n += 1
    return n


@contextlib.contextmanager
def padded_model_dir(src: Path, width: int, near: str | Path, trust_remote_code: bool = False):
    """A temporary copy of the model at `src` with its MLP zero-padded to `width` (see
    `mlp_padding`), beside `near` (the output: same disk, and named after it so that a killed run's
    copy is removed by the next one). GPTQModel loads only from a directory, hence the copy."""
    import torch
    from transformers import AutoModelForCausalLM


    try:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", device_map="cpu",
                                                     trust_remote_code=trust_remote_code)
    except load_errors() as e:
        raise load_error(src, e) from None
    before = model.config.intermediate_size
    if not _pad_mlp(model, width):
        raise QuantError(f"{src}: intermediate_size {before} needs padding to {width}, but the model has no "
                         f"gate_proj/up_proj/down_proj MLP to pad")
    model.config.intermediate_size = width
    parent = Path(os.path.abspath(near)).parent
    remove_stale_temps(near)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(near) + "padded-",
                                     dir=parent if parent.is_dir() else None) as d:
        with torch.no_grad():
            model.save_pretrained(d, safe_serialization=True)
        del model
        load_tokenizer(src, trust_remote_code=trust_remote_code).save_pretrained(d)
        log.info("MLP width %d fits no GPTQ layout: quantizing a copy zero-padded to %d (exact; in %s)",
                 before, width, d)
        yield Path(d)


def plan_layers(model_dir: str | Path, bits: int, group_size: int,
                trust_remote_code: bool = False) -> tuple[list[str], dict[str, str]]:
    """(names of decoder Linear layers to quantize, {name: reason} for those kept in full precision),
    from a weightless (meta-device) copy of the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_remote_code(model_dir, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except load_errors() as e:
        raise load_error(model_dir, e) from None
    todo, skipped = [], {}
    for name, mod in shell.named_modules():
        if isinstance(mod, torch.nn.Linear) and BLOCK_RE.search(name):
            why = layer_problem(mod.in_features, mod.out_features, bits, group_size)
            if why:
                skipped[name] = why
            else:
                todo.append(name)
    return todo, skipped


def block_modules(quantized: list[str], skipped: list[str]) -> list[list[str]]:
    """optimum's `modules_in_block_to_quantize` (it keeps a layer when its name ends with an entry):
    the short per-block names when every block quantizes the same set, else full names."""
    per_block: dict[str, set[str]] = {}
    for name in list(quantized) + list(skipped):
        m = BLOCK_RE.search(name)
        per_block.setdefault(name[:m.end()], set())
    for name in quantized:
        m = BLOCK_RE.search(name)
        per_block[name[:m.end()]].add(name[m.end():])
    sets = list(per_block.values())
    if all(s == sets[0] for s in sets):
        return [sorted(sets[0])]
    return [sorted(quantized)]


def checkpoint_dir(output: str | Path) -> Path:
    """Where an interrupted GPTQ run keeps its finished layers: a sibling of the output (as
    train's OUT-checkpoints/), so the atomic write of OUT never touches it. Removed on success."""
    out = Path(os.path.abspath(output))  # abspath: "." or "dir/.." have no name to extend
    return out.with_name(out.name + "-quant-checkpoint")


def resume_blocker(src: Path, skipped: dict[str, str]) -> str | None:
    """Why a GPTQ run of this model cannot checkpoint its layers, or None when it can.
    These are GPTQModel 7.6's limits for `CheckpointConfig`, checked here so that a run which
    cannot resume says so up front instead of failing inside GPTQModel."""
    import threading

    if skipped:
        return "some layers stay in full precision, and GPTQModel's checkpoints do not support its per-layer exclusions"
    model_type = json.loads((src / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "llama":
        return f"model_type {model_type!r}: GPTQModel checkpoints support llama"
    if threading.current_thread() is not threading.main_thread():
        return "not on the main thread (GPTQModel's checkpoints take over SIGINT/SIGTERM)"
    return None


@contextlib.contextmanager
def _checkpoint_errors(ckpt: Path):
    """GPTQModel's checkpoint errors as toucan's: a stop on request (Ctrl-C, SIGTERM; GPTQModel
    commits the current layer first) and a checkpoint left by a run with other settings or inputs."""
    try:
        yield
    except Exception as e:
        from gptqmodel.looper.checkpoint import CheckpointStopped
        from gptqmodel.looper.checkpoint_store import CheckpointError

        if not isinstance(e, CheckpointError):
            raise
        sys.stderr.write("\n")  # GPTQModel's progress bar leaves the line open
        if isinstance(e, CheckpointStopped):
            raise QuantError(f"stopped ({e}); run the same command again to resume from {ckpt}") from None
        raise QuantError(f"{ckpt}: {e}. It was made by a run with other settings or inputs: rerun with "
                         f"those, or delete it to start over") from None


def validate(settings: GptqSettings, data: str | os.PathLike | None) -> None:
    s = settings
    if s.method not in ("gptq", "rtn"):
        raise QuantError(f"method {s.method!r}: use gptq or rtn")
    if s.bits not in BITS:
        raise QuantError(f"bits={s.bits} is not supported: use one of {', '.join(map(str, BITS))}")
    if s.group_size not in GROUP_SIZES:
        raise QuantError(f"group_size={s.group_size}: use -1 (per channel) or one of "
                         f"{', '.join(map(str, GROUP_SIZES[1:]))}")
    if s.method == "gptq":
        check_calibration("gptq", data, s.calib_samples, s.damp_percent)
    elif not 0 < s.damp_percent < 1:
        raise QuantError(f"--damp-percent {s.damp_percent}: must be between 0 and 1")
    if s.mse < 0:
        raise QuantError(f"mse={s.mse}: use 0 (no scale search) or a norm exponent > 0, e.g. 2.4")


def _plan(model, output, settings: GptqSettings, *, data, overwrite: bool, trust_remote_code: bool):
    """(source dir, tokenizer, layers to quantize, {layer: why kept in full precision}), or a QuantError."""
    s = settings
    src = check_model_dir(model)
    # Before anything is loaded: GPTQModel's loader imports a folder's auto_map modules even when
    # told trust_remote_code=False, and minutes of quantizing must not end in a refused output.
    check_remote_code(src, trust_remote_code)
    check_output(output, overwrite=overwrite, inputs=_inputs(model, output, s.method, data))
    if is_quantized(src):
        raise QuantError(f"{model} is already quantized (config.json has quantization_config)")
    if s.desc_act and s.method == "rtn":
        log.warning("--desc-act only applies to gptq; ignored for rtn")
    todo, skipped = plan_layers(src, s.bits, s.group_size, trust_remote_code)
    if not todo:
        raise QuantError(f"{model}: no layer can be quantized with bits={s.bits}, "
                         f"group_size={s.group_size}: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if skipped:
        log.warning("keeping %d layer(s) in full precision (odd widths): %s", len(skipped),
                    ", ".join(f"{k} ({v})" for k, v in skipped.items()))
    return src, load_tokenizer(src, trust_remote_code=trust_remote_code), todo, skipped


def _inputs(model, output, method: str, data) -> list:
    """What the output must never replace or contain: the model, the calibration data and the
    resumable checkpoint of this output (fsutil.check_output)."""
    return [model, data if method == "gptq" else None, checkpoint_dir(output)]


def _calibration(tokenizer, settings: GptqSettings, data) -> list[dict] | None:
    if settings.method != "gptq":
        return None
    seqs = calibration_samples(tokenizer, data, settings.calib_samples, settings.max_len, settings.template,
                               settings.seed)
    log.info("calibration: %d sequences, %d tokens from %s", len(seqs), sum(map(len, seqs)), data)
    return [{"input_ids": s, "attention_mask": [1] * len(s)} for s in seqs]


def _checkpointing(ckpt: Path) -> dict:
    """model.quantize's `checkpoint` argument; says whether this run starts or resumes."""
    from gptqmodel.looper.checkpoint_store import CheckpointConfig

    if (ckpt / "CURRENT").is_file():
        log.info("resuming from the layers finished before, in %s", ckpt)
    else:
        log.info("finished layers are kept in %s: if this run stops, the same command resumes", ckpt)
    return {"checkpoint": CheckpointConfig(path=str(ckpt))}


def _sparsity_plan(model, src: Path, keep_sparsity: bool | None, desc_act: bool) -> tuple[bool, dict | None]:
    """(quantize mask-aware?, the source's `toucan prune` record). keep_sparsity None: on for a
    model whose toucan.json says `toucan prune` made it."""
    pruning = pruning_record(src)
    sparse = bool(pruning) if keep_sparsity is None else bool(keep_sparsity)
    if sparse and desc_act:
        raise QuantError(f"{model} is pruned{'' if pruning else ' (--keep-sparsity)'}: --desc-act reorders "
                         f"columns and cannot keep its zeros; drop --desc-act (or pass --no-keep-sparsity)")
    if sparse:
        log.info("keeping the zeros of %s (%s): mask-aware GPTQ in natural column order", model,
                 f"{pruning['method']} {pruning['pattern'] or pruning['sparsity']}" if pruning else "--keep-sparsity")
    return sparse, pruning


def quantize_model(model: str | os.PathLike, output: str | os.PathLike, settings: GptqSettings, *,
                   data: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                   overwrite: bool = False, trust_remote_code: bool = False, command: str = "quantize",
                   config=None) -> QuantizeResult:
    """Quantize `model` into `output` (atomically; `data`: the calibration file, GPTQ only). The
    manifest names `command` and records `config` (the options the caller ran with). Raises
    QuantError/ModelError. A LoRA adapter as `model` is merged into its base first (`base`, else
    the one its adapter_config.json records; in memory) and that is quantized."""
    validate(settings, data)  # once, before any model is read or merged
    if not is_adapter(model):
        return _quantize(model, output, settings, data=data, overwrite=overwrite,
                         trust_remote_code=trust_remote_code, command=command, config=config)
    base = adapter_base(model, base)
    check_output(output, overwrite=overwrite,  # before the merge
                 inputs=_inputs(model, output, settings.method, data) + [base])
    log.info("%s is a LoRA adapter: merging it into its base %s (in memory) before quantizing", model, base)
    # GPTQModel loads only from a directory, so the merged model is handed to it as a temporary one.
    with merged_model_dir(model, base, near=output, trust_remote_code=trust_remote_code) as merged:
        return _quantize(str(merged), output, settings, data=data, overwrite=overwrite,
                         trust_remote_code=trust_remote_code, command=command, config=config,
                         sources=[model, str(base)])


def _quantize(model, output, settings: GptqSettings, *, data, overwrite: bool, trust_remote_code: bool,
              command: str, config, sources=None) -> QuantizeResult:
    """quantize_model on a full model directory. sources: the input models the manifest names
    (the user's adapter and its base, not the temporary merged directory).
    An MLP width that fits no GPTQ layout is zero-padded first (`mlp_padding`), in a temporary copy."""
    src = check_model_dir(model)
    check_remote_code(src, trust_remote_code)
    pad = mlp_padding(src, settings.bits, settings.group_size)
    job = dict(data=data, overwrite=overwrite, trust_remote_code=trust_remote_code, command=command, config=config)
    if pad is None or is_quantized(src):  # (a quantized input is refused by _plan)
        return _quantize_dir(model, output, settings, sources=sources, **job)
    check_output(output, overwrite=overwrite, inputs=_inputs(model, output, settings.method, data))  # before the copy
    with padded_model_dir(src, pad[1], near=output, trust_remote_code=trust_remote_code) as padded:
        return _quantize_dir(str(padded), output, settings, sources=sources or [src], origin=src, padding=pad,
                             **job)


def _quantize_dir(model, output, settings: GptqSettings, *, data, overwrite: bool, trust_remote_code: bool,
                  command: str, config, sources=None, origin=None, padding=None) -> QuantizeResult:
    """_quantize on the directory GPTQModel loads. origin: the user's model when `model` is a
    padded copy of it (its toucan.json says whether it was pruned); padding: (width, padded width)."""
    s = settings
    src, tokenizer, todo, skipped = _plan(model, output, s, data=data, overwrite=overwrite,
                                          trust_remote_code=trust_remote_code)
    # desc_act None (the default): act-order, except for a pruned model, whose zeros need natural order
    sparse, pruning = _sparsity_plan(model, origin or src, s.keep_sparsity, bool(s.desc_act) and s.method == "gptq")
    desc_act = s.method == "gptq" and (s.desc_act if s.desc_act is not None else not sparse)
    # GPTAQ: the mask-aware quantizer (quant/sparse.py) did not keep the zeros (tests/test_prune.py)
    if sparse and s.gptaq and s.method == "gptq":
        raise QuantError(f"{model} is pruned: --gptaq cannot keep its zeros; drop --gptaq "
                         f"(or pass --no-keep-sparsity)")
    gptaq = s.method == "gptq" and (s.gptaq if s.gptaq is not None else not sparse)
    # GPTQ (minutes to hours on a big model) commits each finished decoder layer, so a rerun of
    # the same command after a crash, kill or Ctrl-C resumes at the next layer. RTN needs no
    # calibration pass and takes seconds: it just runs again.
    ckpt = checkpoint_dir(output)
    blocker = resume_blocker(src, skipped) if s.method == "gptq" else None
    if gptaq and not blocker:
        blocker = "GPTQModel's checkpoints do not support GPTAQ"
    resumable = s.method == "gptq" and blocker is None
    if blocker:
        log.info("this run cannot resume after an interruption: %s", blocker)
    calib = _calibration(tokenizer, s, data)

    # GPTQModel logs its progress tables on stdout: send them to stderr with the other logs.
    with contextlib.redirect_stdout(sys.stderr):
        gptqmodel_env()
        from gptqmodel import BACKEND, GPTQModel  # ~10 s import with a banner: only when quantizing
        from gptqmodel.quantization.config import GPTQConfig, RTNConfig

        device = resolve_device(s.device)
        # "-:" marks a layer GPTQModel must leave alone; exact ^name$ patterns are its fast path.
        dynamic = {f"-:^{re.escape(name)}$": {} for name in skipped} or None
        # offload_to_disk: GPTQModel's checkpoints require it (the finished layers live on disk)
        common = dict(bits=s.bits, group_size=s.group_size, sym=s.sym, desc_act=desc_act, dynamic=dynamic,
                      offload_to_disk=resumable)
        if s.method == "gptq":
            # A pruned model is quantized in natural column order (see quant/sparse.py).
            order = {"act_group_aware": False} if sparse else {}
            # act-order with static groups: groups are fixed in natural column order before the
            # reordering, so g_idx stays i // group_size and the fast (non-reordering) kernels run it
            extra = dict(static_groups=desc_act, mse=s.mse)
            if gptaq:
                from gptqmodel.quantization.config import GPTAQConfig

                extra["gptaq"] = GPTAQConfig(device=device)
            qcfg = GPTQConfig(damp_percent=s.damp_percent, **common, **order, **extra)
        else:
            qcfg = RTNConfig(**common)
        # fp32 on CPU: quantization statistics and the layers kept in full precision stay exact
        # (GPTQModel's default there is bf16, which is also ~50x slower on AVX2 CPUs).
        try:
            qmodel = GPTQModel.load(str(src), qcfg, device=device, dtype=resolve_dtype("auto", device),
                                    trust_remote_code=trust_remote_code)
        except load_errors() as e:
            raise load_error(src, e) from None
        resume = _checkpointing(ckpt) if resumable else {}
        t0 = time.perf_counter()
        with _gptqmodel_logs_elsewhere(), _checkpoint_errors(ckpt), \
                (keep_zeros() if sparse else contextlib.nullcontext({})) as forced:
            qmodel.quantize(calib, backend=BACKEND.TORCH if device == "cpu" else BACKEND.AUTO, **resume)
        seconds = time.perf_counter() - t0
        log.info("%s %d-bit g%d quantized %d layers in %.1f s", s.method, s.bits, s.group_size,
                 len(todo), seconds)

        with atomic_dir(output, overwrite=overwrite, inputs=_inputs(model, output, s.method, data)) as tmp:
            # GPTQModel's save prints the folder listing and both config files, always (writer.py
            # debug_saved_config): shown only with -v, i.e. when setup_logging left its logger on
            quiet = logging.getLogger("logbar").disabled
            with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
                qmodel.save(str(tmp))
            # optimum (the transformers loader) ignores GPTQModel's `dynamic`; it keeps layers by
            # `modules_in_block_to_quantize`, so record the plan in both vocabularies.
            cj = json.loads((tmp / "config.json").read_text())
            cj["quantization_config"]["modules_in_block_to_quantize"] = block_modules(todo, list(skipped))
            atomic_write_json(tmp / "config.json", cj)
            tokenizer.save_pretrained(str(tmp))  # toucan's tokenizer (pad token set), not a re-guessed one
            finish_tokenizer_dir(tmp)  # toucan's chat template into tokenizer_config.json
            inputs = (sources or [src]) + ([data] if calib else [])
            write_manifest(tmp, command, config, inputs, extra={"quantization": {
                "method": s.method, "bits": s.bits, "group_size": s.group_size, "sym": s.sym,
                "desc_act": desc_act, "act_group_aware": bool(getattr(qcfg, "act_group_aware", False)),
                "static_groups": bool(getattr(qcfg, "static_groups", False)),
                "damp_percent": s.damp_percent if s.method == "gptq" else None,
                "mse": s.mse if s.method == "gptq" else None, "gptaq": gptaq,
                "quantized_layers": todo, "full_precision_layers": skipped,
                "calibration": None if calib is None else {"file": str(data), "samples": len(calib),
                                                           "tokens": sum(len(c["input_ids"]) for c in calib)},
                "mlp_padding": None if padding is None else {
                    "intermediate_size": padding[0], "padded_to": padding[1],
                    "why": f"{padding[0]} is not a multiple of {mlp_multiple(s.bits, s.group_size)} "
                           f"(group size, int32 packing, CPU int4 kernel); zero rows/columns are exact"},
                "seconds": round(seconds, 2), "keep_sparsity": sparse,
                "zeros_forced": sum(forced.values()) if sparse else None,
            }, **({"pruning": pruning} if pruning else {})})
    shutil.rmtree(ckpt, ignore_errors=True)  # the output is complete: nothing left to resume
    size = sum(f.stat().st_size for f in Path(output).iterdir() if f.suffix == ".safetensors")
    return QuantizeResult(output=output, method=s.method, bits=s.bits, group_size=s.group_size, quantized=todo,
                          skipped=skipped, padding=padding, size_mib=size / 2**20, seconds=seconds)
