"""The engine in a process of its own, for `toucan serve` (as vLLM V1 splits its API server from
its engine core).

Why: in one process the scheduler's thread and the server's event loop share one GIL. Measured
on the 2-core bench box (bench/serve.py, 32 streaming clients): the scheduler ran 83-86 % of the
wall and the loop 13-16 % (psutil per-thread CPU), so with a core idle the scheduler waited for the
GIL while the loop wrote ~1000 SSE events/s, and the server reached 0.76x the engine's offline
throughput where the same scheduler in-process with no HTTP reached 1.01x.

Split: this process keeps the prompt side (tokenizer, template, context: the Engine methods that
build and count prompts) and the child runs Engine.from_dir on the model with its continuous
batch. Requests go down a multiprocessing pipe as (rid, ids, SamplingParams); the child runs the
scheduler unchanged (its stop-string, UTF-8 and cancel rules included) and sends each step's text
deltas and finished Completions back as one message, so the pipe carries one message per decode
step, not one per token. A request's Cancel is forwarded when set.

The child is started with `spawn` (a forked child would inherit torch's and the server's
threads in whatever state they were); it ignores SIGINT (the server's Ctrl-C ends it through the
pipe closing) and exits when the pipe closes, also when this process is killed."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from typing import Callable, Sequence

from .. import logs
from ..engine import Cancel, Completion, Engine, gather
from ..errors import ModelError, ToucanError
from ..modeling import load_tokenizer
from ..prompts import DEFAULT_TEMPLATE
from ..sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineProcess(Engine):
    """An Engine whose generation runs in a child process (continuous batching only). submit()
    and run() behave as Engine's; on_text/on_done are called from this object's receiver thread."""

    def __init__(self, path, max_rows: int = 32, **from_dir):
        """path and from_dir: as Engine.from_dir's (a transformers model or adapter directory)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_core_main, args=(child, str(path), from_dir, max_rows, logs.current()),
                                 name="toucan-engine", daemon=True)
        self._proc.start()
        child.close()  # ours closed: the pipe reads EOF here when the child exits
        try:
            tokenizer = load_tokenizer(path, trust_remote_code=from_dir.get("trust_remote_code", False),
                                       base=from_dir.get("base"))  # while the child loads the model
            try:
                msg = self._conn.recv()
            except EOFError:
                self._proc.join(5)
                raise RuntimeError(f"the engine process exited while loading {path} (exit code "
                                   f"{self._proc.exitcode}); its log is above") from None
            if msg[0] == "error":
                _, user, text = msg
                raise (ModelError if user else RuntimeError)(text)
        except BaseException:
            self.close()
            raise
        super().__init__(None, tokenizer, from_dir.get("template", DEFAULT_TEMPLATE), max_context=msg[1],
                         continuous=True, max_rows=max_rows)
        self._send_lock = threading.Lock()  # submit (the batcher's thread) and cancels (the loop) both send
        self._ids = itertools.count()
        self._pending: dict[int, tuple[Callable | None, Callable]] = {}  # rid -> (on_text, on_done)
        self._stats: dict = {}
        self._queued = 0
        self._dead = False
        threading.Thread(target=self._receive, name="toucan-engine-outputs", daemon=True).start()

    def batch_stats(self) -> dict:
        return dict(self._stats)

    def queued(self) -> int:
        return self._queued

    def _send(self, msg) -> bool:
        try:
            with self._send_lock:
                self._conn.send(msg)
            return True
        except (OSError, ValueError):  # the child is gone (closed pipe); _receive fails what was in flight
            return False

    def submit(self, ids: list[int], opts: SamplingParams, on_done: Callable[[object], None],
               on_text: Callable[[str], None] | None = None, cancel: Cancel | None = None) -> None:
        assert max(1, opts.num_beams) == 1, "beam search is not continuous"
        assert cancel is None or isinstance(cancel, Cancel), "a cancel flag that crosses processes is a Cancel"
        rid = next(self._ids)
        self._pending[rid] = (on_text, on_done)
        if self._dead or not self._send(("add", rid, ids, opts)):
            self._pending.pop(rid, None)
            on_done(RuntimeError("the engine process has exited"))
            return
        if cancel is not None:
            cancel.on_set(lambda: rid in self._pending and self._send(("cancel", rid)))

    def run(self, ids: list[list[int]], opts: SamplingParams, on_text: list | None = None,
            cancel: list | None = None, max_new_tokens: list[int] | None = None,
            stop: list[Sequence[str]] | None = None) -> list[Completion]:
        """Engine.run over submit(): every row joins the child's batch, and this waits for all."""
        def start(dones):
            for i, (x, d) in enumerate(zip(ids, dones)):
                o = dataclasses.replace(opts, max_new_tokens=max_new_tokens[i] if max_new_tokens else opts.max_new_tokens,
                                        stop=list(stop[i]) if stop else opts.stop)
                self.submit(x, o, d, on_text[i] if on_text else None, cancel[i] if cancel else None)

        return gather(len(ids), start)

    def _receive(self) -> None:
        while True:
            try:
                outputs, self._stats, self._queued = self._conn.recv()
            except (EOFError, OSError):
                break
            for kind, rid, x in outputs:
                if kind == "t":
                    on_text = self._pending[rid][0]
                    if on_text is not None:
                        on_text(x)
                else:
                    self._pending.pop(rid)[1](x)
        self._dead = True
        if self._pending:
            log.error("the engine process exited (exit code %s) with %d request(s) in flight",
                      self._proc.exitcode, len(self._pending))
        for rid in list(self._pending):
            self._pending.pop(rid)[1](RuntimeError("the engine process has exited"))

    def close(self) -> None:
        """End the child: it exits when its pipe closes (terminated after 5 s if a step hangs)."""
        self._conn.close()
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)


def _core_main(conn, path: str, from_dir: dict, max_rows: int, log_state: tuple[int, bool]) -> None:
    """The child: load the model, then run requests from the pipe on the engine's continuous batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.setup_logging(*log_state)
    try:
        engine = Engine.from_dir(path, **from_dir)
    except Exception as e:  # the parent raises it (a user's mistake as a one-line ModelError)
        _send_or_exit(conn, ("error", isinstance(e, ToucanError), str(e) if isinstance(e, ToucanError)
                             else f"loading the model failed: {type(e).__name__}: {e}"))
        return
    engine.max_rows = max_rows
    # Everything loaded so far lives as long as the process; frozen, the collector stops walking it.
    # A full collection over torch's and transformers' objects took 230 ms on the bench box, and in
    # a server it comes every few seconds: a 230 ms stall of every stream (vLLM freezes too).
    gc.collect()
    gc.freeze()
    outbox: list[tuple] = []  # this step's outputs, only touched by the scheduler's thread
    cancels: dict[int, Cancel] = {}

    def on_done(rid):
        def f(r):
            cancels.pop(rid, None)
            if isinstance(r, BaseException):  # a bug in the step: sent as text (any exception pickles so)
                r = RuntimeError(f"{type(r).__name__}: {r}")
            outbox.append(("d", rid, r))
        return f

    def flush():
        if outbox:
            msg = (list(outbox), engine.batch_stats(), engine.queued())
            outbox.clear()
            _send_or_exit(conn, msg)

    engine.on_step = flush
    _send_or_exit(conn, ("ready", engine.max_context))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "add":
            _, rid, ids, opts = msg
            cancels[rid] = c = Cancel()
            engine.submit(ids, opts, on_done=on_done(rid), on_text=lambda t, rid=rid: outbox.append(("t", rid, t)),
                          cancel=c)
        elif msg[0] == "cancel" and (c := cancels.get(msg[1])) is not None:
            c.set()
    # exit without waiting for the scheduler's daemon thread (it may be inside torch)
    os._exit(0)


def _send_or_exit(conn, msg) -> None:
    try:
        conn.send(msg)
    except OSError:  # the server is gone (it failed on its side, or was killed): so are we, quietly
        os._exit(0)
