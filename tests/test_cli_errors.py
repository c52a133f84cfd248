"""One-line errors from the CLI shell (--config files, chat --plain stdin) and a quiet default
log level for model-loading commands (issue 11)."""

import io
import subprocess
import sys

import pytest

from toucan import cli

OK = '{"instruction": "a", "output": "b"}\n'


@pytest.fixture()
def data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(OK, encoding="utf-8")
    return p


CONFIG_ERRORS = [
    # (file name, text, the error after "toucan data: error: --config PATH")
    ("missing.yaml", None, ": cannot read file (No such file or directory)"),
    ("bad.yaml", "max_len: [1\n", ", line 2: invalid YAML (expected ',' or ']', but got '<stream end>')"),
    ("tab.yaml", "seed: 1\n\tmax_len: 2\n", ", line 2: invalid YAML (found character '\\t' that cannot start any token)"),
    ("bad.json", '{"max_len": 5,}', ", line 1: invalid JSON (Expecting property name enclosed in double quotes)"),
    ("list.yaml", "- max_len\n- 5\n", ": expected a mapping of option: value, got list"),
    ("scalar.json", "512", ": expected a mapping of option: value, got int"),
    ("type.yaml", 'max_len: "5x2"\n', ": option 'max_len' must be an integer, got str \"5x2\""),
    ("float.yaml", "max_len: 51.5\n", ": option 'max_len' must be an integer, got float 51.5"),
    ("bool.yaml", "shuffle: \"no\"\n", ": option 'shuffle' must be true or false, got str \"no\""),
    ("yes.yaml", "seed: yes\n", ": option 'seed' must be an integer, got bool true"),
    ("struct.yaml", "template: {a: 1}\n", ": option 'template' must be a string, got dict {\"a\": 1}"),
    ("choice.yaml", "template: nope\n", ": option 'template' must be one of alpaca, got 'nope'"),
    ("list_elem.yaml", "data: [a.json, [b.json]]\n", ": option 'data' must be a string, got list [\"b.json\"]"),
]


@pytest.mark.parametrize("name,text,tail", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_config_file_is_one_line_naming_file_and_option(tmp_path, data, capsys, name, text, tail):
    cfg = tmp_path / name
    if text is not None:
        cfg.write_text(text, encoding="utf-8")
    assert cli.main(["--config", str(cfg), "data", str(data)]) == 2
    assert capsys.readouterr().err == f"toucan data: error: --config {cfg}{tail}\n"


def test_config_values_are_converted_by_the_command_line_rules(tmp_path, data, capsys, monkeypatch):
    """A string is read the way argparse reads the same text on the command line: max_len: "512" is
    512 (as --max-len 512), a YAML 1e-5 (a string to PyYAML) is a float; an int is fine for a float."""
    seen = {}
    monkeypatch.setattr(cli, "run_command", lambda name, c: seen.setdefault(name, c) and 0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'max_len: "512"\nseed: 7\nshuffle: false\ndata: {data}\n', encoding="utf-8")
    assert cli.main(["--config", str(cfg), "data"]) == 0
    c = seen["data"]
    assert (c.max_len, c.seed, c.shuffle, c.data) == (512, 7, False, [str(data)])
    assert type(c.max_len) is int
    cfg.write_text("model: m\ndata: d.jsonl\noutput: o\nlearning_rate: 1e-5\nwarmup_ratio: 0\nnum_train_epochs: '2'\n",
                   encoding="utf-8")
    seen.clear()
    assert cli.main(["--config", str(cfg), "train"]) == 0
    t = seen["train"]
    assert (t.learning_rate, t.warmup_ratio, t.num_train_epochs) == (1e-5, 0.0, 2.0)
    assert type(t.learning_rate) is float and type(t.warmup_ratio) is float
    # the command line still wins over the file, and an empty file is no defaults
    cfg.write_text("", encoding="utf-8")
    seen.clear()
    assert cli.main(["--config", str(cfg), "data", str(data), "--max-len", "9"]) == 0
    assert seen["data"].max_len == 9


def test_chat_plain_invalid_utf8_on_stdin_is_one_line(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n".encode() + b"caf\xe9 \xff\n")))
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--plain", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "toucan chat: error: --plain: stdin is not UTF-8 text (byte 10, line 2)"
    # interactive: a line of bad bytes (read as lone surrogates, as Python's stdin does under a C
    # locale) is skipped with a note, and the chat goes on
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n\xe4\xbd\xa0\xe5\xa5\xbd\n/exit\n"),
                                                       encoding="utf-8", errors="surrogateescape"))
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    assert "[this line is not UTF-8 text: ignored]" in err and out.count("Toucan:") == 1


NOISE = ["_C_mxfp8", "Failed to load", "triton", "_pytree", "register_constant", "Setting accelerator",
         "GPT-QModel", "Python GIL", "INFO  ", "Tokenicer", "HTTP Request", "Files in directory"]


def _toucan(*args, stdin=b""):
    return subprocess.run([sys.executable, "-m", "toucan.cli", *args], input=stdin, capture_output=True, timeout=600)


@pytest.mark.slow
def test_model_loading_commands_are_quiet_by_default(tiny_model_dir, tmp_path):
    """A real `toucan chat --plain` and `toucan quantize` in a subprocess: stderr carries none of
    the third-party noise (torchao's .so, triton, torch _pytree, DeepSpeed, GPTQModel's banner and
    tables), only toucan's own lines."""
    chat = _toucan("chat", "--model", str(tiny_model_dir), "--plain", "--max-new-tokens", "3", "--device", "cpu",
                   stdin="你好".encode())
    err = chat.stderr.decode()
    assert chat.returncode == 0, err
    assert [n for n in NOISE if n in err] == [], err
    q = _toucan("quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                "--output", str(tmp_path / "q"), "--device", "cpu")
    err = q.stderr.decode()
    assert q.returncode == 0, err
    assert [n for n in NOISE if n in err] == [], err
    assert "rtn 4-bit group 32" in q.stdout.decode()  # toucan's own lines stay


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA (CI has none)")
@pytest.mark.parametrize("cmd", ["serve", "chat"])
def test_cuda_device_without_cuda_is_one_line(tiny_model_dir, cmd):
    """`--device cuda` on a CPU-only torch: one line naming the device, exit 2, and no traceback
    from the engine's child process either (serve loads the model there)."""
    from conftest import free_port

    extra = ["--port", str(free_port())] if cmd == "serve" else ["--plain"]
    r = _toucan(cmd, "--model", str(tiny_model_dir), "--device", "cuda", *extra)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert f"toucan {cmd}: error: device 'cuda': torch" in err and "Traceback" not in err, err
