"""`toucan export gguf`: a LLaMA model directory (full precision, or toucan's GPTQ output) as one
GGUF file for llama.cpp, plus `check_gguf`, the validation every .gguf reader in toucan calls first.

The file format and the Python quantizers (BF16, Q8_0, Q4_0) are llama.cpp's own `gguf` package;
Q4_K_M comes from llama.cpp's quantizer (`llama_cpp.llama_model_quantize`) run on an F16 file we
write first. What is hand-written here, and why:
- the HF -> GGUF tensor-name table and the q/k row permutation (below, explicit, gpt-fast style):
  llama.cpp's converter is a 10k-line script that is not on PyPI (only in llama-cpp-python's
  sdist) and loads whole models; we need a tensor-at-a-time stream and GPTQ input;
- GPTQ -> Q4_0 without a second rounding (`gptq_q4_0_blocks`): no library does it. A symmetric
  4-bit GPTQ layer whose groups cover whole 32-input blocks (group size 32, 64, 128, ... without
  act-order) has Q4_0's layout exactly: value = scale * (q - 8), one fp16 scale per 32 inputs. So
  the block bytes are built from qweight/scales directly and keep GPTQ's error compensation;
- the tokenizer metadata from SentencePiece's own ModelProto (scores, piece types, byte pieces).

Memory: tensors are read one at a time (`delta_io.Weights`), converted, written and dropped; the
header is written first from shapes alone, so peak RSS is about one tensor in fp32 and its output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import fsutil
from .defaults import GGUF_TYPES
from .delta_io import Weights
from .errors import ConfigError, GgufError, ModelError, OutputError
from .fsutil import atomic_write_json, sha256_file
from .modeling import check_model_dir, is_adapter, merged_model_dir
from .prompts import chat_template
from .tokenizer import read_model_proto, sentencepiece_tokenizer

log = logging.getLogger(__name__)

TYPES = GGUF_TYPES
LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
QK = 32  # block length of Q4_0 / Q8_0 (ggml's QK4_0 = QK8_0 = 32)
ROWS_PER_CHUNK = 4096  # rows quantized at a time: bounds the fp32 temporaries of gguf.quants

# ----------------------------------------------------------------------------------------------
# The tensor map. HF LLaMA name -> GGUF name; "q"/"k" marks the rows to permute (see qk_rows).
# Tensors not named here make the export fail (an architecture we do not know how to map).
TOP_LEVEL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
PER_BLOCK = {  # model.layers.{i}.<key> -> blk.{i}.<value>
    "input_layernorm": ("attn_norm", None),
    "self_attn.q_proj": ("attn_q", "q"),
    "self_attn.k_proj": ("attn_k", "k"),
    "self_attn.v_proj": ("attn_v", None),
    "self_attn.o_proj": ("attn_output", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "mlp.gate_proj": ("ffn_gate", None),
    "mlp.up_proj": ("ffn_up", None),
    "mlp.down_proj": ("ffn_down", None),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp from rope.freq_base
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def qk_rows(n_head: int, head_dim: int):
    """Row order turning HF's q/k projection into llama.cpp's: HF applies RoPE to (x[j], x[j+d/2])
    pairs of each head (rotate_half), ggml to neighbours (x[2j], x[2j+1]). GGUF row h*d + 2j + s is
    HF row h*d + s*d/2 + j. (The same permutation as llama.cpp's convert_hf_to_gguf.permute.)"""
    import torch

    half = head_dim // 2
    return torch.tensor([h * head_dim + s * half + j
                         for h in range(n_head) for j in range(half) for s in (0, 1)], dtype=torch.long)


def gguf_name(hf_base: str) -> tuple[str, str | None] | None:
    """(GGUF base name, permute kind) for an HF module path, e.g. 'model.layers.3.self_attn.q_proj'."""
    if hf_base in TOP_LEVEL:
        return TOP_LEVEL[hf_base], None
    parts = hf_base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in PER_BLOCK:
        name, perm = PER_BLOCK[parts[3]]
        return f"blk.{parts[2]}.{name}", perm
    return None


# ----------------------------------------------------------------------------------------------
# Source model

@dataclass
class Source:
    dir: Path
    config: dict
    weights: object                     # delta_io.Weights
    gptq: dict | None                   # quantization_config of a GPTQ directory
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int                        # embedding rows
    # GGUF base name -> (HF base name, "weight"/"gptq", has_bias, permute kind)
    modules: dict = field(default_factory=dict)


def read_source(model_dir: str | os.PathLike) -> Source:
    d = check_model_dir(model_dir)
    cfg_path = d / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: not readable JSON ({e})") from None
    archs = config.get("architectures") or []
    # architectures may be missing (a bare LlamaConfig.save_pretrained); model_type must be llama
    if config.get("model_type") != "llama" or (archs and not any(a in LLAMA_ARCHITECTURES for a in archs)):
        what = f"'architectures' is {archs}" if archs else f"'model_type' is {config.get('model_type')!r}"
        raise ModelError(f"{cfg_path}: field {what}: GGUF export supports LLaMA models "
                         f"({', '.join(LLAMA_ARCHITECTURES)}) only")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "linear"):
        raise ModelError(f"{cfg_path}: field 'rope_parameters': rope_type {rope.get('rope_type')!r} is not "
                         "supported by toucan's GGUF export (default or linear)")
    weights = Weights(d)
    gptq = config.get("quantization_config")
    if gptq is not None and gptq.get("quant_method") != "gptq":
        raise ModelError(f"{cfg_path}: field 'quantization_config': quant_method "
                         f"{gptq.get('quant_method')!r} cannot be exported (full precision or GPTQ only)")
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
    if "model.embed_tokens.weight" not in weights.meta:
        raise ModelError(f"{d}: no model.embed_tokens.weight tensor (not a LlamaForCausalLM checkpoint)")
    src = Source(d, config, weights, gptq, n_head, n_head_kv, head_dim,
                 n_vocab=int(weights.meta["model.embed_tokens.weight"][1][0]))
    for name in weights.names:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        base, _, part = name.rpartition(".")
        mapped = gguf_name(base)
        if mapped is None or part not in ("weight", "bias", *GPTQ_PARTS):
            raise ModelError(f"{d}: tensor {name} has no GGUF name in toucan's LLaMA map "
                             "(not a plain LLaMA checkpoint)")
        gname, perm = mapped
        kind, has_bias, _ = src.modules.get(gname, (base, "weight", False, perm))[1:]
        if part in GPTQ_PARTS:
            kind = "gptq"
        src.modules[gname] = (base, kind, has_bias or part == "bias", perm)
    if gptq is not None and int(gptq.get("bits", 4)) not in (2, 4, 8):
        raise ModelError(f"{cfg_path}: {gptq.get('bits')}-bit GPTQ cannot be exported (2, 4 or 8 bits)")
    return src


def module_shape(src: Source, gname: str) -> list[int]:
    """[out_features, in_features] (or [n] for norms) of a module's weight."""
    base, kind, _, _ = src.modules[gname]
    if kind == "gptq":
        (_, (packed_in, out)) = src.weights.meta[f"{base}.qweight"]
        return [int(out), int(packed_in) * (32 // int(src.gptq["bits"]))]
    return [int(x) for x in src.weights.meta[f"{base}.weight"][1]]


# ----------------------------------------------------------------------------------------------
# GPTQ tensors (standard layout: qweight int32 [in/pack, out] packed along the input, qzeros
# int32 [groups, out/pack] packed along the output, scales [groups, out], g_idx [in]).

def _unpack(packed, bits: int, dim: int):
    """int32 words -> unsigned `bits`-bit values; value k of a word sits at bits*k (GPTQ's order)."""
    import torch

    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:   # [n/pack, m] -> [n, m]
        v = (packed.unsqueeze(1) >> shifts.view(1, pack, 1)) & ((1 << bits) - 1)
        return v.reshape(packed.shape[0] * pack, packed.shape[1])
    v = (packed.unsqueeze(2) >> shifts.view(1, 1, pack)) & ((1 << bits) - 1)  # [n, m/pack] -> [n, m]
    return v.reshape(packed.shape[0], packed.shape[1] * pack)


def gptq_codes(src: Source, base: str):
    """(q [in, out], zeros [groups, out], scales fp32 [groups, out], g_idx [in]) of one GPTQ layer,
    with the zero points as the dequantization uses them."""
    import torch

    bits = int(src.gptq["bits"])
    qweight = src.weights.get(f"{base}.qweight").to(torch.int32)
    q = _unpack(qweight, bits, 0)
    scales = src.weights.get(f"{base}.scales")
    zeros = _unpack(src.weights.get(f"{base}.qzeros").to(torch.int32), bits, 1)[:, :scales.shape[1]]
    # The "gptq" (v1) checkpoint format stores zero - 1 (a historical off-by-one that every loader
    # undoes); "gptq_v2" stores the zero itself.
    if src.gptq.get("checkpoint_format", "gptq") != "gptq_v2":
        zeros = zeros + 1
    if f"{base}.g_idx" in src.weights.meta:
        g_idx = src.weights.get(f"{base}.g_idx").to(torch.long)
    else:
        gs = int(src.gptq.get("group_size", -1))
        g_idx = torch.arange(q.shape[0]) // (gs if gs > 0 else q.shape[0])
    return q, zeros, scales, g_idx


def gptq_dequantize(src: Source, base: str):
    """The layer's weight [out, in] in fp32: scale * (q - zero), exactly as GPTQ defines it."""
    import torch

    q, zeros, scales, g_idx = gptq_codes(src, base)
    w = scales.to(torch.float32)[g_idx] * (q - zeros[g_idx]).to(torch.float32)
    return w.t().contiguous()


def gptq_q4_0_blocks(src: Source, base: str, perm=None):
    """Q4_0 bytes [out, in/32*18] built from the GPTQ codes themselves, or (None, reason) when the
    layer's layout does not map exactly (then the caller dequantizes and re-quantizes)."""
    import numpy as np
    import torch

    if int(src.gptq["bits"]) != 4:
        return None, f"{src.gptq['bits']}-bit"
    q, zeros, scales, g_idx = gptq_codes(src, base)
    n_in, n_out = q.shape
    if n_in % QK:
        return None, f"in_features {n_in} is not a multiple of {QK}"
    blocks = g_idx.view(-1, QK)
    if not bool((blocks == blocks[:, :1]).all()):
        return None, "groups do not cover whole 32-input blocks (act-order or group size < 32)"
    groups = blocks[:, 0]                                      # group of each 32-input block
    if not bool((zeros[groups] == 8).all()):
        return None, "asymmetric (a zero point other than 8)"
    d = scales[groups]                                         # [blocks, out]
    d16 = d.to(torch.float16)
    if not torch.equal(d16.to(d.dtype), d):
        return None, "a scale is not exactly representable in fp16"
    codes = q.t().reshape(n_out, n_in // QK, QK).to(torch.uint8)  # [out, blocks, 32]
    d16 = d16.t().contiguous()                                 # [out, blocks]
    if perm is not None:
        codes, d16 = codes[perm], d16[perm]
    # ggml's block_q4_0: fp16 d, then byte j = code[j] | code[j + 16] << 4.
    qs = (codes[..., :QK // 2] | (codes[..., QK // 2:] << 4)).numpy()
    dq = d16.numpy().view(np.uint8).reshape(n_out, n_in // QK, 2)
    return np.concatenate([dq, qs], axis=-1).reshape(n_out, -1), None


# ----------------------------------------------------------------------------------------------
# Tokenizer metadata (SentencePiece's ModelProto is the reference: Chinese-LLaMA was trained with
# it and llama.cpp's "llama" tokenizer follows it)

# SentencePiece's piece types (ModelProto.SentencePiece.Type) have gguf.TokenType's numbers:
# NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6, so they are copied as they are.
USER_DEFINED = 4
SP_MODEL_KEY = "toucan.tokenizer.sentencepiece_model"  # the tokenizer.model bytes (uint8 array)


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int
    n_pieces: int
    add_space_prefix: bool
    remove_extra_whitespaces: bool
    byte_fallback: bool
    model_bytes: bytes
    user_defined: int


def read_vocab(src: Source) -> Vocab:
    import gguf


    path = src.dir / "tokenizer.model"
    if not path.is_file():
        raise ModelError(f"{src.dir}: no tokenizer.model (the SentencePiece model GGUF export writes into "
                         "the file); copy the base model's tokenizer.model there")
    proto = read_model_proto(path)
    n = len(proto.pieces)
    if n > src.n_vocab:
        raise ModelError(f"{path}: {n} pieces but model.embed_tokens.weight has only {src.n_vocab} rows "
                         "(vocabulary larger than the embedding: wrong tokenizer for this model?)")
    # User-defined pieces are matched in the raw text by llama.cpp (before spaces become "▁"), so
    # they are written with spaces, as llama.cpp's converter writes user-defined tokens.
    tokens = [p.piece.replace("\u2581", " ") if p.type == USER_DEFINED else p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    # Rows beyond the pieces (Chinese-LLaMA: 49,953 pieces, 49,954 rows) get placeholder tokens no
    # text can produce, as llama.cpp's converter writes them: llama.cpp needs one token per row.
    for i in range(n, src.n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    ts = proto.trainer_spec
    pad = src.config.get("pad_token_id")
    if not isinstance(pad, int) or not 0 <= pad < src.n_vocab:
        pad = ts.pad_id if ts.pad_id >= 0 else ts.unk_id  # toucan pads with unk (modeling.load_tokenizer)
    if any(p.type == USER_DEFINED for p in proto.pieces) and proto.normalizer_spec.add_dummy_prefix:
        log.warning("%s: user-defined pieces with a dummy prefix: llama.cpp's own tokenizer puts a space "
                    "after each of them, SentencePiece does not; toucan's llama.cpp backend tokenizes with "
                    "the SentencePiece model stored in the GGUF instead", path)
    if proto.normalizer_spec.precompiled_charsmap:
        log.warning("%s: the SentencePiece model normalizes text (a precompiled charsmap); llama.cpp's "
                    "tokenizer does not, so non-normalized input may tokenize differently", path)
    return Vocab(tokens, scores, types, bos=ts.bos_id, eos=ts.eos_id, unk=ts.unk_id, pad=pad, n_pieces=n,
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
                 remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
                 byte_fallback=bool(ts.byte_fallback), model_bytes=path.read_bytes(),
                 user_defined=sum(p.type == USER_DEFINED for p in proto.pieces))


# ----------------------------------------------------------------------------------------------
# Export

def _ggml_type(gtype: str, gname: str, shape: list[int], tied: bool):
    """The GGML type of one tensor for a --type (llama.cpp's own choices where Python can make them)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32  # norms: llama.cpp computes them in F32
    if gtype in ("f16", "q4_k_m"):  # q4_k_m: F16 first, then llama.cpp's quantizer
        return T.F16
    if gtype == "bf16":
        return T.BF16
    if shape[-1] % QK:
        return T.F16  # rows that are not whole blocks stay F16, as llama.cpp's quantizer leaves them
    if gtype == "q8_0":
        return T.Q8_0
    # q4_0: the output projection is the most sensitive tensor; llama.cpp keeps it at 6 bits (Q6_K),
    # which Python cannot write, so it is Q8_0 here (also when tied to the embedding).
    if gname == "output" or (gname == "token_embd" and tied):
        return T.Q8_0
    return T.Q4_0


def _metadata(w, src: Source, vocab: Vocab, gtype: str, template: str, name: str) -> None:
    import gguf

    c = src.config
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "q4_k_m": gguf.LlamaFileType.MOSTLY_F16}[gtype])
    if gtype in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(src.n_vocab)
    w.add_context_length(int(c.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(src.n_head)
    w.add_head_count_kv(src.n_head_kv)
    w.add_rope_dimension_count(src.head_dim)
    if src.head_dim * src.n_head != int(c["hidden_size"]):
        w.add_key_length(src.head_dim)
        w.add_value_length(src.head_dim)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_tokenizer_model("llama")  # SentencePiece BPE with byte fallback ("SPM" in llama.cpp)
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_unk_token_id(vocab.unk)
    w.add_pad_token_id(vocab.pad)
    w.add_add_bos_token(True)   # toucan adds BOS, never EOS, to a prompt (toucan.data, engine)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(vocab.add_space_prefix)
    w.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    w.add_chat_template(chat_template(template))
    # The SentencePiece model itself, so toucan's llama.cpp backend tokenizes exactly as training did
    # (gguf_tokenizer) where llama.cpp's tokenizer cannot: SentencePiece matches user-defined pieces
    # after normalization and adds no "▁" after them, llama.cpp prefixes a space after every
    # user-defined token; and it keeps spaces that remove_extra_whitespaces strips.
    w.add_key_value(SP_MODEL_KEY, vocab.model_bytes, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)


@contextlib.contextmanager
def _temp_beside(path: Path):
    """A temporary file beside `path` (same disk, so the rename is atomic), removed unless the caller
    renamed it. Named like fsutil's temporaries (writer pid + host), so the next run removes one a
    killed run left (fsutil.remove_stale_temps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{fsutil._owner()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    fsutil._publish_mode(tmp, is_dir=False)  # mkstemp makes 0600: give the result a plain file's mode
    os.replace(tmp, path)


def manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".toucan.json")


def check_output_path(output: str | os.PathLike, overwrite: bool, model: str | os.PathLike) -> Path:
    """The output file, after fsutil's output guard (an existing file only with --overwrite, never an
    input or a directory) and one more rule: an existing .gguf is replaced only if toucan export
    wrote it (its manifest is beside it)."""
    out = Path(output)
    if out.suffix != ".gguf":
        raise ConfigError(f"--output {output}: the file name must end in .gguf")
    fsutil.check_output(out, overwrite=overwrite, inputs=[model], is_dir=False)
    if out.exists() and not manifest_path(out).is_file():
        raise OutputError(f"output {output} was not written by toucan export (no {manifest_path(out).name} "
                          "beside it): refusing to replace it, even with --overwrite")
    return out


def _tensor_plan(src: Source, gtype: str) -> list[tuple[str, str, object, list[int]]]:
    """[(GGUF tensor name, HF base, GGML type, GGUF shape [rows, cols])] in file order."""
    tied = "output" not in src.modules
    plan = []
    for gname, (base, kind, has_bias, _) in src.modules.items():
        shape = module_shape(src, gname)
        plan.append((f"{gname}.weight", base, _ggml_type(gtype, gname, shape, tied), shape))
        if has_bias:
            plan.append((f"{gname}.bias", base, _ggml_type(gtype, gname, [shape[0]], tied), [shape[0]]))
    return plan


def _convert(src: Source, gname: str, base: str, part: str, qtype, gtype: str):
    """(bytes or array for GGUFWriter, path description) for one tensor."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    module = gname.rsplit(".", 1)[0]
    _, kind, _, perm_kind = src.modules[module]
    perm = None
    if perm_kind is not None:
        n = src.n_head if perm_kind == "q" else src.n_head_kv
        perm = qk_rows(n, src.head_dim)
    if part == "weight" and kind == "gptq":
        if qtype == T.Q4_0:
            blocks, why = gptq_q4_0_blocks(src, base, perm)
            if blocks is not None:
                return blocks, "gptq-exact (Q4_0 blocks from the GPTQ codes, no second rounding)"
            log.warning("%s: GPTQ layout does not map to Q4_0 exactly (%s): dequantized and re-quantized",
                        base, why)
            path = f"gptq-requantized ({why})"
        elif qtype in (T.F16, T.BF16, T.F32) and gtype != "q4_k_m":
            path = "gptq-dequantized"
        else:
            log.warning("%s: GPTQ weights dequantized and re-quantized to %s", base,
                        "Q4_K_M" if gtype == "q4_k_m" else qtype.name)
            path = "gptq-requantized"
        t = gptq_dequantize(src, base)
    else:
        t = src.weights.get(f"{base}.{part}")
        path = "converted" if qtype in (T.F32, T.F16, T.BF16) else "quantized"
    if perm is not None:
        t = t[perm]
    t = t.to(torch.float32) if t.dtype != torch.float32 else t
    if qtype == T.F32:
        return t.numpy().copy(), path
    if qtype == T.F16:
        return t.to(torch.float16).numpy(), path
    arr = t.numpy()
    out = [quants.quantize(arr[i:i + ROWS_PER_CHUNK], qtype) for i in range(0, arr.shape[0], ROWS_PER_CHUNK)]
    return (out[0] if len(out) == 1 else np.concatenate(out)), path


def export_gguf(model: str | os.PathLike, output: str | os.PathLike, gtype: str = "f16", *,
                base: str | os.PathLike | None = None, template: str = "alpaca", overwrite: bool = False,
                threads: int = 0, trust_remote_code: bool = False, config=None) -> dict:
    """Write `model` as a GGUF file `output` atomically, with `output`.toucan.json beside it.
    A LoRA adapter directory is merged into its base first (`base`, or the one it records).
    Returns the manifest."""
    if gtype not in TYPES:
        raise ConfigError(f"--type {gtype!r}: choose one of {', '.join(TYPES)}")
    out = check_output_path(output, overwrite, model)
    with merged_model_dir(model, base, near=out, trust_remote_code=trust_remote_code) as full:
        return _export(Path(full), out, gtype, template, threads, config, source=Path(model),
                       adapter=is_adapter(model))


def _export(model: Path, out: Path, gtype: str, template: str, threads: int, config, source: Path,
            adapter: bool) -> dict:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T

    t0 = time.time()
    src = read_source(model)
    vocab = read_vocab(src)
    plan = _tensor_plan(src, gtype)
    tensors = []
    with _temp_beside(out) as tmp:
        w = gguf.GGUFWriter(None, "llama")
        _metadata(w, src, vocab, gtype, template, name=source.name)
        for tname, _, qtype, shape in plan:
            # Shapes alone give every tensor's size, so the header goes out before any data is read.
            raw = {T.F32: np.float32, T.F16: np.float16}.get(qtype)
            if raw is not None:
                w.add_tensor_info(tname, shape, np.dtype(raw), int(np.prod(shape)) * np.dtype(raw).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, base, qtype, shape in plan:
            module, part = tname.rsplit(".", 1)
            data, path = _convert(src, tname, base, part, qtype, gtype)
            w.write_tensor_data(data)
            tensors.append({"name": tname, "source": f"{base}.{part}" if src.modules[module][1] != "gptq"
                            or part == "bias" else f"{base}.{{{','.join(GPTQ_PARTS)}}}",
                            "type": qtype.name, "shape": shape, "path": path})
            del data
        w.close()
        if gtype == "q4_k_m":
            tensors = _llama_quantize(tmp, out, tensors, threads)
        check_gguf(tmp)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        _publish(tmp, out)
    manifest = {
        "command": "export gguf", "source": str(source), "type": gtype, "file": out.name,
        "source_sha256": _source_hashes(source),
        "merged_lora_adapter": adapter,
        "sha256": digest, "size": size, "seconds": round(time.time() - t0, 2),
        "source_format": "gptq" if src.gptq else "full-precision",
        "gptq": src.gptq and {k: src.gptq.get(k) for k in ("bits", "group_size", "sym", "desc_act",
                                                          "checkpoint_format")},
        "tokenizer": {"pieces": vocab.n_pieces, "rows": src.n_vocab, "padding_rows": src.n_vocab - vocab.n_pieces,
                      "user_defined": vocab.user_defined, "remove_extra_whitespaces": vocab.remove_extra_whitespaces,
                      "bos": vocab.bos, "eos": vocab.eos, "unk": vocab.unk, "pad": vocab.pad,
                      "byte_fallback": vocab.byte_fallback, "add_space_prefix": vocab.add_space_prefix},
        "chat_template": template,
        "tensors": tensors,
    }
    if config is not None:
        import dataclasses

        manifest["config"] = dataclasses.asdict(config)
    atomic_write_json(manifest_path(out), manifest)
    log.info("%s: %s, %d tensors, %.1f MB in %.1f s", out, gtype, len(tensors), size / 1e6, time.time() - t0)
    return manifest


def _source_hashes(source: Path) -> dict:
    """sha256 of the source's small files (config, tokenizer, adapter config); the weights' own
    hashes are in the source's toucan.json when toucan wrote it (not re-read here: GBs)."""
    names = ("config.json", "tokenizer.model", "tokenizer_config.json", "adapter_config.json", "toucan.json")
    return {n: sha256_file(source / n) for n in names if (source / n).is_file()}


def _llama_quantize(f16_path: Path, out: Path, tensors: list[dict], threads: int) -> list[dict]:
    """Q4_K_M through llama.cpp's own quantizer (k-quants cannot be written from Python); the F16
    file at `f16_path` is replaced by the quantized one."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--type q4_k_m needs llama-cpp-python (pip install 'toucan[llama-cpp]')") from None
    import gguf

    with _temp_beside(out) as q:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = threads or (os.cpu_count() or 1)
        # llama.cpp logs a line per tensor through llama-cpp-python's logger (NOTSET: all of it):
        # only errors, unless toucan runs with -vv
        qlog = logging.getLogger("llama-cpp-python")
        saved = qlog.level
        qlog.setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
        try:
            rc = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(q).encode(), params)
        finally:
            qlog.setLevel(saved)
        if rc != 0:
            raise ModelError(f"{out}: llama.cpp's quantizer failed (code {rc})")
        os.replace(q, f16_path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(f16_path).tensors}
    for t in tensors:
        t["type"] = types[t["name"]]
        if t["path"] not in ("converted",) or t["type"] not in ("F32", "F16"):
            t["path"] = (t["path"] + "; " if t["path"] != "converted" else "") + "llama.cpp quantizer"
    return tensors


# ----------------------------------------------------------------------------------------------
# Validation of .gguf inputs (chat/serve/eval call this before handing a file to llama.cpp, whose
# own errors are a C-level abort or a bare "failed to load model")

REQUIRED_KEYS = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.tokens")


def check_gguf(path: str | os.PathLike) -> dict:
    """Check that `path` is a complete GGUF file of a LLaMA model llama.cpp can load; returns a few
    facts about it ({architecture, n_vocab, n_tensors, file_type, chat_template}). Raises GgufError
    (a ModelError) naming the file and what is wrong: not a file, not GGUF, truncated, corrupted
    header, missing tokenizer, another architecture, tensor data outside the file."""
    import numpy as np


    p = Path(path)
    if not p.is_file():
        raise GgufError(f"{path}: no such .gguf file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GgufError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    import gguf

    try:
        r = gguf.GGUFReader(p)
    except Exception as e:  # truncated or corrupted header: numpy/struct/value errors of every kind
        raise GgufError(f"{path}: corrupted or truncated GGUF header ({type(e).__name__}: {e})") from None
    fields = r.fields
    for k in REQUIRED_KEYS:
        if k not in fields:
            raise GgufError(f"{path}: GGUF metadata lacks {k}")
    arch = str(fields["general.architecture"].contents())
    if arch != "llama":
        raise GgufError(f"{path}: architecture {arch!r}; toucan runs LLaMA GGUF files only")
    n_vocab = len(fields["tokenizer.ggml.tokens"].data)
    end = 0
    for t in r.tensors:
        end = max(end, int(t.data_offset) + int(t.n_bytes))
        if t.name == "token_embd.weight" and int(t.shape[-1]) != n_vocab:
            raise GgufError(f"{path}: token_embd.weight has {int(t.shape[-1])} rows but the vocabulary "
                            f"{n_vocab} tokens")
    if not r.tensors or "token_embd.weight" not in {t.name for t in r.tensors}:
        raise GgufError(f"{path}: no token_embd.weight tensor")
    if end > size:
        raise GgufError(f"{path}: truncated: tensor data ends at byte {end} but the file has {size}")
    tmpl = fields.get("tokenizer.chat_template")
    ft = fields.get("general.file_type")
    del np
    return {"architecture": arch, "n_vocab": n_vocab, "n_tensors": len(r.tensors),
            "file_type": int(ft.contents()) if ft is not None else None,
            "chat_template": str(tmpl.contents()) if tmpl is not None else None}


def gguf_tokenizer(path: str | os.PathLike):
    """The SentencePiece tokenizer stored in a GGUF toucan exported (toucan.tokenizer's
    SentencePiece-backed transformers tokenizer), or None for a GGUF from elsewhere."""
    import gguf


    field = gguf.GGUFReader(path).fields.get(SP_MODEL_KEY)
    if field is None:
        return None
    import numpy as np

    data = np.concatenate([field.parts[i] for i in field.data]).astype(np.uint8).tobytes()
    with tempfile.TemporaryDirectory(prefix="toucan-gguf-tok-") as d:
        model = Path(d) / "tokenizer.model"
        model.write_bytes(data)
        return sentencepiece_tokenizer(model)  # the model is read into memory: the file may go
