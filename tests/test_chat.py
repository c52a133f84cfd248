"""`toucan chat` driven as a real CLI subprocess (stdin/stdout) on a tiny trained model."""

import json
import os
import subprocess
import sys

import pytest

from test_engine import REPLY, save_parrot

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# One thread per test process: 2 OpenMP threads on 2 cores shared with other tests are far slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GREEDY = ["--temperature", "0", "--repetition_penalty", "1.0", "--max-tokens", "32"]


@pytest.fixture(scope="module")
def model_dir(tiny_tok, tmp_path_factory):
    return save_parrot(tiny_tok, tmp_path_factory.mktemp("chat") / "parrot")


def toucan(args, stdin, cwd):
    return subprocess.run([sys.executable, "-m", "toucan.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=ENV)


def test_interactive_commands_history_and_plain_mode(model_dir, tmp_path):
    # --plain (stdin -> stdout) runs at the same time: two CLI processes, half the wall time
    plain = subprocess.Popen([sys.executable, "-m", "toucan.cli", "-q", "chat", "--model", str(model_dir), "--plain",
                              *GREEDY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env=ENV)
    script = "\n".join([
        "你好", "/regen", "/save one.json",       # one turn, answered twice
        "你好", "/save two.json",                # history goes into the second prompt
        "!!remove", "!!save undo.json",           # FastChat forms
        "/reset", "/save none.json",
        "/load two.json", "/save loaded.json",
        "/exit", "你好",                          # nothing after /exit runs
    ]) + "\n"
    r = toucan(["chat", "--model", str(model_dir), *GREEDY], script, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f"Toucan: {REPLY}\n") == 3, r.stdout
    turns = lambda f: json.loads((tmp_path / f).read_text())  # noqa: E731
    assert turns("one.json") == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": REPLY}]
    assert len(turns("two.json")) == 4 and turns("two.json") == turns("loaded.json")
    assert len(turns("undo.json")) == 2 and turns("none.json") == []

    out, err = plain.communicate("你好\n", timeout=120)
    assert plain.returncode == 0, err
    assert out == REPLY + "\n"  # only the answer on stdout


def test_missing_model_is_one_line_error(tmp_path, capsys):
    from toucan import cli

    assert cli.main(["-q", "chat", "--model", str(tmp_path / "missing"), "--plain"]) == 2
    assert "not a directory" in capsys.readouterr().err
