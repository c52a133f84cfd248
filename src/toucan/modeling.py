"""Model and tokenizer directories: load, save (atomically, with a manifest), and build tiny
LLaMA models for tests, the demo and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelError
from .prompts import chat_template
from .tokenizer import finish_tokenizer_dir, sentencepiece_tokenizer

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """fp32 on CPU (bf16 matmul is ~50x slower on AVX2 CPUs), bf16 on GPUs that have it."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelError(f"{path}: not a directory")
    if not (p / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face model directory)")
    if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):  # a bare glob generator is always truthy
        raise ModelError(f"{path}: no weights (*.safetensors or pytorch_model*.bin)")
    return p


def is_quantized(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "quantization_config" in json.loads(cfg.read_text())


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer from a model/tokenizer directory or a SentencePiece .model file.

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
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load a tokenizer ({e})") from None
    else:
        raise ModelError(f"{path}: no such tokenizer directory or .model file")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ModelError(f"{path}: tokenizer has no BOS/EOS token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.chat_template = chat_template()  # toucan prompts with prompts.build_prompt, whatever the folder says
    return tok


def load_model(path: str | os.PathLike, device: str = "auto", dtype: str = "auto", **kwargs):
    """A causal LM in eval mode. 4-bit GPTQ directories load through transformers + GPTQModel."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    device = resolve_device(device)
    if is_quantized(p):
        from .quant import load_quantized  # GPTQModel is only needed for quantized models

        model = load_quantized(p, device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=resolve_dtype(dtype, device), **kwargs)
        model.to(device)
    model.eval()  # callers that run it wrap their work in torch.inference_mode (engine, ppl)
    return model


def save_model_dir(out_dir: str | os.PathLike, model=None, tokenizer=None, *, command: str,
                   config: Any = None, inputs: Iterable[str | os.PathLike] = (),
                   extra_files: dict[str, bytes] | None = None, manifest_extra: dict | None = None) -> Path:
    """Write model + tokenizer + toucan.json into out_dir atomically (temp dir, then rename)."""
    from .fsutil import atomic_dir
    from .manifest import write_manifest

    with atomic_dir(out_dir) as tmp:
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
