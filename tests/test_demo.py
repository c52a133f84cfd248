"""`toucan demo`: the generated tasks (split, answers, determinism) and a tiny end-to-end smoke run.
The >= 80 % held-out accuracy of the full-size demo is measured and reported, not tested here
(it needs minutes of training)."""

import json
import re

import pytest

from toucan import cli
from toucan.config import DemoConfig
from toucan.demo_tasks import FAMILIES, generate
from toucan.errors import ConfigError

QUOTED = re.compile(r"“(.+?)”")


def problem_of(rec: dict) -> tuple:
    """The problem behind a question, read back from its text (independently of the generator)."""
    q = rec["instruction"]
    if rec["family"] in ("add", "compare", "greater", "parity", "digits", "div5"):
        return rec["family"], tuple(int(x) for x in re.findall(r"\d+", q))
    return rec["family"], QUOTED.search(q).group(1)


def solve(rec: dict) -> str:
    fam, p = problem_of(rec)
    return {"add": lambda: str(sum(p)), "compare": lambda: str(max(p)),
            "parity": lambda: "奇数" if p[0] % 2 else "偶数", "repeat": lambda: p,
            "greater": lambda: "是" if p[0] > p[1] else "否", "digits": lambda: str(len(str(p[0]))),
            "div5": lambda: "否" if p[0] % 5 else "是",
            "reverse": lambda: p[::-1], "count": lambda: str(len(p))}[fam]()


def test_tasks_split_answers_and_determinism():
    fams = list(FAMILIES)
    n_train, n_held = 200 * len(fams), 50 * len(fams)
    train, held = generate(n_train, n_held, 0, fams)
    assert len(train) == n_train and len(held) == n_held
    for recs, n in ((train, 200), (held, 50)):
        assert {f: sum(r["family"] == f for r in recs) for f in FAMILIES} == {f: n for f in FAMILIES}
    for r in train + held:
        assert r["output"] == solve(r), r
        assert r["input"] == "" and r["output"]
    # no problem (family + content), in any phrasing, is in both sets; held-out ones are distinct
    held_problems = [problem_of(r) for r in held]
    assert not {problem_of(r) for r in train} & set(held_problems)
    assert len(set(held_problems)) == len(held_problems)
    # several phrasings per family
    for f in FAMILIES:
        shapes = {re.sub(r"\d+|“.+?”", "_", r["instruction"]) for r in train if r["family"] == f}
        assert len(shapes) == len(FAMILIES[f].phrasings) >= 3, shapes
    assert generate(n_train, n_held, 0, fams) == (train, held)
    assert generate(n_train, n_held, 1, fams)[0] != train
    assert {r["family"] for r in generate(10, 4, 0, ["count", "parity"])[0]} == {"count", "parity"}
    with pytest.raises(ConfigError, match="unknown demo task family nope"):
        generate(10, 4, 0, ["count", "nope"])


@pytest.mark.integration
@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output_dir", str(out), "--train_examples", "200", "--eval_examples", "20",
            "--max_steps", "4", "--hidden_size", "64", "--num_layers", "1", "--batch_size", "8",
            "--vocab_size", "400", "--threads", "1", "--no-full-recipe"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for f in ["data/train.jsonl", "data/heldout.jsonl", "tokenizer/tokenizer.model", "base/toucan.json",
              "sft/toucan.json", "sft/model.safetensors", "summary.json", "summary.txt"]:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for k in ("before", "after"):
        assert s[k]["total"] == 20 and 0 <= s[k]["accuracy"] <= 1 and set(s[k]["per_family"]) == set(DemoConfig().families)
    assert s["train"]["first_loss"] > 0 and s["model"]["parameters"] > 10_000
    assert len(s["chat"]) == 3 and all(t["user"] for t in s["chat"])
    assert "held-out exact match: before" in printed and "助手:" in printed
    assert cli.main(["verify", str(out / "sft")]) == 0

    # The demo tokenizer gives the Alpaca header one piece, and each task character its own piece.
    from toucan.demo_tasks import POOL
    from toucan.modeling import load_tokenizer
    from toucan.prompts import build_prompt

    tok = load_tokenizer(out / "tokenizer")
    pieces = tok.convert_ids_to_tokens(tok(build_prompt("655是奇数还是偶数？"), add_special_tokens=False)["input_ids"])
    assert pieces[1].startswith("Below\u2581is\u2581an") and pieces[1].endswith("request."), pieces
    assert pieces[2] == "\n\n###\u2581Instruction:\n" and pieces[-1] == "\n\n###\u2581Response:", pieces
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) == 2 for c in POOL)  # '▁' + the character

    # A second run reuses every step (same settings): the trained model is not rewritten.
    before = (out / "sft" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "sft" / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.integration
@pytest.mark.slow
def test_demo_full_recipe(tmp_path, capsys):
    """The whole recipe at the smallest size: delta round trip, 4-bit GPTQ, eval report, web command."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--output", str(out), "--train_examples", "120", "--eval_examples", "12",
                     "--max_steps", "2", "--hidden_size", "64", "--num_layers", "1", "--batch_size", "8",
                     "--vocab_size", "400", "--threads", "1"]) == 0
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    r = s["recipe"]
    assert r["delta"]["bit_exact"] is True
    assert cli.main(["verify", str(out / "sft-restored")]) == 0
    q = json.loads((out / "sft-gptq-4bit" / "config.json").read_text())["quantization_config"]
    assert q["bits"] == 4 and q["group_size"] == 32
    assert 0 <= r["gptq_4bit"]["accuracy"] <= 1
    # the edge step: GGUF files answered through the llama.cpp backend, printed beside fp32 and GPTQ
    assert set(r["gguf"]) == {"q8_0", "q4_0", "gptq-q4_0"}
    for name, g in r["gguf"].items():
        assert (out / f"sft-{name}.gguf").is_file() and 0 <= g["accuracy"] <= 1 and 0 <= g["same_as_fp32"] <= 1
    assert json.loads((out / "sft-gptq-q4_0.gguf.toucan.json").read_text())["type"] == "q4_0"
    for f in ("table.md", "chart.png", "report.json"):
        assert (out / "report" / f).is_file()
    table = (out / "report" / "table.md").read_text(encoding="utf-8")
    assert "demo-fp32" in table and "demo-4bit" in table
    assert s["web_command"] == f"toucan web --model {out / 'sft-restored'}"
    assert s["web_command"] in capsys.readouterr().out
