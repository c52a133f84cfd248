"""No command deletes or overwrites what it did not write (issue 11, item 2), and a killed run's
temporary folder is removed by the next run of the same command (item 11).

Every writing command runs in-process through toucan.cli.main against real inputs (a tiny LLaMA,
data files, answers/scores files) with its output pointed at something that must survive: a
folder of someone's files, one of the command's own inputs, a folder that holds an input, the
working directory. Cheap commands also run for real twice, to show that a previous output of
toucan is replaced with --overwrite and refused without it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TOKENIZER
from toucan import cli
from toucan.errors import OutputError
from toucan.eval.items import CLASSES
from toucan.fsutil import _host_tag, atomic_dir, check_output, remove_stale_temps, temp_prefix


def run(capsys, argv):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("toucan ") and ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def precious(d: Path) -> Path:
    """A folder of someone's data, as the output of a command."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "important.txt").write_text("keep me")
    return d


# ---------------------------------------------------------------------------------------------
# the guard itself

def test_check_output_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    check_output(out)                                   # nothing there
    out.mkdir()
    check_output(out)                                   # an empty folder
    precious(out)
    with pytest.raises(OutputError, match="--overwrite"):
        check_output(out)
    with pytest.raises(OutputError, match="not written by toucan"):
        check_output(out, overwrite=True)
    (out / "toucan.json").write_text("{}")
    check_output(out, overwrite=True)                   # a previous output: replaceable with --overwrite
    with pytest.raises(OutputError, match="is an input"):
        check_output(out, overwrite=True, inputs=[out])
    with pytest.raises(OutputError, match="contains an input"):
        check_output(out, overwrite=True, inputs=[out / "important.txt"])
    monkeypatch.chdir(out)
    with pytest.raises(OutputError, match="working directory"):
        check_output(".", overwrite=True)
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")
    with pytest.raises(OutputError, match="working directory or one of its parents"):
        check_output("..", overwrite=True)
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "f.json"
    f.write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        check_output(f, is_dir=False)
    check_output(f, is_dir=False, overwrite=True)       # a file: --overwrite replaces it ...
    with pytest.raises(OutputError, match="is an input"):
        check_output(f, is_dir=False, overwrite=True, inputs=[f])  # ... unless it is an input
    with pytest.raises(OutputError, match="is a directory"):
        check_output(out, is_dir=False, overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output(f, overwrite=True)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(OutputError, match="is an input"):  # through a symlink too
        check_output(link, overwrite=True, inputs=[out])


def test_atomic_dir_checks_again_before_replacing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError):
        with atomic_dir(out) as d:
            (d / "x").write_text("new")
            precious(out)                               # appeared while the work ran
    assert (out / "important.txt").read_text() == "keep me" and not (out / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# every writing command

def _answers(path: Path, n: int = 1) -> Path:
    meta = {"kind": "answers", "model": "m", "class_counts": {c: n for c in CLASSES}}
    rows = [{"_meta": meta}] + [{"id": f"{c}-{k}", "index": i * n + k, "class": c, "question": "问题",
                                 "std_answer": "答案", "answer": "答案"}
                                for i, c in enumerate(CLASSES) for k in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path, tiny_model_dir, capsys):
    """Inputs of every writing command, each inside its own folder under tmp_path/in/."""
    w = {}
    d = tmp_path / "in"
    w["model"] = d / "models" / "tiny"
    shutil.copytree(tiny_model_dir, w["model"])
    w["model2"] = d / "models" / "tiny2"
    shutil.copytree(tiny_model_dir, w["model2"])
    (d / "data").mkdir(parents=True)
    w["sft"] = d / "data" / "sft.jsonl"
    w["sft"].write_text("".join(json.dumps({"instruction": f"问题{i}", "input": "", "output": f"答案{i}"},
                                           ensure_ascii=False) + "\n" for i in range(6)), encoding="utf-8")
    w["text"] = d / "data" / "text.txt"
    w["text"].write_text("你好，世界。" * 40, encoding="utf-8")
    w["evalset"] = d / "data" / "evalset.jsonl"
    w["evalset"].write_text(json.dumps({"question": "一加一等于几？", "class": "math", "std_answer": "二"},
                                       ensure_ascii=False) + "\n", encoding="utf-8")
    w["answers"] = _answers(d / "eval" / "answers.jsonl") if (d / "eval").mkdir() is None else None
    w["scores"] = d / "eval" / "scores.jsonl"
    assert run(capsys, ["eval", "judge", "--data", w["answers"], "--judge", "reference", "--output", w["scores"]])[0] == 0
    w["delta"] = d / "delta"
    assert run(capsys, ["make-delta", "--base", w["model"], "--model", w["model2"], "--output", w["delta"]])[0] == 0
    w["adapter"] = d / "adapter"
    w["adapter"].mkdir()
    (w["adapter"] / "adapter_config.json").write_text("{}")
    w["spm"] = TINY_TOKENIZER / "tokenizer.model"
    return w


# name -> (argv for output OUT, directory output?, the input whose folder a "contains an input"
#          output points at, whether a full run is cheap enough to do twice here)
WRITERS = {
    "quantize": (lambda w, o: ["quantize", "--model", w["model"], "--output", o, "--method", "rtn",
                               "--group-size", "32"], True, "model", True),
    "make-delta": (lambda w, o: ["make-delta", "--base", w["model"], "--model", w["model2"], "--output", o],
                   True, "model", True),
    "apply-delta": (lambda w, o: ["apply-delta", "--base", w["model"], "--delta", w["delta"], "--output", o],
                    True, "delta", True),
    "merge-lora": (lambda w, o: ["merge-lora", "--base", w["model"], "--adapter", w["adapter"], "--output", o],
                   True, "adapter", False),
    "train": (lambda w, o: ["train", "--model", w["model"], "--data", w["sft"], "--output", o, "--max-steps", "1"],
              True, "sft", False),
    "prune": (lambda w, o: ["prune", "--model", w["model"], "--output", o, "--method", "magnitude",
                            "--sparsity", "0.5"], True, "model", True),
    "eval report": (lambda w, o: ["eval", "report", w["scores"], "--output", o], True, "scores", True),
    "tokenizer extend": (lambda w, o: ["tokenizer", "extend", "--base", w["spm"], "--add", w["spm"], "--output", o],
                         True, None, True),
    "data": (lambda w, o: ["data", w["sft"], "--output", o], False, "sft", True),
    "ppl": (lambda w, o: ["ppl", "--model", w["model"], "--data", w["text"], "--max-len", "16", "--stride", "16",
                          "--output", o], False, "text", True),
    "eval judge": (lambda w, o: ["eval", "judge", "--data", w["answers"], "--judge", "reference", "--output", o],
                   False, "answers", True),
    "eval generate": (lambda w, o: ["eval", "generate", "--model", w["model"], "--data", w["evalset"], "--output", o,
                                    "--max-new-tokens", "2", "--device", "cpu"], False, "evalset", True),
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_writing_command_never_destroys_what_it_did_not_write(command, world, tmp_path, capsys, monkeypatch):
    argv, is_dir, contained, cheap = WRITERS[command]
    w = world
    monkeypatch.chdir(tmp_path)
    if is_dir:
        keep = precious(tmp_path / "keep")
        for extra in ([], ["--overwrite"]):             # someone's folder: refused, with or without --overwrite
            rc, err = run(capsys, argv(w, keep) + extra)
            assert rc != 0 and ("--overwrite" in one_error(err) if not extra else "not written by toucan" in one_error(err))
            assert sorted(os.listdir(keep)) == ["important.txt"]
        if contained:                                   # a previous output of toucan that holds an input
            holder = Path(w[contained]).parent
            (holder / "toucan.json").write_text("{}")
            before = sorted(os.listdir(holder))
            rc, err = run(capsys, argv(w, holder) + ["--overwrite"])
            assert rc != 0 and "input" in one_error(err) and sorted(os.listdir(holder)) == before
            (holder / "toucan.json").unlink()
        (keep / "toucan.json").write_text("{}")         # even a marked working directory is never replaced
        monkeypatch.chdir(keep)
        rc, err = run(capsys, argv(w, ".") + ["--overwrite"])
        assert rc != 0 and "working directory" in one_error(err) and (keep / "important.txt").exists()
        monkeypatch.chdir(tmp_path)
    else:
        keep = tmp_path / "keep.txt"
        keep.write_text("keep me")
        rc, err = run(capsys, argv(w, keep))
        assert rc != 0 and "--overwrite" in one_error(err) and keep.read_text() == "keep me"
        src = Path(w[contained])
        before = src.read_bytes()
        rc, err = run(capsys, argv(w, src) + ["--overwrite"])  # its own input, even with --overwrite
        assert rc != 0 and "input" in one_error(err) and src.read_bytes() == before
        adir = precious(tmp_path / "adir")
        rc, err = run(capsys, argv(w, adir) + ["--overwrite"])  # a directory where a file goes
        assert rc != 0 and "directory" in one_error(err) and (adir / "important.txt").exists()
    if not cheap:
        return
    out = tmp_path / ("new" if is_dir else "new.jsonl")
    assert run(capsys, argv(w, out))[0] == 0
    first = sorted(os.listdir(out)) if is_dir else out.read_bytes()
    rc, err = run(capsys, argv(w, out))
    if command == "eval generate":                      # answers are resumed by design
        assert rc == 0 and "already answered" in capsys.readouterr().out + err or rc == 0
    elif command == "eval judge":                       # a rerun retries failed items and rewrites its scores
        assert rc == 0
    else:
        assert rc != 0 and "--overwrite" in one_error(err)
    assert run(capsys, argv(w, out) + ["--overwrite"])[0] == 0
    assert (sorted(os.listdir(out)) if is_dir else bool(out.read_bytes())) == (first if is_dir else True)


def test_make_delta_onto_its_base_and_report_onto_its_scores_folder(world, tmp_path, capsys):
    """Two of the issue's reproducers, exactly: both used to replace their input, exit 0."""
    w = world
    files = sorted(os.listdir(w["model"]))
    rc, err = run(capsys, ["make-delta", "--base", w["model"], "--model", w["model2"], "--output", w["model"], "--overwrite"])
    assert rc != 0 and "is an input" in one_error(err) and sorted(os.listdir(w["model"])) == files
    folder = w["scores"].parent
    (folder / "judge_cache.jsonl").write_text('{"paid": true}\n')
    files = sorted(os.listdir(folder))
    rc, err = run(capsys, ["eval", "report", w["scores"], "--output", folder, "--overwrite"])
    assert rc != 0 and "contains an input" in one_error(err) and sorted(os.listdir(folder)) == files


def test_eval_generate_never_touches_a_file_that_is_not_answers(world, tmp_path, capsys):
    w = world
    other = tmp_path / "notes.jsonl"
    other.write_text('{"a": 1}\n{"torn')              # used to be "repaired" (its last line cut) first
    rc, err = run(capsys, WRITERS["eval generate"][0](w, other))
    assert rc != 0 and "--overwrite" in one_error(err) and other.read_text() == '{"a": 1}\n{"torn'


def test_demo_refuses_a_folder_that_is_not_a_demo_run(tmp_path, capsys):
    keep = precious(tmp_path / "keep")
    rc, err = run(capsys, ["demo", "--output", keep, "--max-steps", "1"])
    assert rc != 0 and "not a demo run folder" in one_error(err) and sorted(os.listdir(keep)) == ["important.txt"]


# ---------------------------------------------------------------------------------------------
# item 11: stale temporaries

KILLED_WRITER = """
import sys, time
from toucan.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as d:
    (d / "model.safetensors").write_bytes(b"x" * 100000)
    print("writing", flush=True)
    time.sleep(600)
"""


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_a_killed_runs_temporary(world, tmp_path, capsys, caplog):
    out = tmp_path / "report"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".report.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").stat().st_size == 100000
    assert str(proc.pid) in stale[0].name
    live = tmp_path / f".report.tmp-{os.getpid()}-{_host_tag()}-live"   # a run still going: kept
    live.mkdir()
    elsewhere = tmp_path / f".report.tmp-{dead_pid()}-00000000-x"      # another host's: kept
    elsewhere.mkdir()
    other = tmp_path / f".reports.tmp-{dead_pid()}-{_host_tag()}-x"    # another output's: kept
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="toucan"):
        assert run(capsys, ["eval", "report", world["scores"], "--output", out])[0] == 0
    assert not stale[0].exists() and live.exists() and elsewhere.exists() and other.exists()
    assert any("removed" in r.getMessage() and stale[0].name in r.getMessage() and "interrupted" in r.getMessage()
               for r in caplog.records)
    assert (out / "report.json").is_file()


def test_stale_file_temporary_and_old_folder_are_removed(tmp_path, capsys, world):
    target = tmp_path / "clean.jsonl"
    pid = dead_pid()
    torn = tmp_path / f".clean.jsonl.{pid}-{_host_tag()}-abc123.tmp"
    torn.write_text("half a fil")
    old = tmp_path / f".clean.jsonl.old-{pid}-{_host_tag()}"
    old.mkdir()
    assert run(capsys, ["data", world["sft"], "--output", target])[0] == 0
    assert target.is_file() and not torn.exists() and not old.exists()
    assert remove_stale_temps(target) == []
    # what a quantize of a LoRA adapter leaves when killed: the merged copy, named after its output
    merged = tmp_path / temp_prefix(tmp_path / "q4").replace(str(os.getpid()), str(pid), 1)
    merged = merged.with_name(merged.name + "merged-x1")
    merged.mkdir()
    assert remove_stale_temps(tmp_path / "q4") == [merged] and not merged.exists()


def test_chat_save_replaces_only_a_saved_chat(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import io

    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    (tmp_path / "adir").mkdir()
    script = "/save chat.json\n/save chat.json\n/save notes.json\n/save adir\n/exit\n"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(script.encode())))
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("[saved 0 turn(s) to chat.json]") == 2       # its own save: replaced
    assert "[cannot save to notes.json: " in out and notes.read_text() == '{"mine": true}'
    assert "[cannot save to adir: " in out
