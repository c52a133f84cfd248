"""Evaluation pieces without a judge server: class names against BELLE's real files, judge
messages, the reference judge, the report's averages (checked against hand-computed numbers), and
`eval generate` with a tiny model (batched, resumable)."""

import csv
import json
from collections import Counter

import pytest
from conftest import shared_path

from toucan import cli
from toucan.errors import EvalError
from toucan.eval.items import CLASSES, load_eval_set, load_judge_prompts, normalize_class, read_records
from toucan.prompts import judge_message


def test_class_names_of_the_real_belle_files_match():
    items = load_eval_set(shared_path("data/belle_eval/eval_set.json"))
    prompts = load_judge_prompts(shared_path("data/belle_eval/eval_prompt.json"))
    counts = Counter(i["class"] for i in items)
    assert len(items) == 1000
    assert counts == {"open qa": 285, "brainstorming": 179, "rewrite": 131, "generation": 98, "math": 75,
                      "classification": 65, "closed qa": 52, "summarization": 40, "code": 38, "extract": 37}
    assert set(CLASSES) <= set(prompts) and set(prompts) - set(CLASSES) == {"translation"}
    # the raw spellings really differ (case, U+00A0) and normalise to the same name
    raw_set = {json.loads(line)["class"] for line in shared_path("data/belle_eval/eval_set.json").open()}
    raw_prompts = {json.loads(line)["class"] for line in shared_path("data/belle_eval/eval_prompt.json").open()}
    assert "closed\u00a0qa" in raw_set and "closed\u00a0QA" in raw_prompts and "open QA" in raw_prompts
    assert {normalize_class(c) for c in raw_set} == set(CLASSES)
    assert len({i["id"] for i in items}) == 1000


def test_normalize_and_unknown_class(tmp_path):
    for raw in ("open QA", "Open  qa", " open\u00a0QA ", "OPEN\u3000QA"):
        assert normalize_class(raw) == "open qa"
    bad = tmp_path / "set.jsonl"
    bad.write_text('{"question": "q1", "class": "math", "std_answer": "1"}\n'
                   '{"question": "q2", "class": "poetry", "std_answer": ""}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"set.jsonl, line 2, field 'class': unknown class 'poetry'"):
        load_eval_set(bad)


def test_judge_message_is_belles():
    assert judge_message("P", "Q", "A", "S", "math") == "P Q 标准回答:S  模型回答：' A'。请针对模型回答给出得分，顺便给出理由："
    # generation, brainstorming and rewrite never show the reference, even when there is one
    assert judge_message("P", "Q", "A", "S", "rewrite") == "P Q  模型回答： 'A'。请针对模型回答给出得分，顺便给出理由："


def _scores_file(path, model, judge_kind, rows, class_counts):
    meta = {"kind": "scores", "model": model, "model_dir": f"/m/{model}", "template": "alpaca",
            "eval_set": "set.jsonl", "class_counts": class_counts, "generation": {"max_new_tokens": 8},
            "judge": {"kind": judge_kind, "model": "j", "temperature": 0.0}, "spend": None}
    lines = [{"_meta": meta}] + [{"id": f"{n}", "index": n, "class": c, "score": s, "status": st}
                                 for n, (c, s, st) in enumerate(rows)]
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    return path


def test_report_reproduces_hand_computed_averages(tmp_path):
    ok = "ok"
    rows = [("math", 0.0, ok), ("math", 0.5, ok), ("math", None, "unparseable"), ("code", 1.0, ok),
            ("classification", 0.5, ok), ("classification", 0.7, ok), ("extract", 0.2, ok),
            ("open qa", 0.9, ok), ("open qa", 0.8, ok), ("open qa", 0.7, ok), ("closed qa", 0.4, ok),
            ("generation", 1.0, ok), ("brainstorming", 0.6, ok), ("rewrite", 0.3, ok),
            ("rewrite", None, "out_of_range"), ("summarization", 0.5, ok), ("summarization", None, "error")]
    counts = {c: sum(r[0] == c for r in rows) for c in CLASSES}
    counts["math"] += 1  # one math question was never answered
    a = _scores_file(tmp_path / "a.jsonl", "A", "llm", rows, counts)
    ref_rows = [("math", 0.2, ok), ("code", 0.4, ok), ("generation", None, "no_reference"),
                ("brainstorming", None, "no_reference")] + [(c, 0.5, ok) for c in CLASSES[2:6]] + \
               [("rewrite", 0.1, ok), ("rewrite", None, "no_reference"), ("summarization", 0.3, ok)]
    b = _scores_file(tmp_path / "b.jsonl", "B", "reference", ref_rows, {c: sum(r[0] == c for r in ref_rows) for c in CLASSES})
    out = tmp_path / "report"
    assert cli.main(["eval", "report", str(a), str(b), "--output", str(out)]) == 0

    # By hand, model A. Class means: math (0+0.5)/2=0.25, code 1, classification 0.6, extract 0.2,
    # open qa 0.8, closed qa 0.4, generation 1, brainstorming 0.6, rewrite 0.3, summarization 0.5.
    # avg = 5.65/10 = 0.565; w/o math, code = 4.4/8 = 0.55. (Item-weighted: 8.1/14 = 0.5786; counting
    # the unparseable math reply as 0 would make math 0.1667: both would be wrong.)
    # Model B (reference): generation/brainstorming unscored -> avg over 8 classes:
    # (0.2+0.4+0.5*4+0.1+0.3)/8 = 3.0/8 = 0.375; w/o math, code: (0.5*4+0.1+0.3)/6 = 2.4/6 = 0.4.
    table = (out / "table.md").read_text(encoding="utf-8").splitlines()
    assert table[0] == ("| model | avg | math | code | classification | extract | open qa | closed qa | generation | "
                        "brainstorming | rewrite | summarization | avg w/o math, code |")
    assert table[2] == "| A | 0.5650 | 0.2500 | 1.0000 | 0.6000 | 0.2000 | 0.8000 | 0.4000 | 1.0000 | 0.6000 | 0.3000 | 0.5000 | 0.5500 |"
    assert table[3] == ("| B (ROUGE-L, not comparable) | 0.3750 | 0.2000 | 0.4000 | 0.5000 | 0.5000 | 0.5000 | 0.5000 "
                        "| – | – | 0.1000 | 0.3000 | 0.4000 |")
    csv_rows = list(csv.reader((out / "table.csv").open(encoding="utf-8")))
    assert csv_rows[1][:3] == ["A", "0.565", "0.25"] and csv_rows[2][8] == ""
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    math = rep["models"][0]["classes"]["math"]
    assert (math["items"], math["scored"], math["parse_failures"], math["missing"]) == (4, 2, 1, 1)
    assert rep["models"][0]["classes"]["summarization"]["missing"] == 1  # the judge error
    assert rep["models"][1]["classes"]["rewrite"]["no_reference"] == 1
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "NOT comparable with LLM-judge scores" in md and "generation, brainstorming" in md
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same model name twice is refused rather than silently merged
    assert cli.main(["eval", "report", str(a), str(a), "--output", str(tmp_path / "r2")]) == 2


def _mini_set(path, per_class=2):
    """A small eval set in BELLE's format, with its class-name quirks."""
    spell = {"open qa": "open QA", "closed qa": "closed\u00a0qa"}
    rows = [{"question": f"第{k}个{c}问题：请回答一下。", "class": spell.get(c, c),
             "std_answer": "" if c in ("generation", "brainstorming") else f"标准答案{k}"}
            for c in CLASSES for k in range(per_class)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reference_judge(tmp_path):
    from toucan.eval.reference import rouge_l

    assert rouge_l("中国有三十四个省级行政区", "中国有三十四个省级行政区。") == 1.0  # punctuation ignored
    assert rouge_l("北京", "上海") == 0.0
    assert rouge_l("中国有34个省", "中国目前有34个省级行政区") == pytest.approx(2 * 7 / (7 + 13))  # LCS 7; 7 and 13 chars
    answers = tmp_path / "answers.jsonl"
    items = load_eval_set(_mini_set(tmp_path / "set.jsonl", per_class=1))
    meta = {"kind": "answers", "model": "m", "class_counts": {c: 1 for c in CLASSES}}
    answers.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in
                               [{"_meta": meta}] + [{**i, "answer": i["std_answer"] or "随便"} for i in items]), encoding="utf-8")
    out = tmp_path / "scores.jsonl"
    assert cli.main(["eval", "judge", "--answers", str(answers), "--judge", "reference", "--output", str(out)]) == 0
    meta, scores = read_records(out, "scores")
    assert meta["judge"]["comparable_with_llm_judge"] is False
    by_class = {s["class"]: s for s in scores}
    assert by_class["math"]["score"] == 1.0 and by_class["math"]["status"] == "ok"
    assert by_class["generation"]["score"] is None and by_class["generation"]["status"] == "no_reference"


@pytest.mark.integration
def test_generate_is_batched_and_resumable(tmp_path, tiny_model_dir):
    eval_set = _mini_set(tmp_path / "set.jsonl", per_class=1)
    out = tmp_path / "answers.jsonl"
    def args(output=out, max_new_tokens=6):
        return ["eval", "generate", "--model", str(tiny_model_dir), "--eval-set", str(eval_set), "--output",
                str(output), "--max-new-tokens", str(max_new_tokens), "--batch-size", "4", "--device", "cpu"]
    assert cli.main(args() + ["--limit", "4"]) == 0
    meta, first = read_records(out, "answers")
    assert len(first) == 4 and meta["generation"]["max_new_tokens"] == 6 and meta["generation"]["do_sample"] is False
    assert meta["class_counts"]["open qa"] == 1 and meta["model"] == tiny_model_dir.name
    with out.open("a", encoding="utf-8") as f:
        f.write('{"id": "torn')  # a SIGKILL mid-write
    assert cli.main(args()) == 0
    _, answers = read_records(out, "answers")
    assert len(answers) == 10 and len({a["id"] for a in answers}) == 10
    assert answers[:4] == first  # the first run's answers were kept, not redone
    assert all(a["completion_tokens"] <= 6 and a["class"] in CLASSES for a in answers)
    # greedy: the same question gives the same answer in the other batch composition
    assert cli.main(args(tmp_path / "again.jsonl")) == 0
    again = {a["id"]: a["answer"] for a in read_records(tmp_path / "again.jsonl", "answers")[1]}
    assert again == {a["id"]: a["answer"] for a in answers}
    # a rerun with other settings is refused instead of mixing answers
    assert cli.main(args(max_new_tokens=9)) == 2
