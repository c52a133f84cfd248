"""Offline "reference judge": character-level ROUGE-L F1 between an answer and BELLE's std_answer.

For when no judge endpoint is reachable. It measures overlap with one reference answer, not
quality: its numbers are NOT comparable with LLM-judge scores (the report labels them so), and it
cannot score items whose std_answer is empty (all of generation and brainstorming, most of
rewrite in BELLE's set): those are recorded as "no_reference", never as 0.

ROUGE-L itself comes from Google's `rouge-score` package. Its default tokenizer keeps only
[a-z0-9] and so turns Chinese text into nothing; it accepts a tokenizer object, and we give it
one token per character (whitespace and punctuation dropped, letters lower-cased), the usual
unit for Chinese ROUGE since Chinese has no spaces between words.
"""

from __future__ import annotations

import functools
import unicodedata


class CharTokenizer:
    """One token per character; whitespace and punctuation dropped, NFKC + lower-cased."""

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).lower()
        return [c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P")]


@functools.cache
def _scorer():
    # rouge-score imports nltk (about a second): only `eval judge --judge reference` pays for it.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharTokenizer())


def rouge_l(answer: str, reference: str) -> float:
    """Character ROUGE-L F1 in 0..1 (0 when either side has no characters left)."""
    return _scorer().score(reference, answer)["rougeL"].fmeasure


def judge_reference(item: dict) -> dict:
    """The score fields for one answer item."""
    if not item.get("std_answer", "").strip():
        return {"score": None, "status": "no_reference", "value": None, "reply": None}
    s = rouge_l(item["answer"], item["std_answer"])
    return {"score": s, "status": "ok", "value": s, "reply": None}
