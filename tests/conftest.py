"""Shared fixtures: the repo's tiny tokenizer, tiny LLaMA models, and ../shared (skipped when
absent, a failure when TOUCAN_REQUIRE_SHARED=1, as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(os.environ.get("TOUCAN_SHARED", ROOT.parent / "shared"))
TINY_TOKENIZER = FIXTURES / "tiny_tokenizer"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers and torchrun in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_path(rel: str) -> Path:
    """A file under ../shared; skip the test if missing, fail if TOUCAN_REQUIRE_SHARED=1."""
    p = SHARED / rel
    if not p.exists():
        if os.environ.get("TOUCAN_REQUIRE_SHARED") == "1":
            pytest.fail(f"{p} is missing and TOUCAN_REQUIRE_SHARED=1")
        pytest.skip(f"{p} not present (../shared absent)")
    return p


@pytest.fixture(scope="session")
def tiny_tok():
    from toucan.modeling import load_tokenizer

    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="session")
def llama_tok():
    from toucan.modeling import load_tokenizer

    return load_tokenizer(shared_path("tokenizers/llama_tokenizer.model"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tok):
    """A randomly initialised tiny LLaMA (fp32) saved as a Hugging Face directory with tokenizer."""
    from toucan.modeling import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", tiny_tok, command="test-fixture")


@pytest.fixture(autouse=True)
def _gptqmodel_worker_deaths_are_visible(request):
    """gptqmodel's device workers end the interpreter (os._exit(1), gptqmodel/utils/threadx.py)
    when a task raises, after printing the traceback to stderr, which pytest's fd capture then
    loses with the process: a run once stopped with 'Error 1', no failure and no summary (CI in a
    fresh clone, 2026-12-04, near the gptq tests of test_gguf; the rerun passed). Once gptqmodel is
    loaded, its abort first writes the traceback past the capture, so the next such death names its
    cause. The process still dies as it would outside the tests."""
    import sys

    threadx = sys.modules.get("gptqmodel.utils.threadx")
    worker = getattr(threadx, "_DeviceWorker", None)
    if worker is not None and not getattr(worker._abort_process, "toucan_visible", False):
        import traceback

        capman, abort = request.config.pluginmanager.getplugin("capturemanager"), worker._abort_process

        def visible(self, exc):
            with capman.global_and_fixture_disabled():
                print(f"\ngptqmodel worker {self.name} failed; it ends the process (os._exit(1)):", file=sys.stderr)
                traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
                sys.stderr.flush()
            abort(self, exc)

        visible.toucan_visible = True
        worker._abort_process = visible
    yield
