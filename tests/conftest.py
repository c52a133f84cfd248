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
