"""toucan's SentencePiece-backed transformers tokenizer (see toucan.tokenizer): a module of its own
so the class is importable by name (pickling, multiprocessing) while importing toucan.tokenizer
(and so toucan.modeling) stays free of transformers, ~0.5 s: the class is built on first access
of `sp_tokenizer.SentencePieceTokenizer` (a module __getattr__, PEP 562), since it subclasses a
transformers class."""

from __future__ import annotations

import functools


@functools.cache
def _build() -> type:
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SentencePieceTokenizer(SentencePieceBackend):
        """transformers' SentencePieceBackend (encoding = SentencePiece's own) with SentencePiece's own
        decoding: transformers 5.24's joins pieces as text, so byte pieces came out as "<0x0A>"."""

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            out, run = [], []
            for t in tokens:  # special tokens are not pieces SentencePiece would decode
                if t in self.all_special_tokens:
                    out.append(self.sp_model.decode_pieces(run) + t if run else t)
                    run = []
                else:
                    run.append(t)
            return "".join(out) + (self.sp_model.decode_pieces(run) if run else "")

    # pickle finds a class by module + qualified name: make both the attribute it is served as
    SentencePieceTokenizer.__module__ = __name__
    SentencePieceTokenizer.__qualname__ = "SentencePieceTokenizer"
    return SentencePieceTokenizer


def __getattr__(name: str):
    if name == "SentencePieceTokenizer":
        return _build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
