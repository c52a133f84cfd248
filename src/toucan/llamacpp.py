"""llama.cpp (llama-cpp-python) pieces for the engine's GGUF backend (toucan.engine.LlamaCppEngine):
opening a .gguf with one-line errors, each token's bytes, and a sampler chain that does what
transformers' `generate` does with the same options.

Why a chain of our own instead of `Llama.generate`: its chain runs top-k, top-p and min-p (0.05 by
default) *before* the temperature, so top_p would cut a different set of tokens than transformers
(temperature first, then top-k, then top-p), and its repetition penalty looks back only 64 tokens
while transformers' covers the whole prompt and reply. llama.cpp's own samplers (penalties, temp,
top_k, top_p, dist, greedy) are used; only their order and window are chosen here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ConfigError, ModelError
from .gguf_export import check_gguf
from .sampling import is_sampling

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'toucan[edge]' (the edge extra; `make install` installs it)"


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


_native = logging.getLogger("toucan.llamacpp.native")
_errors: list[str] = []  # llama.cpp's error lines since the last load, for our one-line message
_callback: list = []  # the ctypes callback must stay referenced as long as llama.cpp may call it


def import_llama_cpp(path=None):
    try:
        import llama_cpp
    except ImportError:
        where = f"{path}: " if path is not None else ""
        raise ModelError(f"{where}running a .gguf model needs llama-cpp-python: {INSTALL_HINT}") from None
    if not _callback:
        _route_log(llama_cpp)
    return llama_cpp


def _route_log(llama_cpp) -> None:
    """llama.cpp's log into Python logging, at debug level (-vv shows it). Written by hand because
    llama-cpp-python 0.3.36 reads ggml's log levels with an outdated table (ggml.h has DEBUG=1,
    INFO=2, WARN=3, ERROR=4; it treats 3 as an error and 4 as debug), so with verbose=False it
    prints warnings such as "n_ctx_seq (256) > n_ctx_train (128)" and hides the errors."""
    import ctypes

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        line = text.decode("utf-8", "replace").rstrip()
        if level == 4 and line:
            _errors.append(line)
        _native.debug("%s", line)

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    _callback.append(on_log)


def physical_cores() -> int:
    """Physical cores (llama.cpp's own advice: SMT siblings only add contention)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _dummy_prefix(path: Path) -> bool:
    """Whether this SentencePiece vocabulary puts a "▁" before the text (add_dummy_prefix)."""
    import gguf

    f = gguf.GGUFReader(path).fields
    model, flag = f.get("tokenizer.ggml.model"), f.get("tokenizer.ggml.add_space_prefix")
    return str(model.contents()) == "llama" and (flag is None or bool(flag.contents()))


def load(path, n_ctx: int = 0, threads: int = 0):
    """(llama_cpp.Llama for `path`, whether prompts get a leading space): n_ctx 0 = the file's
    context length, threads 0 = physical cores.

    SentencePiece adds its dummy-prefix "▁" once, before the whole text. llama.cpp adds it before
    every stretch of text that follows a user-defined token too (its `add_space_prefix` applies
    after each special token), so a vocabulary with user-defined pieces (the demo's template
    pieces) would be cut differently from training. So the flag is switched off at load and the
    engine writes the one leading space itself: llama.cpp's tokenizer then gives SentencePiece's
    ids (tests/test_llamacpp.py)."""
    llama_cpp = import_llama_cpp(path)
    path = Path(path)
    check_gguf(path)  # one line naming what is wrong; llama.cpp itself aborts or says "failed to load"
    prefix = _dummy_prefix(path)
    _errors.clear()
    threads = threads or physical_cores()
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                              n_gpu_layers=0, logits_all=False, verbose=False,
                              kv_overrides={"tokenizer.ggml.add_space_prefix": False} if prefix else None)
    except (ValueError, RuntimeError) as e:  # "Failed to load model from file": the reason is in llama.cpp's log
        why = _errors[-1] if _errors else str(e)
        raise ModelError(f"{path}: llama.cpp cannot load this GGUF file ({why})") from None
    log.info("llama.cpp: %s, context %d, %d thread(s)", path.name, llm.n_ctx(), threads)
    return llm, prefix


def token_bytes_table(llm) -> list[bytes]:
    """Each token id's bytes as it appears in text: control and unknown tokens are empty, byte
    tokens are their byte, SentencePiece's '▁' is a space. llama.cpp's llama_token_to_piece does
    this for normal and byte tokens; user-defined pieces it returns raw, so their '▁' is mapped here
    (the demo tokenizer's template pieces are user-defined)."""
    import ctypes

    llama_cpp = import_llama_cpp()
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(256)
    table = []
    for t in range(llm.n_vocab()):
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
        if n < 0:  # longer than the buffer: -n is the length needed
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
        piece = buf.raw[:n]
        if llama_cpp.llama_vocab_get_attr(vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED:
            piece = piece.replace("\u2581".encode(), b" ")
        table.append(piece)
    return table


def check_options(opts) -> None:
    """What this backend cannot do is refused, not silently ignored."""
    if opts.num_beams > 1:
        raise ConfigError(f"num_beams {opts.num_beams}: the llama.cpp backend (a .gguf model) has no beam search; "
                          "use num_beams 1, or the model directory")


def sampler(llm, opts):
    """The chain for one request, in transformers' order: repetition penalty over the whole
    context, then greedy, or temperature -> top-k -> top-p -> a seeded draw."""
    import llama_cpp
    from llama_cpp._internals import LlamaSampler

    s = LlamaSampler()
    if opts.repetition_penalty != 1.0:
        # penalty_last_n = the whole context, as transformers penalises every token in input_ids
        s.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=llm.n_ctx(), penalty_repeat=opts.repetition_penalty,
                        penalty_freq=0.0, penalty_present=0.0)
    if is_sampling(opts):  # the one greedy rule (beams were refused above)
        s.add_temp(opts.temperature)
        if opts.top_k > 0:
            s.add_top_k(opts.top_k)
        if opts.top_p < 1.0:
            s.add_top_p(opts.top_p, 1)
        s.add_dist(llama_cpp.LLAMA_DEFAULT_SEED if opts.seed is None else opts.seed)
    else:
        s.add_greedy()
    return s
