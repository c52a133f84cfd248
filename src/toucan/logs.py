"""Logging for every toucan process: the CLI sets it up from -v/-q, and a process toucan starts
itself (the serving engine's, toucan.serve.engine_process) repeats the same call with the same
arguments (`current()`), so its lines look and filter the same."""

from __future__ import annotations

import logging
import os

_current = (0, False)  # the (verbose, quiet) of the last setup_logging call in this process


def current() -> tuple[int, bool]:
    return _current


# Third-party loggers that talk on every run about things a user cannot act on: torchao's
# "Failed to load ... _C_mxfp8 ... .so" (a wheel built for another Python) and "Detected no
# triton", torch's _pytree deprecations (torchao registering enums), DeepSpeed's "Setting
# accelerator to CPU", and the INFO of httpx/openai (one line per judge HTTP request). At the
# default level they only show errors; -v shows them all.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed", "httpx", "httpcore", "openai", "tokenicer")


def _only_errors(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """The default level shows toucan's own progress and results, plus other libraries' warnings
    except the known noise above; -v shows every library's INFO, -vv DEBUG; -q warnings only."""
    import warnings

    global _current
    _current = (verbose, quiet)

    # Distributed runs log on rank 0 only; other ranks keep warnings and errors.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    level = logging.WARNING if quiet or rank != 0 else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("toucan").setLevel(level)
    everything = verbose > 0 and not quiet
    # other libraries' INFO (tokenizer fix-ups, HTTP requests, ...) only with -v
    logging.getLogger().setLevel(level if everything else logging.WARNING)
    for name in NOISY_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(logging.NOTSET if everything else logging.ERROR)
        # and a filter, because some (DeepSpeed's) set their own level again when imported
        lg.removeFilter(_only_errors)
        if not everything:
            lg.addFilter(_only_errors)
    # GPTQModel logs through LogBar (the "logbar" logger), which sets its own level back to INFO
    # when gptqmodel is imported (by us or by transformers' GPTQ loader), so a level set here would
    # be undone; the stdlib's `disabled` switch it leaves alone. Its banner, ENV lines and per-layer
    # tables are GPTQModel's, not ours; toucan reports what was quantized itself.
    logging.getLogger("logbar").disabled = not everything
    if not everything:
        # Python warnings (FutureWarning, DeprecationWarning, ...) raised by other packages
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"toucan(\.|$)")
