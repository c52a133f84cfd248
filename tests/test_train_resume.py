"""Resume: a run killed during its second checkpoint save, resumed with `auto`, ends with the same
weights as an uninterrupted run; the half-saved checkpoint is never taken for a complete one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


def resume_cfg(model_dir, data, out, **kw):
    from toucan.config import TrainConfig

    base = dict(model=str(model_dir), data=[str(data)], output=str(out), max_steps=6,
                save_steps=2, learning_rate=2e-3, logging_steps=1, max_len=64, per_device_train_batch_size=3,
                warmup_ratio=0.2, lr_scheduler_type="cosine", save_total_limit=None)
    base.update(kw)
    return TrainConfig(**base)


def killed_worker(model_dir: str, data: str, out: str) -> None:
    """Train, and SIGKILL ourselves inside the second checkpoint save: after the Trainer wrote
    checkpoint-4's files, before the completion marker (user callbacks run before it)."""
    from transformers import TrainerCallback

    from toucan.commands.train import train

    class KillDuringSave(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    train(resume_cfg(model_dir, data, out), callbacks=[KillDuringSave()])


def test_latest_checkpoint_needs_marker_and_files(tmp_path):
    from toucan.fsutil import atomic_write_json
    from toucan.training import CHECKPOINT_MARKER, checkpoint_complete, latest_checkpoint

    for step in (2, 4, 6):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 10)
        if step != 6:   # checkpoint-6: files written, no marker (killed mid-save)
            atomic_write_json(d / CHECKPOINT_MARKER, {"files": {"model.safetensors": 10}})
    (tmp_path / "checkpoint-4" / "model.safetensors").unlink()   # checkpoint-4: rotation killed midway
    assert not checkpoint_complete(tmp_path / "checkpoint-6") and not checkpoint_complete(tmp_path / "checkpoint-4")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x" * 9)   # truncated file
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.slow
@pytest.mark.integration
def test_killed_mid_save_then_auto_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    from test_train import write_data
    from toucan.commands.train import train
    from toucan.training import CHECKPOINT_MARKER, checkpoint_dir

    data = write_data(tmp_path / "d.json", n=24)
    ref = train(resume_cfg(tiny_model_dir, data, tmp_path / "ref"))
    assert ref.global_step == 6

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(HERE), str(tiny_model_dir), str(data), str(out)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpts = checkpoint_dir(out)
    # the killed save left checkpoint-4 with the Trainer's files but without our marker
    assert (ckpts / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (ckpts / "checkpoint-4" / CHECKPOINT_MARKER).exists()
    assert (ckpts / "checkpoint-2" / CHECKPOINT_MARKER).is_file()
    assert not out.exists()   # no final model from a killed run

    from transformers import TrainerCallback

    steps_run = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            steps_run.append(state.global_step)

    res = train(resume_cfg(tiny_model_dir, data, out, resume_from_checkpoint="auto"), callbacks=[Record()])
    assert res.global_step == 6
    assert steps_run == [3, 4, 5, 6]   # resumed from checkpoint-2: not from the half-saved 4, not from 0
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3   # training moved the weights


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    from toucan.errors import ConfigError
    from toucan.training import resolve_resume

    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path / "o")
    assert resolve_resume("auto", tmp_path / "o") is None


if __name__ == "__main__":
    killed_worker(*sys.argv[1:4])
