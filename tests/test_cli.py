"""The CLI's vocabulary, checked on every command's parser (cli.COMMANDS): --model for the input
model, --output for what a command writes, --data for data, --max-len for a sequence length, one
spelling per option in help with its default, no abbreviations, and every old spelling (HF Trainer,
FastChat, toucan's own earlier names) still parsed as the same option."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from toucan import cli

# Spellings of the four concepts that must not be an option's visible name (they are aliases).
SYNONYMS = {
    "model": {"--model-name-or-path", "--model-path", "--model-dir", "--base-model", "--target-model-path",
              "--target", "--adapter", "--checkpoint-dir"},
    "output": {"--output-dir", "--out", "--out-dir", "--save-dir", "--output-path", "--delta-path"},
    "data": {"--data-path", "--dataset", "--data-file", "--train-file", "--eval-set", "--answers", "--calib-data"},
    "max-len": {"--model-max-length", "--max-length", "--max-seq-len", "--max-seq-length", "--seq-len", "--ctx",
                "--cutoff-len", "--calib-max-len", "--block-size"},
}
# Commands without an input model / without an output (anything else must have --model / --output).
NO_MODEL = {"data", "demo", "verify", "tokenizer extend", "apply-delta", "eval judge", "eval report"}
NO_OUTPUT = {"chat", "web", "serve", "verify", "check-delta"}
# Commands that take a LoRA adapter as --model and so --base for it.
ADAPTER_COMMANDS = {"chat", "web", "serve", "eval generate", "ppl", "quantize", "merge-lora", "export gguf"}


def subparser(name: str) -> argparse.ArgumentParser:
    p = cli.build_parser()
    for part in name.split():
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[part]
    return p


def all_parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from all_parsers(sub)


def visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.help is not argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def visible_flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in visible(p) for s in a.option_strings}


def test_abbreviations_are_off_on_every_parser():
    parsers = list(all_parsers(cli.build_parser()))
    assert len(parsers) >= len(cli.COMMANDS) + 1
    assert all(p.allow_abbrev is False for p in parsers), [p.prog for p in parsers if p.allow_abbrev]


def test_the_issue_reproducer_train_model_is_not_ambiguous():
    ns, extra = cli.build_parser().parse_known_args(["train", "--model", "DIR", "--data", "F", "--output", "OUT",
                                                     "--max-len", "64"])
    assert (ns.model, ns.data, ns.output, ns.max_len, extra) == ("DIR", ["F"], "OUT", 64, [])


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_no_prefix_of_an_option_is_taken_for_it(name):
    """`--mod` is never read as --model (or as a hidden --model_max_length): abbreviations are
    errors (or, for train, passed on to TrainingArguments, which rejects them)."""
    p = subparser(name)
    every = {s for a in p._actions for s in a.option_strings}
    positionals = ["x" for a in p._actions if not a.option_strings]  # so that only `cut` can fail
    for flag in sorted(visible_flags(p)):
        for cut in {flag[:-1], flag[: max(3, len(flag) // 2)]} - every - {"--"}:
            ns, extra = p.parse_known_args(positionals + [cut, "1"])  # an ambiguous prefix would exit
            assert cut in extra, f"{name}: {cut} was read as an option"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_shows_one_spelling_per_option_with_its_default(name, capsys):
    p = subparser(name)
    cls = cli.COMMANDS[name][0]
    for a in visible(p):
        longs = [s for s in a.option_strings if s.startswith("--")]
        if isinstance(a, argparse.BooleanOptionalAction):
            assert len(longs) == 2 and longs[1] == "--no-" + longs[0][2:], longs
        else:
            assert len(longs) == 1, f"{name}: {a.option_strings} shown for one option"
        assert "_" not in longs[0], f"{name}: {longs[0]}: the hyphenated spelling is the one shown"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for a in visible(p):
        f = fields[a.dest]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.metadata.get("required"):
            assert "(required)" in a.help, f"{name} {a.option_strings[0]}"
        elif default not in (None, [], ""):
            assert "(default: " in a.help, f"{name} {a.option_strings[0]}: help does not give the default"
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    listed = re.findall(r"^  (--[a-z0-9][a-z0-9-]*)", text, re.M)
    assert len(listed) == len(set(listed)) == len([a for a in visible(p)]), listed
    assert not re.search(r"--[a-z0-9]+_[a-z0-9_]*", text), f"{name}: an underscore spelling in help"
    bools = [a for a in visible(p) if isinstance(a, argparse.BooleanOptionalAction)]
    for a in bools:
        assert f"{a.option_strings[0]}/{a.option_strings[1]}" in text


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_one_name_per_concept(name):
    p = subparser(name)
    flags = visible_flags(p)
    for concept, synonyms in SYNONYMS.items():
        assert not flags & synonyms, f"{name}: {sorted(flags & synonyms)} shown; use --{concept}"
    assert ("--model" in flags) == (name not in NO_MODEL), name
    assert ("--output" in flags) == (name not in NO_OUTPUT), name
    if name in ADAPTER_COMMANDS:
        assert "--base" in flags, f"{name} takes a LoRA adapter as --model, so --base too"
    # a sequence-length option is --max-len wherever one exists
    lengths = {a.option_strings[0] for a in visible(p) if a.dest in ("max_len", "ctx", "model_max_length")}
    assert lengths <= {"--max-len"}, lengths


def _sample(a: argparse.Action) -> list[str]:
    if isinstance(a, argparse.BooleanOptionalAction) or a.nargs == 0:
        return []
    if a.choices:
        return [str(list(a.choices)[0])]
    return ["7"] if a.type in (int, float) else ["x"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_hidden_alias_parses_as_its_option(name):
    """Old spellings keep working: each alias sets the same field as the option help shows."""
    p = subparser(name)
    hidden = [a for a in p._actions if a.option_strings and a.help is argparse.SUPPRESS]
    for f in dataclasses.fields(cli.COMMANDS[name][0]):
        if f.metadata.get("positional") or f.name == "extra_args":
            continue
        flags = cli.flag_names(f)
        shown = next(a for a in visible(p) if a.dest == f.name)
        assert shown.option_strings[0] == flags[0]
        for alias in flags[1:]:
            action = next(a for a in hidden if alias in a.option_strings)
            assert action.dest == f.name
            ns, extra = p.parse_known_args([alias, *_sample(shown)])
            assert extra == [] and getattr(ns, f.name) is not None, (name, alias)


def test_hf_trainer_and_fastchat_spellings_give_the_same_config():
    new = ["train", "--model", "M", "--data", "D", "--output", "O", "--max-len", "64"]
    old = ["train", "--model_name_or_path", "M", "--data_path", "D", "--output_dir", "O", "--model_max_length", "64"]
    p = cli.build_parser()
    configs = [cli.config_from_args(cli.COMMANDS["train"][0], *p.parse_known_args(argv)) for argv in (new, old)]
    assert configs[0] == configs[1]
    assert (configs[0].model, configs[0].data, configs[0].output, configs[0].max_len) == ("M", ["D"], "O", 64)
    ns, _ = p.parse_known_args(["make-delta", "--base-model-path", "B", "--target-model-path", "T", "--delta-path", "D"])
    assert (ns.base, ns.model, ns.output) == ("B", "T", "D")
    ns, _ = p.parse_known_args(["apply-delta", "--base-model-path", "B", "--delta-path", "D", "--target-model-path", "T"])
    assert (ns.base, ns.delta, ns.output) == ("B", "D", "T")


def test_config_file_accepts_old_names(tmp_path, capsys):
    """A --config file written for the HF Trainer names still works (keys are any spelling)."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_max_length": 64, "output": str(tmp_path / "out.jsonl")}))
    assert cli.main(["--config", str(cfg), "data", str(data)]) == 0
    assert (tmp_path / "out.jsonl").is_file()
