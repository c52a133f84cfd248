"""toucan's SentencePiece-backed transformers tokenizer (see toucan.tokenizer): a module of its own
so the class is importable by name (pickling, multiprocessing) while `import toucan.tokenizer`
stays free of transformers."""

from __future__ import annotations

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
