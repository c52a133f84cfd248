"""Third-party internals toucan relies on (no public API does these jobs). When a pin moves and
one disappears, these fail with the reason it is used, instead of the feature quietly breaking
(GPTQModel's logs back in ./logs, DeepSpeed's 2-6 minute op compile on every CPU run, or
--max-shard-size parsing failing at run time)."""

from __future__ import annotations

import importlib.metadata


def _pinned(package: str) -> str:
    return importlib.metadata.version(package)


def test_gptqmodel_project_log_dir():
    from gptqmodel.looper import loop_processor

    assert hasattr(loop_processor, "_PROJECT_LOG_DIR"), (
        f"gptqmodel {_pinned('gptqmodel')}: gptqmodel.looper.loop_processor._PROJECT_LOG_DIR is gone; "
        "quant/gptq.py's _gptqmodel_logs_elsewhere redirects GPTQModel's per-layer log files "
        "through it (else they land in ./logs of the user's directory): find the new setting")


def test_deepspeed_compatible_ops_table():
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    assert isinstance(table, dict) and "deepspeed_shm_comm" in table, (
        f"deepspeed {_pinned('deepspeed')}: deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] is gone; "
        "train._skip_deepspeed_shm_op marks the shared-memory op unavailable through it so a CPU "
        "run does not JIT-compile it for minutes: find the new switch")


def test_huggingface_hub_parse_size_to_int():
    from huggingface_hub.serialization import _base

    assert callable(getattr(_base, "parse_size_to_int", None)), (
        f"huggingface_hub {_pinned('huggingface_hub')}: serialization._base.parse_size_to_int is gone; "
        "delta.parse_size reads --max-shard-size ('2GB') with it, the same parser "
        "save_pretrained uses: find its new home")
    assert _base.parse_size_to_int("2GB") == 2 * 10**9
