"""Chinese-LLaMA's vocabulary extension (`toucan tokenizer extend`, commands/tokenizer_extend.py),
and the SentencePiece-backed tokenizer toucan loads everywhere.

LLaMA's 32,000-piece SentencePiece model splits most Chinese characters into 3 byte pieces.
Chinese-LLaMA appended every piece of a Chinese SentencePiece model that LLaMA lacks, in that
model's order, with score 0, giving 49,953 pieces (scripts/merge_tokenizer/merge_tokenizers.py).
We do the same on sentencepiece's own ModelProto, then write a directory transformers loads:

  tokenizer.model        the merged SentencePiece model
  tokenizer_config.json  special tokens, the chat template, and the class AutoTokenizer builds
                         (transformers' SentencePieceBackend: SentencePiece itself)
  toucan.json            manifest (inputs' sha256, piece counts)

Segmentation is SentencePiece's, everywhere: in training, serving (toucan.modeling.load_tokenizer
returns `sentencepiece_tokenizer` for every directory or file with a tokenizer.model), in the
tokenizer files toucan writes (no tokenizer.json: AutoTokenizer builds SentencePieceBackend) and
in GGUF files (llama.cpp's "llama" tokenizer follows SentencePiece). Chinese-LLaMA was pre-trained
with SentencePiece, so a model fine-tuned by toucan sees its text cut up the same way.

Why not a tokenizer.json (the "fast" tokenizers library): the appended pieces all score 0
(Chinese-LLaMA's recipe). SentencePiece's BPE applies the highest-scoring merge and breaks ties
by position (leftmost first); tokenizers' BPE ranks every merge uniquely, and no fixed ranking can
reproduce a tie-break that depends on where in the text the pairs are. Measured on the 1,000
alpaca_zh_demo records (instruction + input + output) with the extended tokenizer: transformers'
own SentencePiece -> BPE conversion, loaded with AutoTokenizer, segments 685 of them differently
from SentencePiece (ordering the tied merges by merged-piece id, by reverse id or by left-piece id
instead: 651, 680, 702); SentencePieceBackend segments 0 differently, at 0.26 s vs 0.18 s for all
1,000 (tests/test_tokenizer.py, tests/test_gguf.py). transformers 5's fast `LlamaTokenizer` also
rebuilds a Metaspace pipeline on load that tokenizes a leading space unlike SentencePiece.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import sp_tokenizer
from .errors import DataError
from .fsutil import atomic_dir
from .manifest import write_manifest
from .prompts import chat_template

log = logging.getLogger(__name__)

# Written into tokenizer_config.json (AutoTokenizer then builds SentencePieceBackend). BOS is added
# by the class's "bos" special-tokens pattern; EOS is not (LLaMA's).
TOKENIZER_CONFIG = {
    "tokenizer_class": "SentencePieceBackend",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "add_bos_token": True, "add_eos_token": False,
    "legacy": True,  # SentencePiece's own whitespace handling (see the module docstring)
    "special_tokens_pattern": "bos",
    "clean_up_tokenization_spaces": False,
}


def read_model_proto(path: str | Path):
    """A SentencePiece ModelProto from a .model file (DataError naming the file if it is not one)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise DataError("no such SentencePiece model file", file=str(p))
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except DecodeError as e:
        raise DataError(f"not a SentencePiece model ({e})", file=str(p)) from None
    if not proto.pieces:
        raise DataError("not a SentencePiece model (no pieces)", file=str(p))
    return proto


def merge_models(base, add) -> int:
    """Append to `base` (in place) each piece of `add` that `base` lacks, in `add`'s order, with
    score 0 and type NORMAL, as Chinese-LLaMA did. Returns how many pieces were appended."""
    have = {p.piece for p in base.pieces}
    n = 0
    for p in add.pieces:
        if p.piece in have:
            continue
        new = type(p)()  # ModelProto.SentencePiece
        new.piece, new.score = p.piece, 0.0
        base.pieces.append(new)
        have.add(p.piece)
        n += 1
    return n


def sentencepiece_tokenizer(path: str | Path):
    """A transformers tokenizer that is SentencePiece: for a tokenizer.model file, or a directory
    holding one (its tokenizer_config.json's added tokens and pad token are kept). BOS/EOS/UNK are
    the model's own pieces; BOS is added, EOS is not; the chat template is toucan's."""
    p = Path(path)
    model = p if p.is_file() else p / "tokenizer.model"
    ts = read_model_proto(model).trainer_spec
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    kw = dict(bos_token=piece(ts.bos_id), eos_token=piece(ts.eos_id), unk_token=piece(ts.unk_id),
              add_bos_token=True, add_eos_token=False, legacy=True, special_tokens_pattern="bos",
              clean_up_tokenization_spaces=False)
    cls = sp_tokenizer.SentencePieceTokenizer  # transformers: imported only now (see sp_tokenizer)
    try:
        tok = cls(vocab_file=str(model), **kw) if p.is_file() else cls.from_pretrained(str(p), **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"cannot load as a SentencePiece tokenizer ({e})", file=str(model)) from None
    tok.chat_template = chat_template()
    return tok


def finish_tokenizer_dir(directory: str | Path) -> None:
    """After a tokenizer's save_pretrained: put toucan's chat template into tokenizer_config.json
    (transformers 5 writes it to chat_template.jinja only; servers and older tools read the config),
    and name transformers' SentencePieceBackend (not toucan's subclass) as the class to build."""
    f = Path(directory) / "tokenizer_config.json"
    cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    cfg["chat_template"] = chat_template()
    if cfg.get("tokenizer_class") == "SentencePieceTokenizer":
        cfg["tokenizer_class"] = "SentencePieceBackend"
    f.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_slow_tokenizer(directory: str | Path):
    """The SentencePiece-backed tokenizer of a directory (the same as toucan.modeling.load_tokenizer
    gives for any directory with a tokenizer.model)."""
    return sentencepiece_tokenizer(directory)


def extend(base: str | Path, add: str | Path, output: str | Path, overwrite: bool = False, *,
           command: str = "tokenizer extend", config: Any = None) -> dict:
    """Merge `add` into `base` and write the tokenizer directory `output` atomically (an existing
    one only with `overwrite`, and only one toucan wrote: fsutil.check_output). `command` and
    `config` are what its toucan.json records as having made it."""
    base_proto, add_proto = read_model_proto(base), read_model_proto(add)
    n_base = len(base_proto.pieces)
    n_added = merge_models(base_proto, add_proto)
    stats = {"base_pieces": n_base, "add_pieces": len(add_proto.pieces), "appended": n_added,
             "pieces": len(base_proto.pieces)}
    with atomic_dir(output, overwrite=overwrite, inputs=[base, add]) as tmp:
        (tmp / "tokenizer.model").write_bytes(base_proto.SerializeToString())
        (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        finish_tokenizer_dir(tmp)
        write_manifest(tmp, command, config, inputs=[base, add], extra={"tokenizer": stats})
    log.info("%s: %d pieces (%d from %s + %d appended from %s)", output, stats["pieces"], n_base,
             base, n_added, add)
    return stats

