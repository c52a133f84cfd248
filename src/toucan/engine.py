"""The one generation engine: chat, web, serve and eval all generate through `Engine`.

    eng = Engine.from_dir("runs/demo/sft")                      # full precision or 4-bit GPTQ
    eng.generate(prompt, SamplingParams(...))    -> Completion(text, prompt_tokens, completion_tokens, finish_reason)
    eng.generate_batch([p1, p2], opts)           -> [Completion, ...]   (left-padded batch)
    for delta in eng.stream(prompt, opts): ...   -> text deltas; .completion afterwards, .cancel() to stop
    prompt, kept = eng.chat_prompt(history, question, max_new_tokens)  # oldest turns dropped to fit

Tokenisation follows toucan.data: input_ids = [BOS] + tokens(prompt). Prompts come only from
toucan.prompts. Decoding is transformers' `generate` (its logits processors do temperature, top-p,
top-k, repetition penalty; beam search is its own). What it lacks, and we add by hand in `_Rows`:
  * per-row text tracking in a batch, so each row stops at its own stop strings / max tokens and
    the stop string itself is never returned, and
  * streaming deltas that never end inside a UTF-8 character split across byte-fallback tokens
    (no U+FFFD mid-stream) and hold back text that may be the start of a stop string. Re-decoding
    the whole reply each step is not prefix-stable (the ByteFallback decoder turns a whole byte run
    into U+FFFDs when one byte is invalid, rewriting text already sent), so each token becomes its
    bytes (SentencePiece: "<0xNN>" -> that byte, "▁" -> space) fed to the stdlib's incremental
    UTF-8 decoder, which emits a character only once it is complete. For valid text this equals
    tokenizer.decode (checked in tests/test_engine.py).
transformers' TextIteratorStreamer does neither (batch size 1 only, no stop-string hold-back), and
its `stop_strings` criterion stops generation but leaves the stop string in the output.
`_Rows` is a StoppingCriteria because the criteria run every step on the full input_ids, before
the streamer hook, in every transformers version: one place sees each token exactly once.

    eng = Engine.from_dir("runs/demo/sft-q4_0.gguf")              # a .gguf runs on llama.cpp
A .gguf file runs through llama.cpp instead (LlamaCppEngine, at the end): the same prompts, rows
and _TextRows (stop strings, UTF-8 deltas, cancellation); only the tokenizer and the decoding loop
are llama.cpp's.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import inspect
import logging
import queue
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from . import llamacpp
from .data import encode_prompt, with_bos
from .errors import ConfigError
from .modeling import load_model, load_tokenizer
from .prompts import (DEFAULT_TEMPLATE, Template, Turn, build_prompt, get_template, messages_to_turns,
                      render_turn)
from .sampling import SamplingParams, is_sampling

log = logging.getLogger(__name__)


# The context assumed for a model whose config.json gives no max_position_embeddings (and no
# --n-ctx was given): LLaMA-1/2's length, said in a warning rather than assumed silently.
FALLBACK_CONTEXT = 2048


class PromptTooLongError(ConfigError):
    """The prompt alone does not fit the model's context (the API answers 400). `tokens` is the
    prompt's length, or with `over` some count above the limit (a huge prompt is measured only
    from a prefix: Engine.count_over)."""

    def __init__(self, tokens: int, context: int, over: bool = False):
        self.tokens, self.context, self.over = tokens, context, over
        super().__init__(f"the prompt is {'over ' if over else ''}{tokens} tokens; this model's context is "
                         f"{context} (and at least one token must be generated)")


def model_id(path) -> str:
    """The name a model goes by (serve's /v1/models id, web's page, eval's answers file): the
    name of its directory or .gguf file, symlinks resolved (runs/latest -> runs/sft-3 is sft-3,
    and "." is the folder's own name)."""
    return Path(path).resolve().name


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max tokens / context), "cancelled"


@dataclass
class _Row:
    """One sequence of a batch: decoded text, what has been emitted, why it finished."""

    max_new_tokens: int
    stop: Sequence[str]
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event | None = None
    n_tokens: int = 0          # generated tokens, EOS included
    text: str = ""             # decoded so far (complete characters only), stop string cut off
    emitted: int = 0           # chars of `text` already passed to on_text
    finish_reason: str | None = None
    decoder: codecs.IncrementalDecoder = dataclasses.field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))


def _stop_cut(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in text[start:] (as an index into text), or None."""
    hits = [i for s in stop if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _holdback(text: str, stop: Sequence[str]) -> int:
    """How many trailing chars might be the beginning of a stop string (so must not be emitted yet)."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TextRows:
    """What both backends share, fed one token id at a time per row: EOS, stop strings (cut off,
    never emitted), per-row max tokens, cancellation, and streamed text deltas that are whole UTF-8
    characters and hold back a possible stop-string start. `token_bytes(id)` is the backend's
    tokenizer: the token's bytes as text (b"" for control tokens). See the module docstring."""

    def __init__(self, rows: list[_Row], eos: int, token_bytes: Callable[[int], bytes]):
        self.rows, self.eos, self.token_bytes = rows, eos, token_bytes
        self.max_stop = max((len(s) for r in rows for s in r.stop), default=0)

    def _emit(self, row: _Row, upto: int) -> None:
        if upto > row.emitted:
            if row.on_text is not None:
                row.on_text(row.text[row.emitted:upto])
            row.emitted = upto

    def feed(self, row: _Row, token: int) -> None:
        """The row's next token, unless the row was cancelled meanwhile."""
        if row.finish_reason is None and row.cancel is not None and row.cancel.is_set():
            self.finish(row, "cancelled")
        else:
            self.step(row, token)

    def step(self, row: _Row, token: int) -> None:
        if row.finish_reason is not None:
            return
        row.n_tokens += 1
        if token == self.eos:
            self.finish(row, "stop")
            return
        new = row.decoder.decode(self.token_bytes(token))
        if not row.text:  # the tokenizer's decoder strips the reply's leading space ("▁" of word 1)
            new = new.removeprefix(" ")
        start = max(0, len(row.text) - self.max_stop + 1)
        row.text += new
        cut = _stop_cut(row.text, row.stop, start) if new else None
        if cut is not None:
            row.text = row.text[:cut]
            self.finish(row, "stop")
        elif row.n_tokens >= row.max_new_tokens:
            self.finish(row, "length")
        elif row.cancel is not None and row.cancel.is_set():
            self.finish(row, "cancelled")
        else:
            self._emit(row, len(row.text) - _holdback(row.text, row.stop))

    def finish(self, row: _Row, reason: str) -> None:
        # Bytes of a character cut off by the token limit are dropped, not shown as U+FFFD.
        row.finish_reason = reason
        self._emit(row, len(row.text))


class _Rows(_TextRows):
    """The transformers side: a StoppingCriteria feeding each row's new token to _TextRows, with
    SentencePiece pieces as bytes ("<0xNN>" -> that byte, "▁" -> space)."""

    def __init__(self, tokenizer, rows: list[_Row]):
        self.tok = tokenizer
        self.special = set(tokenizer.all_special_ids)
        super().__init__(rows, tokenizer.eos_token_id, self.piece_bytes)

    def piece_bytes(self, token: int) -> bytes:
        if token in self.special:
            return b""
        piece = self.tok.convert_ids_to_tokens(token)
        m = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        for row, tok in zip(self.rows, input_ids[:, -1].tolist()):
            self.feed(row, tok)
        return torch.tensor([r.finish_reason is not None for r in self.rows], device=input_ids.device)


class Cancel(threading.Event):
    """A request's cancel flag: a threading.Event that also calls back when set, so a request
    running in another process (toucan.serve.engine_process) hears of it without polling."""

    def __init__(self):
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def on_set(self, fn: Callable[[], None]) -> None:
        self._callbacks.append(fn)
        if self.is_set():  # set before the callback came: call it now (a callback may run twice)
            fn()

    def set(self) -> None:
        super().set()
        for fn in list(self._callbacks):
            fn()


def gather(n: int, start: Callable[[list[Callable[[object], None]]], None]) -> list:
    """Start n requests and wait for all: `start` gets their n on_done callbacks (called from any
    thread, once each). Returns the results in order; the first exception among them is raised."""
    results: list = [None] * n
    left = threading.Semaphore(0)

    def done(i):
        def f(result):
            results[i] = result
            left.release()
        return f

    start([done(i) for i in range(n)])
    for _ in range(n):
        left.acquire()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


class Stream:
    """Iterate for text deltas (generation runs in a worker thread). After the iteration,
    `.completion` holds the Completion. `.cancel()` (or closing the iterator early) stops it."""

    def __init__(self, engine: "Engine", prompt: str, opts: SamplingParams):
        self._q: queue.Queue = queue.Queue()
        self._cancel = Cancel()
        self.completion: Completion | None = None
        self._error: BaseException | None = None
        ids = engine.encode_fitting(prompt)  # raise here, in the caller's thread

        def work():
            try:
                self.completion = engine.run([ids], opts, on_text=[self._q.put], cancel=[self._cancel])[0]
            except BaseException as e:  # re-raised in the consumer's thread
                self._error = e
            finally:
                self._q.put(None)

        self._thread = threading.Thread(target=work, name="toucan-generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        try:
            while (delta := self._q.get()) is not None:
                yield delta
        finally:
            self.cancel()  # a consumer that stops early (client gone) stops the generation
            self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()


class _Req:
    """One request in the continuous batch: its prompt ids, its _Row (text, limits, cancel), its
    own sampling (transformers' warpers, a torch.Generator when seeded) and where the result goes."""

    def __init__(self, ids: list[int], row: _Row, opts: SamplingParams, tracker: "_Rows",
                 on_done: Callable[[object], None], device):
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.ids, self.row, self.opts, self.tracker, self.on_done = ids, row, opts, tracker, on_done
        self.penalty = float(opts.repetition_penalty or 1.0)
        self.min_new = min(opts.min_new_tokens, row.max_new_tokens)
        self.sample = is_sampling(opts)  # continuous rows have one beam (Engine.run)
        self.warpers = LogitsProcessorList()
        if self.sample:  # the warpers transformers' generate adds, in its order, under the same conditions
            if opts.temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(opts.temperature))
            if opts.top_k:
                self.warpers.append(TopKLogitsWarper(opts.top_k))
            if opts.top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(opts.top_p))
        # a seeded request draws from its own generator: the same answer whatever else is in the batch
        self.gen = None if opts.seed is None else torch.Generator(device).manual_seed(opts.seed % 2 ** 64)
        # rows with equal warper settings and no generator of their own are sampled together
        self.group = (opts.temperature, opts.top_k, opts.top_p) if self.sample and self.gen is None else None
        self.finished = False

    def done(self, result) -> None:
        if not self.finished:
            self.finished = True
            self.on_done(result)

    def completion(self) -> Completion:
        return Completion(self.row.text, len(self.ids), self.row.n_tokens, self.row.finish_reason)


class _Scheduler:
    """Continuous batching (iteration-level scheduling, as in Orca and vLLM) over the model's own
    forward pass and transformers' DynamicCache: a request joins the running batch at the next
    decode step and leaves it when it finishes; its KV rows are dropped and a waiting request takes
    its slot. One worker thread per engine runs the steps; each step holds engine.lock.

    Why not transformers' own (5.24 ContinuousBatchingManager / generate_batch): its per-request
    logits processing covers only temperature, top-k and top-p; RepetitionPenaltyLogitsProcessor
    and MinNewTokensLengthLogitsProcessor are marked `supports_continuous_batching = False` and are
    dropped, yet repetition_penalty 1.2 is toucan's default everywhere and min_tokens is part of the
    API; it has no per-request seed, and no hook between sampling and the next step for our
    stop-string/UTF-8 rules (_TextRows) or cancellation before the token is sent. On CPU it also
    needs its paged cache sized by hand.

    Layout: one KV cache [rows, heads, T, head_dim] per layer (_KVSlots: preallocated, written in
    place), rows left-padded to a common T with an attention mask [rows, T], and each row's own
    position ids (so padding never shifts a row). A joining batch is prefilled on its own
    (left-padded among itself in a DynamicCache), then written into free row slots, the shorter of
    it and the running rows padded on the left; a leaving row's slot takes the last row, and the
    leading columns no row uses any more are cut. Sampling follows
    transformers' generate: repetition penalty (vectorised over a [rows, vocab] 'seen' mask, the
    same arithmetic as RepetitionPenaltyLogitsProcessor), EOS suppressed below min_new_tokens,
    then greedy argmax or the row's warpers and multinomial sampling."""

    def __init__(self, engine: "Engine", max_rows: int):
        self.engine, self.max_rows = engine, max(1, max_rows)
        self.waiting: collections.deque[_Req] = collections.deque()
        self.cond = threading.Condition()
        self.active: list[_Req] = []
        self.cache = self.mask = self.pos = self.next = self.seen = None
        # steps, rows (summed over decode steps), most rows in one step, prefills, joined: every key
        # from the start, since batch_stats() copies the dict from other threads and a key added
        # during a copy would fail it ("dictionary changed size during iteration")
        self.stats = collections.Counter(steps=0, rows=0, max_rows=0, prefills=0, joined=0)
        # transformers 5.24 renamed forward's past_key_values to cache (the old name warns); older take only the old
        params = inspect.signature(engine.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        threading.Thread(target=self._loop, name="toucan-scheduler", daemon=True).start()

    def submit(self, reqs: list[_Req]) -> None:
        with self.cond:
            self.waiting.extend(reqs)
            self.cond.notify()

    def queued(self) -> int:
        return len(self.waiting)

    def _loop(self) -> None:
        import torch

        while True:
            with self.cond:
                while not self.waiting and not self.active:
                    self.cond.wait()
                # Admission is capped at prefill_tokens prompt tokens per step (at least one request):
                # a wave of joiners prefilled at once stalls every running row for the whole
                # prefill and keeps the wave in lockstep; a few per step spreads arrivals out, so
                # later on each step admits about one request and its first token comes a step later.
                new, used = [], 0
                while self.waiting and len(self.active) + len(new) < self.max_rows:
                    n = len(self.waiting[0].ids)
                    if new and used + n > self.engine.prefill_tokens:
                        break
                    new.append(self.waiting.popleft())
                    used += n
            self.ended: list[_Req] = []
            try:
                with self.engine.lock, torch.inference_mode():
                    if new:
                        self._admit(new)
                        if self.engine.on_step is not None:  # the joiners' first tokens, before the decode
                            self.engine.on_step()
                    if self.active:
                        self._decode()
            except Exception as e:  # a bug (or out of memory): every request in flight gets the error
                log.exception("generation failed")
                for r in self.active + new:
                    r.done(e)
                self.active, self.cache = [], None
            # results go out after the step, with no tensor work left in this thread: a caller may
            # return and the interpreter exit right away (a daemon thread inside torch then aborts it)
            for r in self.ended:
                r.done(r.completion())
            if self.engine.on_step is not None:
                self.engine.on_step()

    def _finish_cancelled(self, r: _Req) -> bool:
        if r.row.finish_reason is None and r.row.cancel is not None and r.row.cancel.is_set():
            r.tracker.finish(r.row, "cancelled")
        if r.row.finish_reason is not None:
            self.ended.append(r)
            return True
        return False

    def _sample(self, reqs: list[_Req], logits, seen):
        import torch

        pen = [r.penalty for r in reqs]
        if any(p != 1.0 for p in pen):
            p = torch.tensor(pen, dtype=logits.dtype, device=logits.device)[:, None]
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        need = [r.row.n_tokens < r.min_new for r in reqs]
        if any(need):
            logits[torch.tensor(need, device=logits.device), self.engine.tokenizer.eos_token_id] = float("-inf")
        out = logits.argmax(-1)
        groups: dict = {}
        for i, r in enumerate(reqs):
            if r.sample:
                groups.setdefault(r.group if r.group is not None else ("row", i), []).append(i)
        for rows in groups.values():
            r = reqs[rows[0]]
            idx = torch.tensor(rows, device=logits.device)
            s = r.warpers(None, logits[idx])  # the warpers do not read input_ids
            out[idx] = torch.multinomial(torch.softmax(s, dim=-1), 1, generator=r.gen)[:, 0]
        return out

    def _feed(self, reqs: list[_Req], toks, seen) -> None:
        import torch

        seen[torch.arange(len(reqs), device=seen.device), toks] = True  # the penalty's input_ids grow
        for r, t in zip(reqs, toks.tolist()):
            r.tracker.feed(r.row, t)

    def _admit(self, new: list[_Req]) -> None:
        import torch
        from transformers import DynamicCache

        new = [r for r in new if not self._finish_cancelled(r)]
        if not new:
            return
        model, dev = self.engine.model, self.engine.model.device
        width = max(len(r.ids) for r in new)
        pad = self.engine.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in new], device=dev)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in new], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{self._cache_kw: cache})
        logits = out.logits[:, -1, :].float()
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
        for i, r in enumerate(new):  # the penalty sees the prompt too, as in generate
            seen[i, torch.tensor(r.ids, device=dev)] = True
        toks = self._sample(new, logits, seen)
        self._feed(new, toks, seen)
        self.stats["prefills"] += 1
        self.stats["joined"] += len(new)
        keep = [i for i, r in enumerate(new) if not self._finish_cancelled(r)]
        if not keep:
            return
        idx = torch.tensor(keep, device=dev)
        cache.batch_select_indices(idx)
        part = (mask[idx], mask[idx].sum(-1), toks[idx], seen[idx])
        # the rows wanted soon: one growth of the buffers for a burst, not one per doubling
        want = len(self.active) + len(keep) + len(self.waiting)
        if not self.active:  # an empty batch: the buffers of the last one are reused (_KVSlots.start)
            if self.cache is None:
                self.cache = _KVSlots(cache, self.max_rows, want)
            else:
                self.cache.start(cache, want)
            self.mask, self.pos, self.next, self.seen = part
            self.active = [new[i] for i in keep]
            return
        # the shorter of the running rows and the joiners is left-padded to the other's length
        ta, tn = self.mask.shape[1], part[0].shape[1]
        t = max(ta, tn)
        self.cache.join(cache, t, want)
        self.mask = torch.cat([_left_pad(self.mask, t, dim=1), _left_pad(part[0], t, dim=1)])
        self.pos, self.next = torch.cat([self.pos, part[1]]), torch.cat([self.next, part[2]])
        self.seen = torch.cat([self.seen, part[3]])
        self.active += [new[i] for i in keep]

    def _decode(self) -> None:
        import torch

        rows = len(self.active)
        self.mask = torch.cat([self.mask, self.mask.new_ones(rows, 1)], dim=1)
        self.cache.reserve(1)
        out = self.engine.model(input_ids=self.next[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                                use_cache=True, **{self._cache_kw: self.cache.cache})
        self.cache.advance(1)
        self.pos = self.pos + 1
        toks = self._sample(self.active, out.logits[:, -1, :].float(), self.seen)
        self._feed(self.active, toks, self.seen)
        self.next = toks
        self.stats["steps"] += 1
        self.stats["rows"] += rows
        self.stats["max_rows"] = max(self.stats["max_rows"], rows)
        keep = [i for i, r in enumerate(self.active) if not self._finish_cancelled(r)]
        if len(keep) == rows:
            return
        if not keep:  # all done: the buffers stay for the next batch
            self.active = []
            return
        order = self.cache.remove(keep)  # the rows left, in their new slots
        idx = torch.tensor(order, device=self.mask.device)
        self.mask, self.pos, self.next, self.seen = self.mask[idx], self.pos[idx], self.next[idx], self.seen[idx]
        self.active = [self.active[i] for i in order]
        first = int(self.mask.any(0).nonzero()[0])  # columns before it were padding for every row left
        if first:
            self.cache.lo += first
            self.mask = self.mask[:, first:]


class _SlotLayer:
    """One decoder layer's view of _KVSlots, in the place of transformers' DynamicLayer:
    `update` writes the step's keys/values into the buffers in place (DynamicLayer concatenates,
    copying the whole cache on every step) and returns the live region."""

    is_sliding = is_linear = is_dummy = False
    is_compileable = False
    is_initialized = True

    def __init__(self, slots: "_KVSlots", i: int):
        self.slots, self.i = slots, i

    @property
    def keys(self):
        s = self.slots
        return s.k[self.i][:s.n, :, s.lo:s.hi]

    @property
    def values(self):
        s = self.slots
        return s.v[self.i][:s.n, :, s.lo:s.hi]

    def update(self, key_states, value_states, *args, **kwargs):
        s, q = self.slots, key_states.shape[2]
        assert s.hi + q <= s.k[self.i].shape[2], "reserve() first"
        s.k[self.i][:s.n, :, s.hi:s.hi + q] = key_states
        s.v[self.i][:s.n, :, s.hi:s.hi + q] = value_states
        return s.k[self.i][:s.n, :, s.lo:s.hi + q], s.v[self.i][:s.n, :, s.lo:s.hi + q]

    def get_seq_length(self) -> int:
        return self.slots.hi - self.slots.lo

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


class _KVSlots:
    """The running batch's KV cache in preallocated buffers, one [row slots, heads, columns,
    head_dim] pair per layer: row r's keys live in slot r, columns lo..hi (rows left-padded to a
    common length, the padding zeroed). A joiner is written into the next free slots, a decode step
    into column hi, and a row that leaves is replaced by the last row (one row copied). With
    DynamicCache every step, join and leave copied the whole cache: at 32 rows of the bench's
    model that was 4 ms of a 22 ms join, and page faults on the fresh tensors made it worse.
    Buffers grow to the rows wanted soon (running, joining and waiting; at most max_rows) or by
    doubling, so at low load they stay small, and they stay when the batch empties (start).

    transformers' StaticCache does not fit: it has one length for every row (no per-row left
    padding that moves as rows join and leave) and no way to add or drop a row in place."""

    def __init__(self, first, max_rows: int, want: int = 0):
        """first: the DynamicCache of the first prefill (its rows and columns become the batch);
        want: the rows the scheduler expects soon (running, joining and waiting)."""
        from transformers import DynamicCache
        from transformers.cache_utils import CacheLayerMixin

        # a virtual subclass: the Cache's isinstance checks accept it, and transformers stays out of
        # this module's import (toucan --help must not load it)
        CacheLayerMixin.register(_SlotLayer)
        self.max_rows = max_rows
        self.k: list = []
        self.v: list = []
        self.start(first, want)
        self.cache = DynamicCache()  # what the model's forward gets: its layers are views of ours
        self.cache.layers = [_SlotLayer(self, i) for i in range(len(self.k))]

    def start(self, first, want: int = 0) -> None:
        """An empty batch's first prefill `first` becomes the batch: in the buffers it already has
        when they are large enough. They stay when a batch empties: a burst then writes into memory
        used before instead of growing fresh buffers, whose page faults made each growth take 20-68
        ms in the server's engine process (against 1-7 ms in reused memory), stalling every row. So
        the memory held is the high-water mark, as vLLM holds its preallocated KV cache."""
        k0 = first.layers[0].keys
        n, t = k0.shape[0], k0.shape[2]
        old = self.k[0].shape if self.k else (0, 0, 0)
        rows = min(self.max_rows, max(n, 4, want))
        if old[0] < rows or old[2] <= t:  # none yet, or too small: new ones, no smaller than the old
            rows, cols = max(rows, old[0]), max(t + 64, old[2])

            def new(x):  # x: a prefill's [n, heads, t, head_dim]
                return x.new_zeros(rows, x.shape[1], cols, x.shape[3])

            self.k = [new(x.keys) for x in first.layers]
            self.v = [new(x.values) for x in first.layers]
        for bufs, xs in self._pairs(first):
            for buf, x in zip(bufs, xs):
                buf[:n, :, :t] = x
        self.n, self.lo, self.hi = n, 0, t

    def _pairs(self, cache):
        """Our key buffers with a DynamicCache's keys per layer, then the same for values."""
        return (self.k, [x.keys for x in cache.layers]), (self.v, [x.values for x in cache.layers])

    def _realloc(self, rows: int, cols: int, shift: int) -> None:
        """New buffers of rows x cols; the live region moves to start at column lo + shift."""
        lo, hi, n = self.lo, self.hi, self.n
        for bufs in (self.k, self.v):
            for i, b in enumerate(bufs):
                nb = b.new_zeros(rows, b.shape[1], cols, b.shape[3])
                nb[:n, :, lo + shift:hi + shift] = b[:n, :, lo:hi]
                bufs[i] = nb
        self.lo, self.hi = lo + shift, hi + shift

    def reserve(self, q: int) -> None:
        """Room for q more columns (a decode step: 1). Full: the live region moves to column 0, in
        place when at least 16 columns (and q) are free on its left, else into new buffers of twice
        its width. New buffers every time cost 20-146 ms (page faults on fresh memory) at 16-32
        rows in the server's engine process: a stall of every row, and a standing queue of joiners
        behind it."""
        b = self.k[0]
        if self.hi + q <= b.shape[2]:
            return
        width, lo = self.hi - self.lo, self.lo
        if lo < max(16, q):
            self._realloc(b.shape[0], 2 * (width + q) + 64, -lo)
            return
        for bufs in (self.k, self.v):
            for buf in bufs:
                for s in range(0, width, lo):  # blocks of lo columns: none overlaps its destination
                    e = min(width, s + lo)
                    buf[:self.n, :, s:e] = buf[:self.n, :, lo + s:lo + e]
        self.lo, self.hi = 0, width

    def advance(self, q: int) -> None:
        self.hi += q

    def join(self, add, t: int, want: int = 0) -> None:
        """Rows of a prefill's DynamicCache `add` join; t = the joint length (max of both); want:
        as in __init__."""
        k_add = add.layers[0].keys
        m, tn = k_add.shape[0], k_add.shape[2]
        b = self.k[0]
        shift = max(0, t - (self.hi - self.lo) - self.lo)  # columns missing on the left
        rows = b.shape[0] if self.n + m <= b.shape[0] else min(self.max_rows, max(2 * b.shape[0], self.n + m, want))
        if shift or rows != b.shape[0]:
            self._realloc(rows, b.shape[2] + shift, shift)
        lo = self.hi - t
        n = self.n
        for bufs, layers in self._pairs(add):
            for buf, x in zip(bufs, layers):
                buf[:n, :, lo:self.lo].zero_()  # the running rows' new left padding
                buf[n:n + m, :, lo:self.hi - tn].zero_()  # the joiners' padding
                buf[n:n + m, :, self.hi - tn:self.hi] = x
        self.lo, self.n = lo, n + m

    def remove(self, keep: list[int]) -> list[int]:
        """Keep the rows `keep` (ascending): a slot left empty below the new row count takes a kept
        row from the end. Returns, for each new slot, the old row now in it."""
        m = len(keep)
        kept = set(keep)
        order = list(range(m))
        holes = [r for r in range(m) if r not in kept]
        tail = [r for r in keep if r >= m]
        for h, r in zip(holes, tail):
            order[h] = r
            for bufs in (self.k, self.v):
                for buf in bufs:
                    buf[h, :, self.lo:self.hi] = buf[r, :, self.lo:self.hi]
        self.n = m
        return order


def _left_pad(x, t: int, dim: int = 2):
    """x padded with zeros at the front of `dim` to length t (keys/values: dim 2; masks: dim 1)."""
    import torch

    n = t - x.shape[dim]
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Engine:
    def __init__(self, model, tokenizer, template: str | Template = DEFAULT_TEMPLATE,
                 max_context: int | None = None, continuous: bool = True, max_rows: int = 32,
                 prefill_tokens: int = 128):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template)
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None)
        if not self.max_context:
            log.warning("the model's config gives no max_position_embeddings: assuming a %d-token context "
                        "(give --n-ctx / max_context to set it)", FALLBACK_CONTEXT)
            self.max_context = FALLBACK_CONTEXT
        # One forward pass at a time on a model: forward passes are not re-entrant-safe with a
        # shared KV-cache layout, and a seeded static generation needs the global RNG to itself.
        # Concurrency comes from batching: continuous (the scheduler holds the lock per step, so
        # requests join and leave a running batch), or static when continuous=False (run() is one
        # generate call; toucan.serve.api's Batcher groups waiting requests) and for beam search.
        self.lock = threading.Lock()
        self.continuous, self.max_rows = continuous, max_rows
        self.prefill_tokens = prefill_tokens  # most prompt tokens admitted to the running batch per step
        self._scheduler: _Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        # called by the scheduler's thread once a batch of on_text/on_done calls is made: after a
        # prefill (the joiners' first tokens) and after each step (toucan.serve.engine_process
        # sends each batch as one message)
        self.on_step: Callable[[], None] | None = None

    @property
    def scheduler(self) -> _Scheduler:
        """The continuous-batching worker, started on first use (with max_rows as it is then)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                self._scheduler = _Scheduler(self, self.max_rows)
            return self._scheduler

    def batch_stats(self) -> dict:
        """The continuous batch's counters: steps (decode steps), rows (summed over steps),
        max_rows (most rows in one step), joined, prefills; empty before the first request."""
        return dict(self._scheduler.stats) if self._scheduler is not None else {}

    def queued(self) -> int:
        """Requests waiting to join the continuous batch."""
        return self._scheduler.queued() if self._scheduler is not None else 0

    def submit(self, ids: list[int], opts: SamplingParams, on_done: Callable[[object], None],
               on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None) -> None:
        """Queue one request on the continuous batch and return at once: on_text gets its deltas and
        on_done its Completion (or the exception), both from the scheduler's thread."""
        assert self.continuous and max(1, opts.num_beams) == 1
        row = self._rows([ids], opts, [on_text] if on_text else None, [cancel] if cancel else None, None, None)[0]
        self.scheduler.submit([_Req(ids, row, opts, _Rows(self.tokenizer, [row]), on_done, self.model.device)])

    @classmethod
    def from_dir(cls, path, device: str = "auto", dtype: str = "auto", template: str | Template = DEFAULT_TEMPLATE,
                 max_context: int | None = None, threads: int = 0, trust_remote_code: bool = False,
                 base: str | None = None) -> "Engine":
        """A model directory (transformers), a LoRA adapter directory (on its base, or `base`:
        modeling.load_adapter), or a .gguf file (llama.cpp: LlamaCppEngine, which runs no code
        from anywhere). threads: CPU threads (0 = torch's default; llama.cpp: physical cores)."""
        if llamacpp.is_gguf(path):
            if device not in ("auto", "cpu"):
                log.warning("--device %s: a .gguf runs on the CPU (llama.cpp, no layers offloaded)", device)
            return LlamaCppEngine(path, template, n_ctx=max_context or 0, threads=threads)

        if threads:
            import torch

            torch.set_num_threads(threads)
        return cls(load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, base=base),
                   load_tokenizer(path, trust_remote_code=trust_remote_code, base=base), template, max_context)

    # -- prompts --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """The rule in toucan.data: [BOS] + tokens(prompt)."""
        return encode_prompt(self.tokenizer, prompt)

    def count_over(self, prompt: str, cap: int) -> int | None:
        """A token count above `cap` for [BOS] + prompt, read from a prefix, or None when a prefix
        does not settle it. A text has no fewer tokens than its prefix (less a few where the cut
        splits a piece), so a prompt far longer than `cap` tokens could be is refused after
        tokenizing ~32 chars per token of cap: a 1 MB prompt for a 512-token context costs 17 KB
        of tokenizing, not 1 MB (the SentencePiece tokenizer holds the GIL: a server stalls)."""
        cut = 32 * (max(cap, 0) + 16)
        if len(prompt) <= cut:
            return None
        n = len(self.encode(prompt[:cut])) - 16  # the slack for pieces and merges at the cut
        return n if n > cap else None

    def count_tokens(self, prompt: str, cap: int | None = None) -> int:
        """len(encode(prompt)); with `cap`, exact up to cap and otherwise some count above it."""
        if cap is not None and (n := self.count_over(prompt, cap)) is not None:
            return n
        return len(self.encode(prompt))

    def fits(self, n_prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens leaves room for at least one generated token."""
        return n_prompt_tokens < self.max_context

    def check_fits(self, n_prompt_tokens: int) -> None:
        if not self.fits(n_prompt_tokens):
            raise PromptTooLongError(n_prompt_tokens, self.max_context)

    def encode_fitting(self, prompt: str) -> list[int]:
        """encode(prompt), or PromptTooLongError when it leaves no room to generate; a prompt far
        longer than the context is refused from a prefix (count_over), never tokenized whole."""
        over = self.count_over(prompt, self.max_context - 1)
        if over is not None:
            raise PromptTooLongError(over, self.max_context, over=True)
        ids = self.encode(prompt)
        self.check_fits(len(ids))
        return ids

    def chat_prompt(self, history: Sequence[Turn], instruction: str, max_new_tokens: int,
                    system: str | None = None, input: str = "") -> tuple[str, list[Turn]]:
        """The prompt for `instruction` after `history`, dropping the oldest turns until
        [BOS] + prompt + max_new_tokens fits the context. Returns (prompt, the turns kept).
        When even the bare question does not fit, it is returned as is (generation then raises
        PromptTooLongError or is shortened to the room left).

        Linear in the history (a server must not spend O(turns^2) on one request): each turn is
        tokenized at most once, newest first, until the budget is spent, so older turns are never
        read; the kept suffix is then checked on the real prompt (tokens are not additive across
        piece boundaries) and moved by a turn or two until it is the longest suffix that fits."""
        history = list(history)
        n, budget = len(history), self.max_context - max_new_tokens

        def render(k: int) -> str:  # the prompt keeping the newest k turns
            return build_prompt(instruction, input, history[n - k:] if k else [], self.template, system=system)

        if not history:
            return render(0), []
        fixed = self.count_tokens(render(0), budget)
        if fixed > budget:
            return render(0), []
        cost: dict[int, int] = {}  # turn index -> its tokens alone (BOS excluded)

        def turn_cost(i: int) -> int:
            if i not in cost:
                cost[i] = self.count_tokens(render_turn(*history[i], self.template), budget) - 1
            return cost[i]

        k, used = 0, fixed
        while k < n and used + turn_cost(n - 1 - k) <= budget:
            used += turn_cost(n - 1 - k)
            k += 1
        while k > 0 and self.count_tokens(render(k), budget) > budget:
            k -= 1
        # grow only by turns that could fit on their own (a huge old turn is never tokenized twice)
        while k < n and turn_cost(n - 1 - k) <= budget and self.count_tokens(render(k + 1), budget) <= budget:
            k += 1
        return render(k), history[n - k:] if k else []

    def messages_prompt(self, messages: Sequence[dict], max_new_tokens: int) -> str:
        """OpenAI-style messages -> prompt (a system message replaces the template's header;
        see toucan.prompts), oldest turns dropped to fit."""
        system, history, instruction = messages_to_turns(messages)
        return self.chat_prompt(history, instruction, max_new_tokens, system=system)[0]

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompt: str, opts: SamplingParams | None = None) -> Completion:
        return self.generate_batch([prompt], opts)[0]

    def generate_batch(self, prompts: Sequence[str], opts: SamplingParams | None = None) -> list[Completion]:
        return self.run([self.encode_fitting(p) for p in prompts], opts or SamplingParams())

    def stream(self, prompt: str, opts: SamplingParams | None = None) -> Stream:
        return Stream(self, prompt, opts or SamplingParams())

    def _rows(self, ids, opts, on_text, cancel, max_new_tokens, stop) -> list[_Row]:
        assert len(ids) > 0
        rows = []
        for i, x in enumerate(ids):
            want = max_new_tokens[i] if max_new_tokens else opts.max_new_tokens
            room = self.max_context - len(x)  # never run past the position embeddings
            rows.append(_Row(max_new_tokens=max(1, min(want, room)), stop=[s for s in (stop[i] if stop else opts.stop) if s],
                             on_text=on_text[i] if on_text else None, cancel=cancel[i] if cancel else None))
        return rows

    def generation_config(self, opts: SamplingParams, max_new_tokens: int):
        from transformers import GenerationConfig

        tok = self.tokenizer
        beams = max(1, opts.num_beams)
        sample = is_sampling(opts)
        kw = dict(max_new_tokens=max_new_tokens, num_beams=beams, do_sample=sample,
                  min_new_tokens=min(opts.min_new_tokens, max_new_tokens) or None,
                  repetition_penalty=opts.repetition_penalty, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        if sample:
            kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)
        else:  # greedy/beam: unset the sampling knobs so transformers does not warn about them
            kw.update(temperature=None, top_p=None, top_k=None)
        return GenerationConfig(**kw)

    def run(self, ids: list[list[int]], opts: SamplingParams, on_text: list | None = None,
             cancel: list | None = None, max_new_tokens: list[int] | None = None,
             stop: list[Sequence[str]] | None = None) -> list[Completion]:
        """Generate for a batch of prompts and wait for all. Per-row max_new_tokens / stop /
        on_text / cancel (default: from opts); the rest of opts is shared by the batch. Continuous:
        the rows join the running batch (with whatever else is being generated); beam search and
        continuous=False: one left-padded generate call (_run_static)."""
        if not self.continuous or max(1, opts.num_beams) > 1:
            return self._run_static(ids, opts, on_text, cancel, max_new_tokens, stop)
        rows = self._rows(ids, opts, on_text, cancel, max_new_tokens, stop)
        tracker = _Rows(self.tokenizer, rows)
        # one scheduler.submit for the whole batch: its rows are admitted together
        return gather(len(rows), lambda dones: self.scheduler.submit(
            [_Req(x, r, opts, tracker, d, self.model.device) for x, r, d in zip(ids, rows, dones)]))

    def _run_static(self, ids: list[list[int]], opts: SamplingParams, on_text: list | None = None,
                    cancel: list | None = None, max_new_tokens: list[int] | None = None,
                    stop: list[Sequence[str]] | None = None) -> list[Completion]:
        """Today's static batching: one left-padded transformers generate call for the batch."""
        import torch
        from transformers import StoppingCriteriaList

        rows = self._rows(ids, opts, on_text, cancel, max_new_tokens, stop)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen_cfg = self.generation_config(opts, max(r.max_new_tokens for r in rows))
        beams = gen_cfg.num_beams > 1
        tracker = _Rows(self.tokenizer, rows)
        kw = {}
        if beams:
            # Beam rows are hypotheses, not requests: stop strings go to transformers' own
            # criterion and the text is cut afterwards (beam search cannot stream anyway).
            if any(r.stop for r in rows):
                gen_cfg.stop_strings = sorted({s for r in rows for s in r.stop})
                kw["tokenizer"] = self.tokenizer
        else:
            kw["stopping_criteria"] = StoppingCriteriaList([tracker])
        with self.lock, torch.inference_mode():
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_cfg, **kw)
        if beams:
            for row, seq in zip(rows, out[:, width:].tolist()):
                for tok in seq:
                    tracker.step(row, tok)
                    if row.finish_reason is not None:
                        break
        for row in rows:  # ended by transformers' own max length before ours (e.g. beams)
            if row.finish_reason is None:
                tracker.finish(row, "length")
        return [Completion(r.text, len(x), r.n_tokens, r.finish_reason) for r, x in zip(rows, ids)]


class LlamaCppEngine(Engine):
    """The same engine on a .gguf file through llama.cpp (llama-cpp-python): the same prompts
    (toucan.prompts, then llama.cpp's tokenizer: [BOS] + tokens(prompt), equal to toucan's ids),
    history truncation to the context (n_ctx), stop strings held back, UTF-8-safe streaming and
    cancellation (the same _TextRows, fed llama.cpp's tokens), and the sampling options: greedy,
    temperature, top_p, top_k, repetition_penalty, seed, min_new_tokens (llamacpp.sampler).
    Not supported, refused with a ConfigError: num_beams > 1.

    Concurrency: requests are queued, not batched. One llama.cpp context holds one sequence; the
    lock serialises requests through it and a batch given to run() (toucan.serve.api's Batcher)
    is decoded row after row. The KV cache of the previous request's common prefix is reused
    (a chat's next turn only evaluates the new tokens)."""

    def __init__(self, path, template: str | Template = DEFAULT_TEMPLATE, n_ctx: int = 0, threads: int = 0):
        self.llm, self.space_prefix = llamacpp.load(path, n_ctx=n_ctx, threads=threads)
        # free llama.cpp's model when the engine goes, and before interpreter shutdown (Llama.__del__
        # then finds its ctypes bindings already torn down and prints a TypeError)
        weakref.finalize(self, self.llm.close)
        self.model, self.tokenizer = self.llm, None  # no transformers tokenizer: the .gguf is all it needs
        self.template = get_template(template)
        # llama.cpp rounds the context it allocates up (to 256): the model's own length is the limit
        self.max_context = n_ctx or min(self.llm.n_ctx(), self.llm._model.n_ctx_train())
        self.bos, self.eos = self.llm.token_bos(), self.llm.token_eos()
        self.token_bytes = llamacpp.token_bytes_table(self.llm)
        self.lock = threading.Lock()

    def encode(self, prompt: str) -> list[int]:
        # toucan.data's rule with llama.cpp's tokenizer: BOS, then the prompt's tokens, with
        # SentencePiece's one dummy-prefix space written here (see llamacpp.load)
        text = (" " + prompt) if self.space_prefix else prompt
        return with_bos(self.bos, self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def run(self, ids: list[list[int]], opts: SamplingParams, on_text: list | None = None,
            cancel: list | None = None, max_new_tokens: list[int] | None = None,
            stop: list[Sequence[str]] | None = None) -> list[Completion]:
        llamacpp.check_options(opts)
        rows = self._rows(ids, opts, on_text, cancel, max_new_tokens, stop)
        tracker = _TextRows(rows, self.eos, self.token_bytes.__getitem__)
        with self.lock:
            for row, x in zip(rows, ids):
                self._decode(x, row, opts, tracker)
        return [Completion(r.text, len(x), r.n_tokens, r.finish_reason) for r, x in zip(rows, ids)]

    def _decode(self, x: list[int], row: _Row, opts: SamplingParams, tracker: _TextRows) -> None:
        llama_cpp = llamacpp.import_llama_cpp()
        llm = self.llm
        chain = llamacpp.sampler(llm, opts)
        try:
            for t in x:  # the repetition penalty sees the prompt too, as transformers' does
                chain.accept(t)
            # keep the KV cache of the prefix shared with what was evaluated last (at least one
            # prompt token is evaluated again: sampling needs its logits)
            keep = 0
            for a, b in zip(llm.input_ids[: min(llm.n_tokens, len(x) - 1)].tolist(), x):
                if a != b:
                    break
                keep += 1
            llm.n_tokens = keep  # eval() drops the KV cache from here on
            llm.eval(x[keep:])
            min_new = min(opts.min_new_tokens, row.max_new_tokens)
            while row.finish_reason is None:
                if row.n_tokens < min_new:  # EOS suppressed until then, as transformers' min_new_tokens
                    llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)[self.eos] = float("-inf")
                token = chain.sample(llm._ctx, -1)  # samples and accepts it into the chain
                tracker.feed(row, token)
                if row.finish_reason is None:
                    llm.eval([token])
        finally:
            chain.close()
