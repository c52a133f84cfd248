"""`toucan tokenizer extend`: Chinese-LLaMA's vocabulary extension.

LLaMA's 32,000-piece SentencePiece model splits most Chinese characters into 3 byte pieces.
Chinese-LLaMA appended every piece of a Chinese SentencePiece model that LLaMA lacks, in that
model's order, with score 0, giving 49,953 pieces (scripts/merge_tokenizer/merge_tokenizers.py).
We do the same on sentencepiece's own ModelProto, then write a directory transformers loads:

  tokenizer.model        the merged SentencePiece model (the "slow" tokenizer reads it)
  tokenizer.json         the fast (tokenizers) equivalent
  tokenizer_config.json  special tokens, and which class AutoTokenizer should build
  toucan.json            manifest (inputs' sha256, piece counts)

Slow and fast must give the same ids. In transformers 5.24 `LlamaTokenizer` is the fast one and
rebuilds its pipeline from scratch on every load with a Metaspace pre-tokenizer that does not
prepend "▁" when a text already starts with a space, so " 你好" gets other ids than SentencePiece
gives (which always adds the dummy prefix). LLaMA and Chinese-LLaMA were trained with the
SentencePiece behaviour ("legacy"), so tokenizer.json carries the legacy pipeline that
transformers' own LlamaConverter emits for legacy=True (Prepend "▁", spaces -> "▁", no
pre-tokenizer) and tokenizer_config.json names the generic TokenizersBackend, which loads
tokenizer.json as written. (LlamaConverter itself cannot be used: its BPE branch calls
SentencePieceExtractor.extract with the wrong arguments in 5.24.) The SentencePiece-backed
("slow") tokenizer is `transformers.tokenization_utils_sentencepiece.SentencePieceBackend`;
`load_slow_tokenizer` builds it from the same directory; it equals SentencePiece exactly.

A limit no tokenizer.json can remove: the appended pieces all score 0 (Chinese-LLaMA's recipe).
SentencePiece's BPE applies the highest-scoring merge and breaks ties by position (leftmost
first); tokenizers' BPE ranks every merge uniquely. So where two appended pieces compete
("说是|指" vs "说|是指") the fast tokenizer can pick the other, equally valid split: both decode to
the same text, and the token counts differ by ~0.05% on alpaca_zh_demo, but 812 of its 2,139
texts get different ids (tests/test_tokenizer.py). Short texts, including the acceptance
sentence, agree. Train and serve with the same one (toucan.modeling.load_tokenizer, the fast one).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import DataError

log = logging.getLogger(__name__)

# Written into tokenizer_config.json; read by both the fast and the slow class. BOS is added by the
# fast post-processor and by the slow class's "bos" special-tokens pattern; EOS is not (LLaMA's).
TOKENIZER_CONFIG = {
    "tokenizer_class": "TokenizersBackend",
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


def sentencepiece_normalizer(spec):
    """A tokenizers normalizer doing what SentencePiece's NormalizerSpec does before BPE: the
    precompiled character map (empty for LLaMA: identity), extra-whitespace removal, the dummy "▁"
    prefix, spaces -> "▁". For LLaMA this is transformers' own legacy Llama normalizer."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    return normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])


def write_fast_tokenizer(directory: Path, proto) -> None:
    """Write tokenizer.json for the tokenizer.model in `directory`: transformers' own SentencePiece
    -> BPE conversion (vocab, score-ordered merges, byte fallback), with SentencePiece's own
    normalization (see the module docstring)."""
    from tokenizers import processors
    from transformers import LlamaTokenizer

    converted = LlamaTokenizer.from_pretrained(str(directory), legacy=True).backend_tokenizer
    converted.normalizer = sentencepiece_normalizer(proto.normalizer_spec)
    converted.pre_tokenizer = None
    bos = TOKENIZER_CONFIG["bos_token"]
    bos_id = converted.token_to_id(bos)
    assert bos_id is not None, f"{bos} missing from the merged vocabulary"
    converted.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    converted.save(str(directory / "tokenizer.json"))


def load_slow_tokenizer(directory: str | Path):
    """The SentencePiece-backed ("slow") tokenizer of a directory written by `extend`."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend.from_pretrained(str(directory))


def extend(base: str | Path, add: str | Path, output: str | Path, config=None) -> dict:
    """Merge `add` into `base` and write the tokenizer directory `output` atomically."""
    from .fsutil import atomic_dir
    from .manifest import write_manifest

    base_proto, add_proto = read_model_proto(base), read_model_proto(add)
    n_base = len(base_proto.pieces)
    n_added = merge_models(base_proto, add_proto)
    stats = {"base_pieces": n_base, "add_pieces": len(add_proto.pieces), "appended": n_added,
             "pieces": len(base_proto.pieces)}
    with atomic_dir(output) as tmp:
        (tmp / "tokenizer.model").write_bytes(base_proto.SerializeToString())
        (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
        write_fast_tokenizer(tmp, base_proto)
        write_manifest(tmp, "tokenizer extend", config, inputs=[base, add], extra={"tokenizer": stats})
    log.info("%s: %d pieces (%d from %s + %d appended from %s)", output, stats["pieces"], n_base,
             base, n_added, add)
    return stats


def run_extend(cfg) -> int:
    """`toucan tokenizer extend --base BASE.model --add ADD.model --output DIR`."""
    stats = extend(cfg.base, cfg.add, cfg.output, cfg)
    print(f"{cfg.output}: {stats['pieces']} pieces ({stats['base_pieces']} base + {stats['appended']} "
          f"appended of {stats['add_pieces']} in {Path(cfg.add).name})")
    return 0
