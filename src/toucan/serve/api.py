"""`toucan serve`: an OpenAI-compatible API (FastAPI + uvicorn) on the engine.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each with and without
`stream: true`, SSE ending in `data: [DONE]`), GET /health (queue and batch counters).

* Keys: with --api-key, --api-key-file or TOUCAN_API_KEYS every path, /health and unknown ones
  included, needs `Authorization: Bearer KEY`; otherwise 401 with an OpenAI-style error body. An
  empty key is an error; a non-loopback --host without any key is refused unless --insecure.
* One client cannot freeze the server: a pure-ASGI guard checks the Host header (on a loopback
  bind only localhost/127.0.0.1/[::1] with the port, plus --allowed-hosts: DNS-rebinding defence,
  else 421), the key, and the body size (--max-request-bytes: 413 from Content-Length before
  reading, or as soon as a chunked body passes it) before FastAPI reads anything; prompt building
  and tokenization run on a one-thread executor, never on the event loop; history trimming is linear.
* Errors are OpenAI-shaped {"error": {"message", "type", "param", "code"}}: bad JSON or bad fields
  400 naming the field (types are strict, unknown fields are refused as OpenAI does, strings with
  lone surrogates are refused), a prompt that does not fit the context 400 (code
  context_length_exceeded), unknown model 404.
* Chat prompts: toucan.prompts renders the messages (a leading system message replaces the
  template's header line; a system message anywhere else is a 400). When a conversation does not
  fit context - max_tokens, its oldest turns are dropped, as in `toucan chat`.
* Concurrency: requests are *batched on the engine*. One worker thread takes the oldest waiting
  request, waits batch_wait_ms for more, and decodes up to max_batch_size requests with the same
  sampling settings (temperature, top_p, top_k, repetition penalty) in one left-padded `generate`;
  each row keeps its own max_tokens and stop strings and streams on its own. Requests with a seed
  run alone (the seed must own the RNG). This is static batching: a request that arrives during a
  batch waits for it to end (bench/serve.py measures the effect on time to first token).
* A client that disconnects cancels its row, streaming or not (a stream: Starlette cancels the
  response task; a JSON request: a task waits for uvicorn's http.disconnect). The row's cancel
  event stops it at the next token, other rows go on.

Extensions beyond OpenAI's fields (as vLLM has them): top_k, repetition_penalty, min_tokens.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import ipaddress
import json
import logging
import os
import queue
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.requests import Request  # at module level: FastAPI resolves the handlers' annotations here

from ..engine import Cancel, Completion, Engine, PromptTooLongError
from ..errors import ConfigError
from ..sampling import OPENAI, SamplingParams, is_sampling

log = logging.getLogger(__name__)


# -- request bodies -------------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogate(s: str) -> str:
    # JSON's "\ud800" escape decodes to a lone surrogate that no tokenizer and no UTF-8 encoder takes
    if _SURROGATE.search(s):
        raise ValueError("contains an unpaired UTF-16 surrogate (a lone \\ud800-\\udfff escape)")
    return s


def _temperature(t: float) -> float:
    # logits / 1e-38 overflow float32 to inf, and softmax then gives nan ("probability tensor
    # contains inf/nan"); below 1e-5 sampling is greedy in all but name (vLLM's cut-off too).
    if 0.0 < t < 1e-5:
        raise ValueError("must be 0 (greedy) or at least 1e-05")
    return t


Text = Annotated[str, AfterValidator(_no_surrogate)]
# OpenAI answers 400 "Unrecognized request argument" for a field it does not know, and so do we: a
# misspelt or foreign field ("history": 0) must not be silently ignored. strict: no coercion ("5" is
# not 5, 1.0 is not an int, "true" is not a bool).
_STRICT = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # OpenAI adds options here over time
    include_usage: bool = False


class _Common(BaseModel):
    model_config = _STRICT

    model: Text
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    # a field left out gets OpenAI's default (toucan.sampling.OPENAI)
    temperature: Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(_temperature)] = OPENAI.temperature
    top_p: float = Field(OPENAI.top_p, gt=0.0, le=1.0)
    top_k: int = Field(OPENAI.top_k, ge=0)
    min_tokens: int = Field(OPENAI.min_new_tokens, ge=0)
    # beyond these the penalised logits overflow float32 (1e-40 gives inf/nan probabilities)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[Text, list[Text], None] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1, description="what torch.manual_seed takes")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    # sent by OpenAI clients; accepted and not used
    user: Optional[Text] = None
    metadata: Optional[dict[Text, Text]] = None
    store: Optional[bool] = None
    service_tier: Optional[Text] = None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: Union[Text, list[TextPart], None] = None
    name: Optional[Text] = None  # OpenAI's participant name; not used

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Union[Text, list[Text]]


def request_prompt(engine: Engine, req: ChatRequest, max_new_tokens: int) -> str:
    """The prompt a chat request is answered with (toucan.prompts via the engine)."""
    return engine.messages_prompt([{"role": m.role, "content": m.text()} for m in req.messages], max_new_tokens)


# -- errors ---------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- the batcher ----------------------------------------------------------------------------------

class Job:
    """One request: its token ids and options; results go back to its asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[int], opts: SamplingParams):
        self.loop, self.ids, self.opts = loop, ids, opts
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancel = Cancel()

    def key(self):
        o = self.opts
        sample = is_sampling(o)
        return (sample, o.repetition_penalty, o.min_new_tokens) + ((o.temperature, o.top_p, o.top_k) if sample else ())

    def put(self, item) -> None:  # called from the worker thread
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher:
    """Requests to the engine. Continuous batching (a transformers Engine): each request goes
    straight to the engine's scheduler, which adds it to the running batch at its next decode
    step (max_batch rows at most). Static (a .gguf's LlamaCppEngine, or Engine(continuous=False)):
    waiting requests with the same sampling options are grouped, for up to wait_s, into one
    engine.run call, and a request that arrives meanwhile waits for the whole batch."""

    def __init__(self, engine: Engine, max_batch: int, wait_s: float):
        self.engine, self.max_batch, self.wait_s = engine, max(1, max_batch), wait_s
        self.continuous = getattr(engine, "continuous", False)
        self.q: queue.Queue[Job] = queue.Queue()
        self.pending: collections.deque[Job] = collections.deque()  # taken but not batchable yet
        # every counter /health reports is there from the start (a client reading it before the first
        # request ends finds zeros, not a missing key)
        self.stats = collections.Counter(dict.fromkeys(("submitted", "completed", "cancelled", "completion_tokens"), 0))
        if self.continuous:
            engine.max_rows = self.max_batch  # before its scheduler starts (on the first request)
        threading.Thread(target=self._dispatch if self.continuous else self._loop, name="toucan-batcher",
                         daemon=True).start()

    def all_stats(self) -> dict:
        """For /health: requests (submitted, completed, cancelled, completion_tokens) and batches:
        static: batches, rows, max_batch; continuous: steps (decode steps), rows (summed over
        steps), max_batch (most rows in one step), joined, prefills."""
        out = dict(self.stats)
        if self.continuous:
            st = collections.Counter(self.engine.batch_stats())
            out.update(steps=st["steps"], rows=st["rows"], max_batch=st["max_rows"], joined=st["joined"],
                       prefills=st["prefills"])
        return out

    def queued(self) -> int:
        n = self.q.qsize() + len(self.pending)
        if self.continuous:
            n += self.engine.queued()
        return n

    def _dispatch(self) -> None:
        while True:
            j = self.q.get()
            if j.cancel.is_set():
                continue
            try:
                self.engine.submit(j.ids, j.opts, on_done=lambda r, j=j: self._done(j, r), on_text=j.put,
                                   cancel=j.cancel)
            except Exception as e:  # a bug, not the client's fault: a 500
                log.exception("generation failed")
                j.put(e)

    def _done(self, j: Job, r) -> None:
        if isinstance(r, Completion):  # tokens first: /health never shows a request done without them
            self.stats["completion_tokens"] += r.completion_tokens
            self.stats["cancelled" if r.finish_reason == "cancelled" else "completed"] += 1
        j.put(r)

    def submit(self, job: Job) -> None:
        self.stats["submitted"] += 1
        self.q.put(job)

    def _next_batch(self) -> list[Job]:
        first = self.pending.popleft() if self.pending else self.q.get()
        batch = [first]
        if first.opts.seed is not None:
            return batch
        keep: collections.deque[Job] = collections.deque()
        while self.pending:
            j = self.pending.popleft()
            (batch if len(batch) < self.max_batch and j.opts.seed is None and j.key() == first.key()
             else keep).append(j)
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                j = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if j.opts.seed is None and j.key() == first.key() else keep).append(j)
        self.pending = keep
        return batch

    def _loop(self) -> None:
        while True:
            batch = [j for j in self._next_batch() if not j.cancel.is_set()]
            if not batch:
                continue
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
            try:
                results = self.engine.run([j.ids for j in batch], batch[0].opts,
                                          on_text=[j.put for j in batch], cancel=[j.cancel for j in batch],
                                          max_new_tokens=[j.opts.max_new_tokens for j in batch],
                                          stop=[j.opts.stop for j in batch])
            except Exception as e:  # a bug, not the client's fault: each request gets a 500
                log.exception("generation failed")
                results = [e] * len(batch)
            for j, r in zip(batch, results):
                if isinstance(r, Completion):
                    self.stats["cancelled" if r.finish_reason == "cancelled" else "completed"] += 1
                    self.stats["completion_tokens"] += r.completion_tokens
                j.put(r)


# -- responses ------------------------------------------------------------------------------------

def _error_response(status, message, type="invalid_request_error", code=None, param=None):
    from fastapi.responses import JSONResponse
    return JSONResponse(error_body(message, type, code, param), status_code=status)


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _chunk_choice(kind: str, text: str | None, finish: str | None, first: bool = False) -> dict:
    """One streamed choice: chat sends deltas (the first names the role), completions send text."""
    if kind == "chat":
        delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _result(job: Job, receive) -> Completion | Exception | None:
    """A non-streaming request's outcome, or None when its client went away first. Starlette does
    not cancel a handler whose client left, but uvicorn answers a receive() waiting after the body
    with http.disconnect when the connection drops: that cancels the row, as a stream's is."""
    async def gone():
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        while True:
            get = asyncio.ensure_future(job.out.get())
            await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                return None
            if isinstance(item := get.result(), (Completion, Exception)):
                return item
    finally:
        watcher.cancel()
        job.cancel.set()  # no-op when done; stops the row if the client left or this task was cancelled


async def _respond(batcher: Batcher, model_id: str, ids: list[int], opts: SamplingParams, kind: str,
                   stream: bool, include_usage: bool, receive):
    """Queue one request on the batcher and answer it: a JSON body, or SSE chunks as tokens come."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    job = Job(asyncio.get_running_loop(), ids, opts)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    batcher.submit(job)
    if not stream:
        item = await _result(job, receive)
        if item is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        if isinstance(item, Exception):
            raise item
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": item.text}}
        else:
            choice = {"index": 0, "text": item.text}
        choice.update(logprobs=None, finish_reason=item.finish_reason)
        return JSONResponse({"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                             "created": created, "model": model_id, "usage": _usage(item), "choices": [choice]})

    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def sse(choices: list, **extra) -> str:
        body = {"id": rid, "object": chunk_obj, "created": created, "model": model_id, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events():
        try:
            if kind == "chat":
                yield sse([_chunk_choice(kind, "", None, first=True)])
            while True:
                item = await job.out.get()
                if isinstance(item, str):
                    yield sse([_chunk_choice(kind, item, None)])
                elif isinstance(item, Completion):
                    yield sse([_chunk_choice(kind, None if kind == "chat" else "", item.finish_reason)])
                    if include_usage:
                        yield sse([], usage=_usage(item))
                    break
                else:
                    yield f"data: {json.dumps(error_body('internal error', 'server_error'))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client went away (or we are done): stop this row

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@dataclass
class ServeSettings:
    """What create_app needs besides the engine (toucan serve builds it from its options)."""

    model_id: str                   # the one model /v1/models lists; requests must name it
    max_tokens: int                 # a request's max_tokens when it gives none
    repetition_penalty: float       # a request's repetition_penalty when it gives none
    max_tokens_limit: int           # most tokens one request may generate (0 = no limit)
    max_batch_size: int             # most requests decoded together
    batch_wait_s: float             # static batching: how long to wait for more requests
    max_request_bytes: int          # larger bodies get 413 before they are read
    allowed_hosts: Optional[frozenset[str]]  # Host header values answered, None: any (allowed_hosts())


def _options(req: _Common, settings: ServeSettings) -> SamplingParams:
    if req.model != settings.model_id:
        raise APIError(404, f"The model '{req.model}' does not exist (this server has '{settings.model_id}').",
                       code="model_not_found", param="model")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop")
    max_new = req.max_completion_tokens or req.max_tokens or settings.max_tokens
    limit = settings.max_tokens_limit
    # temperature 0 is greedy by the one rule (sampling.is_sampling), as OpenAI has it
    return SamplingParams(
        max_new_tokens=min(max_new, limit) if limit > 0 else max_new,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, do_sample=True,
        repetition_penalty=req.repetition_penalty or settings.repetition_penalty, num_beams=1,
        seed=req.seed, stop=stop, min_new_tokens=req.min_tokens)


def _encode(engine: Engine, prompt: str) -> list[int]:
    try:
        return engine.encode_fitting(prompt)
    except PromptTooLongError as e:  # the engine's check, in OpenAI's words
        raise APIError(400, f"This model's maximum context length is {e.context} tokens. However, "
                            f"your prompt is {'over ' if e.over else ''}{e.tokens} tokens.",
                       code="context_length_exceeded", param="messages") from None


def _chat_ids(engine: Engine, req: ChatRequest, max_new_tokens: int) -> list[int]:
    """Prompt building, history trimming and tokenization: CPU work, run off the event loop."""
    try:
        prompt = request_prompt(engine, req, max_new_tokens)
    except ConfigError as e:
        raise APIError(400, str(e), param="messages") from None
    return _encode(engine, prompt)


def _include_usage(req: _Common) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


# -- the app --------------------------------------------------------------------------------------

class Guard:
    """Host header, API key and body size, checked before FastAPI reads or parses anything.

    A pure ASGI middleware (not @app.middleware, which runs inside Starlette's body handling), so
    a refused request costs nothing: a body over the limit is refused from its Content-Length
    without reading it, and a chunked one as soon as it passes the limit. The body is buffered
    here (at most max_body bytes) and handed on; later receive() calls reach the server itself
    (that is how a JSON request sees its client disconnect)."""

    def __init__(self, app, keys: list[bytes], hosts: frozenset[str] | None, max_body: int):
        self.app, self.keys, self.hosts, self.max_body = app, keys, hosts, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.hosts is not None and host.lower() not in self.hosts:
            # a page on evil.example whose name resolves to 127.0.0.1 sends Host: evil.example:PORT
            return await _error_response(421, f"This server does not answer for host {host[:100]!r} "
                                              "(serve --allowed-hosts adds names).", code="invalid_host")(
                scope, receive, send)
        if self.keys:
            auth = headers.get("authorization", "")
            given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
            # compare_digest against every key: the time taken says nothing about which was close
            if not any([hmac.compare_digest(given, k) for k in self.keys]):
                what = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer KEY)."
                return await _error_response(401, what, code="invalid_api_key")(scope, receive, send)
        too_big = _error_response(413, f"The request body is larger than this server's limit of {self.max_body} "
                                       "bytes (serve --max-request-bytes).", code="request_too_large")
        too_big.headers["connection"] = "close"  # uvicorn then drops the connection, not reading the rest
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await too_big(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


# pydantic's names for union members and validators in an error's location ("str",
# "list[TextPart]", "function-after[...]"): not fields, left out of the `param` we name
_LOC_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[(]")


def _validation_error(errs: list[dict]):
    """One OpenAI-style 400 naming the field: the most specific of pydantic's errors."""
    def loc(e):
        return [str(x) for x in e.get("loc", ())[1:] if not (isinstance(x, str) and _LOC_TAG.search(x))]

    if not errs:
        return _error_response(400, "invalid request body")
    if any(e.get("type") == "json_invalid" for e in errs):
        msg = next(e for e in errs if e.get("type") == "json_invalid").get("msg", "")
        return _error_response(400, f"We could not parse the JSON body of your request ({msg}).")
    best = max(errs, key=lambda e: len(loc(e)))
    where = ".".join(loc(best))
    msg = best.get("msg", "invalid value")
    if best.get("type") == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    elif best.get("type") == "missing" and not where:
        msg = "a JSON object body is required"
    return _error_response(400, f"{where or 'body'}: {msg}", param=where or None)


def _install_guards(app, keys: list[bytes], hosts: frozenset[str] | None, max_body: int) -> None:
    """The Host/key/size guard on every path, and OpenAI-shaped bodies for every error."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app.add_middleware(Guard, keys=keys, hosts=hosts, max_body=max_body)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        return _validation_error(list(exc.errors()))

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return _error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def on_bug(request, exc):
        log.exception("internal error")
        return _error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


def create_app(engine: Engine, settings: ServeSettings, api_keys: list[str] = ()):
    from fastapi import FastAPI

    model_id = settings.model_id
    batcher = Batcher(engine, settings.max_batch_size, settings.batch_wait_s)
    app = FastAPI(title="toucan serve", version="1")
    app.state.batcher = batcher
    _install_guards(app, [k.encode() for k in api_keys if k], settings.allowed_hosts, settings.max_request_bytes)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "toucan"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": batcher.queued(), **batcher.all_stats()}

    # Prompt building and tokenization are CPU work (a long history, a 1 MB prompt): off the event
    # loop, so it keeps answering other clients and /health meanwhile. One worker, not Starlette's
    # 40-thread pool: the SentencePiece tokenizer holds the GIL, and six ~1 MB requests tokenized at
    # once starved the loop (/health took 0.2-1.7 s); one worker leaves the loop half of it.
    prep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="toucan-prep")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(prep, fn, *args)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        opts = _options(req, settings)
        ids = await off_loop(_chat_ids, engine, req, opts.max_new_tokens)
        return await _respond(batcher, model_id, ids, opts, "chat", req.stream, _include_usage(req), request.receive)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        opts = _options(req, settings)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one string (batches of prompts are not supported)", param="prompt")
            prompt = prompt[0]
        ids = await off_loop(_encode, engine, prompt)
        return await _respond(batcher, model_id, ids, opts, "completion", req.stream, _include_usage(req),
                              request.receive)

    return app


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, port: int, extra: list[str] = ()) -> frozenset[str] | None:
    """The Host header values the API bound to host:port answers, or None for any. On a loopback
    bind: localhost, 127.0.0.1 and [::1] (bare or with the port) and `extra` (--allowed-hosts);
    on another bind only when `extra` names some (the key is then the guard: the server cannot
    know its LAN names)."""
    extra = [h.strip().lower() for h in extra if h.strip()]
    if "*" in extra or (not is_loopback(host) and not extra):
        return None
    names = ["localhost", "127.0.0.1", "[::1]"] if is_loopback(host) else []
    if host not in ("0.0.0.0", "::"):
        names.append(f"[{host}]" if ":" in host else host.lower())
    names += extra
    port = f":{port}"
    # "name:port" as given; a bare name is accepted bare and with our port
    return frozenset(n for h in names for n in ((h,) if re.search(r":\d+$", h) else (h, h + port)))


def _key_lines(path: str) -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"--api-key-file {path}: no key in the file (one key per line)")
    return keys


def api_keys_from(api_key: list[str] = (), api_key_file: str | None = None) -> list[str]:
    """--api-key, --api-key-file and TOUCAN_API_KEYS (comma-separated) together. An empty key is
    an error, never "no auth": `--api-key ""` used to switch authentication off."""
    keys = []
    for k in api_key:
        if not k.strip():
            raise ConfigError("--api-key: an empty key would switch authentication off; give a real key, "
                              "or leave --api-key out")
        keys.append(k.strip())
    if api_key_file:
        keys += _key_lines(api_key_file)
    env = os.environ.get("TOUCAN_API_KEYS")
    if env is not None:
        items = [k.strip() for k in env.split(",")]
        if not all(items):
            raise ConfigError("TOUCAN_API_KEYS: an empty key (the variable is empty, or has an empty item "
                              "between commas); unset it for no auth")
        keys += items
    return keys


def check_address(host: str, port: int) -> None:
    """Refuse a port or host that cannot be listened on now, before minutes of model loading."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be between 1 and 65535")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: {getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no error
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def check_serve(*, host: str, port: int, api_key: list[str], api_key_file: str | None, insecure: bool,
                max_request_bytes: int) -> list[str]:
    """Everything about the server's settings that can fail, checked before the model loads
    (the keys, a LAN bind without any, the body limit, host:port free to listen on); returns the keys."""
    keys = api_keys_from(api_key, api_key_file)
    if not is_loopback(host) and not keys and not insecure:
        raise ConfigError(f"--host {host} without an API key would let anyone on the network use the model: "
                          "give --api-key-file, TOUCAN_API_KEYS or --api-key, or --insecure if you really mean it")
    if max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes {max_request_bytes}: must be positive")
    check_address(host, port)
    return keys
