"""`toucan eval report`: the score table (Markdown, CSV, JSON) and a bar chart, from scores files.

Averages follow the published Toucan/BELLE table: a class score is the mean of its scored items;
`avg` is the mean of the per-class means (not item-weighted: the original's ten class scores
average 0.6396 against its 0.6408, an item-weighted mean would be 0.66); `avg w/o math, code` is the
mean of the other eight classes. Only items with a score count: parse failures, judge errors and
questions never answered are counted per class and shown, never averaged in as 0. A class with
no scored item (e.g. generation under the reference judge, which has no std_answer there) shows
"–" and the averages are taken over the classes that have a score, which the report says.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from ..errors import EvalError
from ..fsutil import atomic_dir, check_output
from .items import CLASSES, read_records

log = logging.getLogger(__name__)

NO_MATH_CODE = tuple(c for c in CLASSES if c not in ("math", "code"))
COLUMNS = ("model", "avg", *CLASSES, "avg w/o math, code")
SCORED = ("ok", "clamped")
PARSE_FAILURES = ("unparseable", "out_of_range")


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(meta: dict, items: list[dict]) -> dict:
    """One model's row: per-class means and counts, the two averages, its settings."""
    judge = meta.get("judge") or {}
    per_class = {}
    for c in CLASSES:
        got = [i for i in items if i["class"] == c]
        expected = (meta.get("class_counts") or {}).get(c, len(got))
        counts = {st: sum(i["status"] == st for i in got) for st in (*SCORED, *PARSE_FAILURES, "no_reference", "error")}
        judged = len(got) - counts["error"]
        per_class[c] = {"score": _mean(i["score"] for i in got if i["status"] in SCORED),
                        "items": expected, "scored": counts["ok"] + counts["clamped"], "clamped": counts["clamped"],
                        "parse_failures": counts["unparseable"] + counts["out_of_range"],
                        "no_reference": counts["no_reference"], "missing": max(0, expected - judged)}
    label = meta.get("model", "?") + ("" if judge.get("kind", "llm") == "llm" else " (ROUGE-L, not comparable)")
    return {"model": label, "judge": judge, "generation": meta.get("generation"), "model_dir": meta.get("model_dir"),
            "template": meta.get("template"), "eval_set": meta.get("eval_set"), "spend": meta.get("spend"),
            "avg": _mean(per_class[c]["score"] for c in CLASSES),
            "avg w/o math, code": _mean(per_class[c]["score"] for c in NO_MATH_CODE),
            "classes": per_class,
            "unscored_classes": [c for c in CLASSES if per_class[c]["score"] is None]}


def _row(s: dict) -> list:
    return [s["model"], s["avg"], *(s["classes"][c]["score"] for c in CLASSES), s["avg w/o math, code"]]


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def markdown_table(rows: list[list]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _counts_table(summaries: list[dict]) -> str:
    head = "| model | class | items | scored | parse failures | no reference | missing |\n|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {s['model']} | {c} | {k['items']} | {k['scored']} | {k['parse_failures']} | "
                   f"{k['no_reference']} | {k['missing']} |\n"
                   for s in summaries for c in CLASSES for k in [s["classes"][c]])
    total = "".join(f"| {s['model']} | **all** | " + " | ".join(
        str(sum(s["classes"][c][f] for c in CLASSES)) for f in ("items", "scored", "parse_failures", "no_reference", "missing"))
        + " |\n" for s in summaries)
    return head + body + total


def _notes(summaries: list[dict]) -> list[str]:
    notes = []
    for s in summaries:
        j = s["judge"]
        if j.get("kind") == "reference":
            notes.append(f"**{s['model']}**: scored offline by character-level ROUGE-L F1 against BELLE's std_answer. "
                         "It measures overlap with one reference, not quality, and is NOT comparable with LLM-judge "
                         "scores. Items with an empty std_answer cannot be scored this way (counted as 'no reference'):"
                         f" classes without any score: {', '.join(s['unscored_classes']) or 'none'}.")
        elif s["unscored_classes"]:
            notes.append(f"**{s['model']}**: no scored item in {', '.join(s['unscored_classes'])}; "
                         "its averages are over the remaining classes.")
    return notes


def _settings(s: dict) -> str:
    j, spend = s["judge"], s["spend"]
    judge = (f"reference ({j.get('method')})" if j.get("kind") == "reference" else
             f"{j.get('model')} at {j.get('url') or 'the openai default endpoint'}, temperature {j.get('temperature')}, "
             f"max_tokens {j.get('max_tokens')}, out-of-range scores: {j.get('out_of_range')}")
    lines = [f"- **{s['model']}**: model `{s['model_dir']}`, template `{s['template']}`, eval set `{s['eval_set']}`",
             f"  - generation: `{json.dumps(s['generation'], ensure_ascii=False)}`", f"  - judge: {judge}"]
    if spend:
        lines.append(f"  - judge spend: {spend['calls']} calls answered and {spend.get('failed', 0)} failed in the last "
                     f"judge run ({spend['cache_hits']} cache hits), "
                     f"{spend['prompt_tokens'] + spend['completion_tokens']} tokens then; "
                     f"{spend['tokens_of_all_replies']} tokens for all replies in this table")
    return "\n".join(lines)


def chart(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [*CLASSES, "avg", "avg w/o\nmath, code"]
    n = len(summaries)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(10, 1.1 * len(labels)), 4.8))
    for k, s in enumerate(summaries):
        vals = [s["classes"][c]["score"] for c in CLASSES] + [s["avg"], s["avg w/o math, code"]]
        xs = [x + (k - (n - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [v or 0.0 for v in vals], width, label=s["model"])
        for x, v in zip(xs, vals):
            if v is None:  # not scored: mark it, a missing bar must not read as a 0
                ax.text(x, 0.01, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("judge score (0..1)")
    ax.set_title("BELLE eval: per-class scores")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(score_files: list[str]) -> tuple[list[dict], str, str]:
    """(per-model summaries, the table in Markdown, the whole report.md)."""
    summaries = [summarize(*read_records(p, "scores")) for p in score_files]
    names = [s["model"] for s in summaries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"two scores files for the same model name {', '.join(dup)}: "
                        "generate with distinct --model-name values")
    table = markdown_table([_row(s) for s in summaries])
    md = ["# BELLE eval: judge scores", "", table]
    md += ["`avg` is the mean of the per-class means; `avg w/o math, code` the mean of the other eight classes. "
           "Only scored items count: parse failures and missing items are listed below, never scored 0.", ""]
    md += [f"- {n}" for n in _notes(summaries)] + [""]
    md += ["![per-class scores](chart.png)", "", "## Counts per class", "", _counts_table(summaries),
           "## Settings", "", *(_settings(s) for s in summaries), ""]
    return summaries, table, "\n".join(md)


# A report directory holds no toucan.json; report.json is how a later run knows it as its own.
REPORT_MARKER = "report.json"


def write_report(scores: list[str], output: str, overwrite: bool = False) -> tuple[list[dict], str, list[str]]:
    """Write report.md, table.md, table.csv, report.json and chart.png into `output` atomically;
    return the summaries, the markdown table and the notes (markdown)."""
    # The scores files are inputs, so output can be neither one of them nor a folder holding one
    # (that folder usually also holds the answers and the paid judge cache).
    inputs = list(scores)
    check_output(output, overwrite=overwrite, inputs=inputs, markers=(REPORT_MARKER,))
    summaries, table, md = build_report(scores)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows([[("" if v is None else (round(v, 4) if isinstance(v, float) else v)) for v in _row(s)] for s in summaries])
    with atomic_dir(output, overwrite=overwrite, inputs=inputs, markers=(REPORT_MARKER,)) as d:
        (d / "report.md").write_text(md, encoding="utf-8")
        (d / "table.md").write_text(table, encoding="utf-8")
        (d / "table.csv").write_text(buf.getvalue(), encoding="utf-8")
        (d / "report.json").write_text(json.dumps({"columns": COLUMNS, "models": summaries}, ensure_ascii=False,
                                                  indent=2) + "\n", encoding="utf-8")
        chart(summaries, d / "chart.png")
    return summaries, table, _notes(summaries)
