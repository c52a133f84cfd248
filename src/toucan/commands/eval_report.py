"""`toucan eval report SCORES... --output DIR`: the judge scores as a table, counts, settings, chart."""

from __future__ import annotations

from ..config import EvalReportConfig
from ..eval.report import write_report


def run(cfg: EvalReportConfig) -> int:
    _, table, notes = write_report(cfg.scores, cfg.output, overwrite=cfg.overwrite)
    print(table, end="")
    for n in notes:
        print("note:", n.replace("**", ""))
    print(f"report -> {cfg.output}/ (report.md, table.md, table.csv, report.json, chart.png)")
    return 0
