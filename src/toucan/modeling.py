"""Model and tokenizer directories: load, save (atomically, with a manifest), and build tiny
LLaMA models for tests, the demo and benchmarks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, ModelError, QuantError
from .fsutil import atomic_dir, remove_stale_temps, temp_prefix
from .manifest import write_manifest
from .prompts import chat_template
from .tokenizer import finish_tokenizer_dir, sentencepiece_tokenizer

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():  # else torch's AssertionError, mid-load
        raise ConfigError(f"device {device!r}: torch {torch.__version__} sees no CUDA device here (use cpu or auto)")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """fp32 on CPU (bf16 matmul is ~50x slower on AVX2 CPUs), bf16 on GPUs that have it."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def read_json_file(path: str | os.PathLike) -> dict:
    """A JSON object file of a model directory (config.json, tokenizer_config.json), or a
    ModelError naming the file and line (a truncated download, a hand edit gone wrong)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{path}: not a directory")
    if not (p / "config.json").is_file():
        if is_adapter(p):  # reached only by commands that need a full model (train, make-delta, ...)
            raise ModelError(f"{path}: a LoRA adapter, not a full model; merge it into its base first: "
                             f"toucan merge-lora --model {path} --output DIR")
        raise ModelError(f"{path}: no config.json (not a Hugging Face model directory)")
    read_json_file(p / "config.json")
    if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):  # a bare glob generator is always truthy
        raise ModelError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    return p


def is_quantized(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "quantization_config" in read_json_file(cfg)


def _auto_map_files(auto_map) -> list[str]:
    """The Python files an auto_map entry names ("modeling_x.Cls" -> modeling_x.py; a
    "repo--module.Cls" reference is code from another repository)."""
    refs = []
    for v in (auto_map.values() if isinstance(auto_map, dict) else auto_map or []):
        refs += [r for r in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(r, str)]
    return sorted({r.rsplit(".", 1)[0] + ".py" if "--" not in r else r for r in refs})


def check_remote_code(path: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Refuse a model or tokenizer directory that asks to run its own Python code (`auto_map` in
    config.json or tokenizer_config.json) unless the user passed --trust-remote-code.

    Passing trust_remote_code=False to transformers is not enough: GPTQModel's loader imports
    auto_map modules whatever it is told (7.6, `prepare_remote_model_init_compat`), and
    transformers with trust_remote_code=None asks on stdin. So toucan checks before any loader
    sees the directory, and then also passes the user's choice explicitly to every loader."""
    p = Path(path)
    if trust_remote_code or not p.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        f = p / name
        if not f.is_file():
            continue
        auto_map = read_json_file(f).get("auto_map")
        if auto_map:
            files = ", ".join(_auto_map_files(auto_map)) or "auto_map"
            raise ModelError(f"{f}: auto_map asks to run Python code from the model folder ({files}); "
                             "toucan runs a model folder's code only with --trust-remote-code (read that code first)")


def load_error(path: str | os.PathLike, e: BaseException) -> ModelError:
    """A loader's exception for a broken or unsupported model directory, as one line."""
    import pickle

    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, pickle.UnpicklingError):
        return ModelError(f"{path}: refused to load pytorch_model*.bin: its pickle holds more than tensors "
                          "(torch.load weights_only=True). Convert it to safetensors from a copy you trust")
    if "does not recognize this architecture" in first or "model type" in first:
        model_type = read_json_file(Path(path) / "config.json").get("model_type") \
            if (Path(path) / "config.json").is_file() else None
        return ModelError(f"{path}/config.json: model_type {model_type!r} is not one this transformers "
                          f"supports (and toucan runs no code from the model folder without --trust-remote-code)")
    return ModelError(f"{path}: cannot load the model ({type(e).__name__}: {first})")


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions the loaders raise for a bad directory (truncated or corrupt files, unknown
    model types, refused pickles), as opposed to toucan's bugs."""
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, pickle.UnpicklingError, SafetensorError, EOFError)


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False, base: str | os.PathLike | None = None):
    """A tokenizer from a model/tokenizer directory or a SentencePiece .model file. A LoRA adapter
    directory without a tokenizer of its own uses its base model's (adapter_base, `base`).

    toucan adds BOS and EOS as ids itself (toucan.data), so the tokenizer's own add_bos setting
    does not matter. Padding never decides the loss (labels are padded with -100 explicitly), so
    pad = unk (or eos) is safe; we still set one because batching needs it.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_file() and p.suffix == ".model" or p.is_dir() and (p / "tokenizer.model").is_file():
        # SentencePiece's own segmentation in training and serving alike (see toucan.tokenizer); it
        # builds toucan's class, so no code from the folder runs whatever tokenizer_config.json says
        tok = sentencepiece_tokenizer(p)
    elif p.is_dir():
        if is_adapter(p) and not any((p / f).is_file() for f in TOKENIZER_FILES):
            return load_tokenizer(adapter_base(p, base), trust_remote_code)
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)})")
        check_remote_code(p, trust_remote_code)
        try:
            tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(f"{path}: cannot load a tokenizer ({first})") from None
    else:
        raise ModelError(f"{path}: no such tokenizer directory or .model file")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ModelError(f"{path}: tokenizer has no BOS/EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.chat_template = chat_template()  # toucan prompts with prompts.build_prompt, whatever the folder says
    return tok


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, base: str | os.PathLike | None = None,
               merge_adapter: bool = True, **kwargs):
    """A causal LM in eval mode. 4-bit GPTQ directories load through transformers + GPTQModel.
    Code in the model folder (auto_map) runs only with trust_remote_code (check_remote_code).
    A LoRA adapter directory loads on its base (load_adapter; `base` overrides the recorded one)."""
    from transformers import AutoModelForCausalLM

    if is_adapter(path):
        return load_adapter(path, base, device=device, dtype=dtype, merge=merge_adapter,
                            trust_remote_code=trust_remote_code, **kwargs)
    if base is not None:
        log.warning("%s is not a LoRA adapter directory: --base %s is not used", path, base)
    p = check_model_dir(path)
    check_remote_code(p, trust_remote_code)
    device = resolve_device(device)
    if is_quantized(p):
        model = load_quantized(p, device=device, trust_remote_code=trust_remote_code)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype, device),
                                                         trust_remote_code=trust_remote_code, **kwargs)
        except load_errors() as e:
            raise load_error(p, e) from None
        model.to(device)
    model.eval()  # callers that run it wrap their work in torch.inference_mode (engine, ppl)
    return model


# ----------------------------------------------------------------------------------------------
# LoRA adapters where a model is expected (chat, web, serve, eval generate, ppl, quantize, export)

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | os.PathLike) -> bool:
    """A peft adapter directory (what `toucan train --finetuning-type lora` writes)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """The full model directory an adapter loads on: `base` (--base), else the one recorded in its
    adapter_config.json (base_model_name_or_path). Never a Hub id: it must be a local directory."""
    recorded = read_json_file(Path(adapter) / ADAPTER_CONFIG).get("base_model_name_or_path")
    chosen = base if base is not None else recorded
    origin = "given by --base" if base is not None else f"recorded in its {ADAPTER_CONFIG}"
    if not chosen:
        raise ModelError(f"{adapter}: LoRA adapter records no base model; pass --base DIR (the model it was trained on)")
    b = Path(chosen)
    if not b.is_dir():
        raise ModelError(f"{adapter}: LoRA adapter's base model {chosen} ({origin}) is not a directory here; "
                         "pass --base DIR (the model it was trained on)")
    if is_adapter(b):
        raise ModelError(f"{adapter}: its base {chosen} ({origin}) is itself a LoRA adapter; pass --base DIR")
    try:
        check_model_dir(b)
    except ModelError as e:
        raise ModelError(f"{adapter}: LoRA adapter's base model ({origin}): {e}") from None
    if is_quantized(b):
        raise ModelError(f"{adapter}: its base {chosen} is quantized; load the adapter on the full-precision "
                         "base (quantize the adapter itself: `toucan quantize --model ADAPTER` merges it first)")
    return b


def resize_embeddings(model, vocab_size: int) -> int:
    """Grow embed_tokens and lm_head to `vocab_size` rows, new rows = the mean of the old rows.
    Returns how many rows were added. Works under DeepSpeed ZeRO-3, where parameters are
    partitioned and a naive `weight.shape[0]` reads 0 (the original Toucan's bug).

    Written here rather than using transformers' `mean_resizing=True`: that samples new rows from
    a Gaussian around the mean (random), whereas the exact mean is deterministic, so merge-lora,
    load_adapter and a frozen-embedding LoRA run rebuild bit-identical rows from the base alone."""
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


def load_adapter(adapter: str | os.PathLike, base: str | os.PathLike | None = None, device: str = "auto",
                 dtype: str = "auto", merge: bool = True, trust_remote_code: bool = False, tokenizer=None, **kwargs):
    """A LoRA adapter on its base (adapter_base), through peft, in eval mode.

    The base is loaded explicitly with load_model: peft's AutoPeftModelForCausalLM would try the
    Hub for a base it cannot find. Its embeddings are grown to the adapter's tokenizer the way
    training grew them (resize_embeddings), so an extended vocabulary lines up. merge=True (the
    default) folds the adapter into the weights in memory, giving the same weights `toucan
    merge-lora` writes and plain-model speed; merge=False returns the peft model."""
    b = adapter_base(adapter, base)
    tokenizer = tokenizer or load_tokenizer(adapter, trust_remote_code, base=b)
    model = load_model(b, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    resize_embeddings(model, len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    try:
        # peft imports GPTQModel when it is installed, whose banner goes to stdout: keep stdout for
        # answers (`chat --plain`), as load_quantized does.
        with contextlib.redirect_stdout(sys.stderr):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # e.g. shapes of another base's layers
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{adapter}: cannot load this LoRA adapter on base {b} ({type(e).__name__}: {first[:300]})") from None
    if merge:
        model = model.merge_and_unload()
        log.info("LoRA adapter %s on base %s: merged in memory", adapter, b)
    else:
        log.info("LoRA adapter %s on base %s (not merged)", adapter, b)
    model.eval()
    return model


@contextlib.contextmanager
def merged_model_dir(path: str | os.PathLike, base: str | os.PathLike | None = None,
                     near: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """A full model directory for loaders that only read directories (GPTQModel, GGUF writers):
    `path` itself, or for a LoRA adapter, the adapter merged into its base (in memory, fp32) and
    saved to a temporary directory beside `near` (the command's output: same disk), deleted after."""
    if not is_adapter(path):
        yield Path(path)
        return
    b = adapter_base(path, base)
    tokenizer = load_tokenizer(path, trust_remote_code, base=b)
    model = load_adapter(path, b, device="cpu", dtype="float32", trust_remote_code=trust_remote_code,
                         tokenizer=tokenizer)
    parent = Path(near).absolute().parent if near is not None else None
    prefix = ".toucan-merged-"
    if parent is not None and parent.is_dir():
        # named after the output, so a killed run's full-size copy is removed by the next run
        remove_stale_temps(near)
        prefix = temp_prefix(near) + "merged-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent if parent and parent.is_dir() else None) as d:
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        del model
        log.info("merged LoRA adapter %s into its base %s (in memory; a temporary copy in %s for the loader)",
                 path, b, d)
        yield Path(d)


def save_model_dir(out_dir: str | os.PathLike, model=None, tokenizer=None, *, command: str,
                   config: Any = None, inputs: Iterable[str | os.PathLike] = (),
                   extra_files: dict[str, bytes] | None = None, manifest_extra: dict | None = None,
                   overwrite: bool = False, guard_inputs: Iterable[str | os.PathLike] | None = None) -> Path:
    """Write model + tokenizer + toucan.json into out_dir atomically (temp dir, then rename).
    An existing out_dir is replaced only with `overwrite`, and only a toucan output that is not, and
    does not contain, one of `guard_inputs` (default: `inputs`, which the manifest hashes)."""
    inputs = list(inputs)
    guard = inputs if guard_inputs is None else list(guard_inputs)
    with atomic_dir(out_dir, overwrite=overwrite, inputs=guard) as tmp:
        if model is not None:
            model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
            finish_tokenizer_dir(tmp)  # the chat template into tokenizer_config.json
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_manifest(tmp, command, config, inputs, extra=manifest_extra)
    return Path(out_dir)


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_hidden_layers: int = 2,
                      num_attention_heads: int = 4, intermediate_size: int = 172,
                      max_position_embeddings: int = 512, **kw):
    """A LLaMA config small enough for CPU tests. intermediate_size=172 on purpose: real models have
    widths that are not multiples of quantization group sizes, and tests should meet one."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                       num_attention_heads=num_attention_heads, num_key_value_heads=num_attention_heads,
                       intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, **kw)


def tiny_llama(vocab_size: int, seed: int = 0, tokenizer=None, **kw):
    """A randomly initialised tiny LlamaForCausalLM (fp32), special ids taken from `tokenizer`."""
    import torch
    from transformers import LlamaForCausalLM

    if tokenizer is not None:
        kw.setdefault("bos_token_id", tokenizer.bos_token_id)
        kw.setdefault("eos_token_id", tokenizer.eos_token_id)
        kw.setdefault("pad_token_id", tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size, **kw))


def save_tiny_llama(out_dir: str | os.PathLike, tokenizer, *, command: str, seed: int = 0, **kw) -> Path:
    """A random tiny LLaMA sized to `tokenizer` (tiny_llama; `kw` as tiny_llama_config takes them)
    saved with it as a model directory: the tests' and the benches' model, built one way."""
    save_model_dir(out_dir, tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer, **kw), tokenizer,
                   command=command)
    return Path(out_dir)


# Quantized loading lives here, with the other loaders, so that both load_model and the quantizer
# (quant/gptq.py) reach it without an import cycle; GPTQModel itself is imported by transformers
# only when a quantized directory is loaded.
def gptqmodel_env() -> None:
    """GPTQModel sizes a CPU worker pool and fails on 2 cores unless told ("Virtual pool
    'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"): set it from the core count."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))


def load_quantized(path: str | Path, device: str = "cpu", trust_remote_code: bool = False):
    """A GPTQ directory through plain transformers (+ optimum + GPTQModel kernels), in eval mode.

    Kernels: on CPU GPTQModel picks TorchAtenLinear (torch's int4 CPU matmul) for 4-bit groups of
    16..128, else its dequantizing TorchLinear; on CUDA, Marlin/ExLlama/Triton as available."""
    import torch
    from transformers import AutoModelForCausalLM

    check_remote_code(path, trust_remote_code)
    gptqmodel_env()
    # CPU: keep the unquantized parts (embeddings, norms, lm_head) in fp32; GPU kernels want fp16.
    dtype = torch.float32 if device == "cpu" else torch.float16
    # GPTQModel logs (banner, kernel notes) go to stdout; keep stdout for answers (`chat --plain`).
    with contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), device_map=device, dtype=dtype,
                                                         trust_remote_code=trust_remote_code)
        except ImportError as e:
            raise QuantError(f"{path}: loading a GPTQ model needs gptqmodel and optimum installed ({e})") from None
        except load_errors() as e:
            raise load_error(path, e) from None
        model.eval()
        # The CPU kernel repacks its weights on the first forward: do it here, not in the first reply.
        model(torch.tensor([[model.config.bos_token_id or 0]], device=model.device))
    return model
