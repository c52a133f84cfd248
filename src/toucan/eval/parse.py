"""Read a score out of a judge's free-text reply.

BELLE asks the judge for `得分:` and a score in 0..1 but ships no parser, and judges answer in many
forms: `得分：0.8`, `得分: 1`, `**得分**: 0.5分`, `得分:0.7/1`, `最终得分为 0.6`, `Score: 0.9`,
`得分：4/5`, `得分：80%`, a score outside 0..1, or no score at all. Rules, in order:

1. The reply is NFKC-normalised (full-width `：０．８％` -> `:0.8%`) and markdown emphasis dropped.
2. A labelled score is a label (得分 / 分数 / 评分 / 打分 / score) followed, within a few separator
   characters (`:`, `为`, `是`, `=`, spaces, quotes, brackets), by a number, optionally `/N`
   (a fraction: value / N), `%` (value / 100) or `分`.
3. A label prefixed 最终 / 总 / 综合 / final / overall wins; otherwise the FIRST labelled score
   (BELLE's prompt asks for the score first, then the reasons, which may quote other numbers).
4. With no label, a reply that is nothing but a number is taken as the score.
5. A score outside 0..1 is rejected ("out_of_range", a parse failure) or clamped, as configured.
6. Anything else is "unparseable": recorded with the reply, never scored, never 0.

No well-kept library parses this (it is a convention of BELLE's prompt), so it is written here.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_LABEL = r"(?:得分|分数|评分|打分|分值|总分|score)"
_FINAL = r"(?:最终|最后|总|综合|final|overall|total)\s*"
_SEP = r"[\s:=为是：\"'“”‘’\[\(（【<]{0,6}"
_SCORE = re.compile(rf"({_FINAL})?{_LABEL}{_SEP}(?P<num>{_NUM})(?:\s*/\s*(?P<den>{_NUM}))?\s*(?P<pct>%)?",
                    re.IGNORECASE)
_BARE = re.compile(rf"^\s*(?P<num>{_NUM})\s*(?:/\s*(?P<den>{_NUM}))?\s*(?P<pct>%)?\s*分?\s*[。.]?\s*$")


@dataclass(frozen=True)
class Parsed:
    score: float | None   # the score counted in the report (None: not scored)
    status: str           # "ok", "clamped", "out_of_range" or "unparseable"
    value: float | None   # the number the judge gave, before any clamping
    matched: str | None   # the text it was read from


def _value(m: re.Match) -> float | None:
    v = float(m.group("num"))
    if m.group("den") is not None:
        den = float(m.group("den"))
        if den <= 0:
            return None
        v /= den
    elif m.group("pct"):
        v /= 100
    return v


def parse_score(reply: str | None, out_of_range: str = "reject") -> Parsed:
    assert out_of_range in ("reject", "clamp")
    text = unicodedata.normalize("NFKC", reply or "").replace("*", "").replace("__", "")
    matches = list(_SCORE.finditer(text))
    final = [m for m in matches if m.group(1)]
    m = final[-1] if final else (matches[0] if matches else _BARE.match(text))
    if m is None or (v := _value(m)) is None:
        return Parsed(None, "unparseable", None, None)
    if 0.0 <= v <= 1.0:
        return Parsed(v, "ok", v, m.group(0).strip())
    if out_of_range == "clamp":
        return Parsed(min(1.0, max(0.0, v)), "clamped", v, m.group(0).strip())
    return Parsed(None, "out_of_range", v, m.group(0).strip())
