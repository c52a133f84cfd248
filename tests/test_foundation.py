"""Unit tests for the shared ground: CLI generation, prompts, manifest, atomic writes."""

import json

import pytest

from toucan import cli
from toucan.errors import ConfigError, ManifestError
from toucan.fsutil import atomic_dir
from toucan.manifest import check_manifest, verify_manifest, write_manifest
from toucan.prompts import build_prompt, chat_prompt, messages_to_turns

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:")


def test_alpaca_prompt_is_the_original():
    assert build_prompt("写一首诗") == ALPACA_NO_INPUT.format(instruction="写一首诗")
    assert build_prompt("翻译", "hello") == ALPACA_INPUT.format(instruction="翻译", input="hello")


def test_chat_prompt_equals_training_prompt_bytes():
    q = "你好，请介绍一下你自己。"
    assert chat_prompt([{"role": "user", "content": q}]).encode() == build_prompt(q).encode()


def test_history_rendering_and_message_order():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    system, hist, cur = messages_to_turns(msgs)
    assert (system, hist, cur) == (None, [("a", "b")], "c")
    p = chat_prompt(msgs)
    assert p.endswith("### Instruction:\nc\n\n### Response:")
    assert "### Instruction:\na\n\n### Response:b\n\n" in p
    with pytest.raises(ConfigError):
        messages_to_turns([{"role": "assistant", "content": "x"}])


def test_manifest_catches_changed_file(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"abc")
    write_manifest(tmp_path, "test")
    assert verify_manifest(tmp_path) == []
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert verify_manifest(tmp_path) == ["changed: w.bin"]
    with pytest.raises(ManifestError):
        check_manifest(tmp_path)
    assert cli.main(["verify", str(tmp_path)]) == 1


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as d:
            (d / "x").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cli_config_file_and_flags(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"directory": str(tmp_path)}))
    # no manifest there: a typed error, one line, non-zero exit
    assert cli.main(["--config", str(cfg), "verify", str(tmp_path)]) == 2
    assert "no toucan.json" in capsys.readouterr().err


def test_every_command_has_help(capsys):
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(name.split() + ["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-len" in out and "--model_name_or_path" not in out  # aliases work but are not shown


def test_atomic_outputs_are_readable_by_others(tmp_path):
    import os
    import stat

    from toucan.fsutil import atomic_write_text

    atomic_write_text(tmp_path / "f.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "w").write_text("y")
    old = os.umask(0o022)
    os.umask(old)
    if old & 0o044:
        pytest.skip("umask hides group/other read bits")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) & 0o044 == 0o044
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) & 0o055 == 0o055
