"""`toucan train` with 2 CPU processes under torchrun (gloo): DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP2.

Each test launches this file as a torchrun script (see `worker` below): it trains a tiny model a
few steps, records what really ran (the wrapper type, ZeRO stage, sharding) and the weights as they
are in memory at the end (gathered from the shards). The test process, which never trained, then
reloads the saved directory with from_pretrained and compares it with those weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

HERE = Path(__file__).resolve()


def worker(mode: str, model_dir: str, data: str, out: str, info_path: str) -> None:
    import torch
    from safetensors.torch import save_file

    from toucan.cli import setup_logging
    from toucan.config import TrainConfig
    from toucan.train import rank, train

    setup_logging()
    cfg = TrainConfig(model=model_dir, data=[data], output=out, max_steps=3,
                      learning_rate=1e-3, logging_steps=1, save_steps=1000, max_len=64,
                      per_device_train_batch_size=2, warmup_ratio=0.0, lr_scheduler_type="constant",
                      deepspeed={"zero2": "zero2", "zero3": "zero3"}.get(mode), fsdp=mode == "fsdp")
    info: dict = {}
    if mode == "zero3":
        info.update(zero3_resize_check(cfg))
    res = train(cfg)
    info["wrapper"] = type(res.model).__name__
    info["losses"] = res.losses
    if mode in ("zero2", "zero3"):
        info["zero_stage"] = res.model.zero_optimization_stage()
        module = res.trainer.model
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    elif mode == "fsdp":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        params = dict(res.model.named_parameters())
        info["is_fsdp_module"] = isinstance(res.model, FSDPModule)
        w = params["model.layers.0.mlp.down_proj.weight"]
        info["dtensor"] = isinstance(w, DTensor)
        info["local_rows"], info["full_rows"] = w.to_local().shape[0], w.shape[0]
        weights = {n: p.full_tensor().detach().clone() for n, p in params.items()}
    else:
        module = res.trainer.model
        weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    if rank() == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(info_path).with_suffix(".safetensors")))
        Path(info_path).write_text(json.dumps(info))
    torch.distributed.barrier()


def zero3_resize_check(cfg) -> dict:
    """Under ZeRO-3 the parameters are partitioned at load (a naive resize sees 0 rows); check that
    resize_embeddings still grows both matrices with exact-mean rows."""
    import deepspeed
    import torch

    from toucan.modeling import load_tokenizer
    from toucan.train import _load_model, resize_embeddings, training_arguments

    args = training_arguments(cfg)   # holds the ZeRO-3 config (a weakref), so from_pretrained loads partitioned
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert is_deepspeed_zero3_enabled(), args.deepspeed
    model = _load_model(cfg)
    emb = model.get_input_embeddings().weight
    out = {"partitioned_numel": emb.numel(), "old_rows": model.config.vocab_size}
    n = len(load_tokenizer(cfg.model))
    out["added"] = resize_embeddings(model, n)
    params = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        old = out["old_rows"]
        out["rows"] = [p.shape[0] for p in params]
        out["mean_ok"] = all(torch.allclose(p[old:], p[:old].mean(0).expand(n - old, -1), atol=1e-6) for p in params)
    return out


def run_torchrun(mode: str, model_dir: Path, data: Path, out: Path, info: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(HERE), mode, str(model_dir), str(data), str(out), str(info)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)


@pytest.fixture(scope="module")
def dist_model_dir(tmp_path_factory, tiny_tok):
    """8 embedding rows fewer than its tokenizer: exercises the resize under each mode."""
    from test_train import small_vocab_model

    return small_vocab_model(tmp_path_factory.mktemp("models") / "dist", tiny_tok, 8, seed=3)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_process_training_saves_reloadable_model(mode, tmp_path, dist_model_dir, tiny_tok):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from test_train import write_data
    from toucan.manifest import read_manifest, verify_manifest

    data = write_data(tmp_path / "d.json", n=24)
    out, info_path = tmp_path / "out", tmp_path / "info.json"
    r = run_torchrun(mode, dist_model_dir, data, out, info_path)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])
    info = json.loads(info_path.read_text())
    expected_wrapper = {"ddp": "DistributedDataParallel", "zero2": "DeepSpeedEngine", "zero3": "DeepSpeedEngine"}
    if mode == "fsdp":
        assert info["is_fsdp_module"] and info["dtensor"] and info["wrapper"].startswith("FSDP")
        assert info["local_rows"] * 2 == info["full_rows"]      # each rank holds half: really sharded
    else:
        assert info["wrapper"] == expected_wrapper[mode]
    if mode.startswith("zero"):
        assert info["zero_stage"] == int(mode[-1])
    if mode == "zero3":
        assert info["partitioned_numel"] == 0 and info["added"] == 8
        assert info["rows"] == [len(tiny_tok)] * 2 and info["mean_ok"]
    assert len(info["losses"]) == 3

    m = read_manifest(out)
    assert m["train"]["world_size"] == 2 and m["train"]["embedding_rows_added"] == 8
    assert verify_manifest(out) == []
    # fresh process: reload the saved directory and compare with the gathered in-memory weights
    model = AutoModelForCausalLM.from_pretrained(out)
    inmem = load_file(str(info_path.with_suffix(".safetensors")))
    saved = dict(model.named_parameters())
    assert model.config.vocab_size == len(tiny_tok)
    assert set(saved) == set(inmem)
    for name, w in inmem.items():
        assert w.numel() > 0 and torch.allclose(saved[name], w, atol=1e-6), name
    base = AutoModelForCausalLM.from_pretrained(dist_model_dir)
    assert not torch.allclose(saved["model.layers.0.mlp.down_proj.weight"], base.model.layers[0].mlp.down_proj.weight)


if __name__ == "__main__":
    worker(*sys.argv[1:6])
