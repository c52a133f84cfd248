"""`toucan serve`: an OpenAI-compatible API (FastAPI + uvicorn) on the engine.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each with and without
`stream: true`, SSE ending in `data: [DONE]`), GET /health (queue and batch counters).

* Keys: with --api-key (or TOUCAN_API_KEYS) every path, /health and unknown ones included, needs
  `Authorization: Bearer KEY`; otherwise 401 with an OpenAI-style error body.
* Errors are OpenAI-shaped {"error": {"message", "type", "param", "code"}}: bad JSON or bad fields
  400, a prompt that does not fit the context 400 (code context_length_exceeded), unknown model 404.
* Chat prompts: toucan.prompts renders the messages (a leading system message replaces the
  template's header line; a system message anywhere else is a 400). When a conversation does not
  fit context - max_tokens, its oldest turns are dropped, as in `toucan chat`.
* Concurrency: requests are *batched on the engine*. One worker thread takes the oldest waiting
  request, waits batch_wait_ms for more, and decodes up to max_batch_size requests with the same
  sampling settings (temperature, top_p, top_k, repetition penalty) in one left-padded `generate`;
  each row keeps its own max_tokens and stop strings and streams on its own. Requests with a seed
  run alone (the seed must own the RNG). This is static batching: a request that arrives during a
  batch waits for it to end (bench/serve.py measures the effect on time to first token).
* A client that disconnects mid-stream cancels its row (Starlette cancels the response task; the
  row's cancel event stops it at the next token, other rows go on).

Extensions beyond OpenAI's fields (as vLLM has them): top_k, repetition_penalty, min_tokens.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationOptions, ServeConfig
from ..engine import Completion, Engine
from ..errors import ConfigError

log = logging.getLogger(__name__)


# -- request bodies -------------------------------------------------------------------------------

class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported (must be 0)")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]


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

    def __init__(self, loop: asyncio.AbstractEventLoop, ids: list[int], opts: GenerationOptions):
        self.loop, self.ids, self.opts = loop, ids, opts
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def key(self):
        o = self.opts
        sample = o.do_sample and o.temperature > 0
        return (sample, o.repetition_penalty, o.min_new_tokens) + ((o.temperature, o.top_p, o.top_k) if sample else ())

    def put(self, item) -> None:  # called from the worker thread
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher:
    def __init__(self, engine: Engine, max_batch: int, wait_s: float):
        self.engine, self.max_batch, self.wait_s = engine, max(1, max_batch), wait_s
        self.q: queue.Queue[Job] = queue.Queue()
        self.pending: collections.deque[Job] = collections.deque()  # taken but not batchable yet
        self.stats = collections.Counter()
        threading.Thread(target=self._loop, name="toucan-batcher", daemon=True).start()

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


async def _respond(batcher: Batcher, model_id: str, ids: list[int], opts: GenerationOptions, kind: str,
                   stream: bool, include_usage: bool):
    """Queue one request on the batcher and answer it: a JSON body, or SSE chunks as tokens come."""
    from fastapi.responses import JSONResponse, StreamingResponse

    job = Job(asyncio.get_running_loop(), ids, opts)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    batcher.submit(job)
    if not stream:
        try:
            while not isinstance(item := await job.out.get(), (Completion, Exception)):
                pass
        finally:
            job.cancel.set()  # no-op when done; stops the row if this request was cancelled
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


def _options(req: _Common, model_id: str, cfg: ServeConfig) -> GenerationOptions:
    if req.model != model_id:
        raise APIError(404, f"The model '{req.model}' does not exist (this server has '{model_id}').",
                       code="model_not_found", param="model")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop")
    return GenerationOptions(
        max_new_tokens=req.max_completion_tokens or req.max_tokens or cfg.max_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, do_sample=req.temperature > 0,
        repetition_penalty=req.repetition_penalty or cfg.repetition_penalty, num_beams=1,
        seed=req.seed, stop=stop, min_new_tokens=req.min_tokens)


def _encode(engine: Engine, prompt: str) -> list[int]:
    ids = engine.encode(prompt)
    if len(ids) >= engine.max_context:
        raise APIError(400, f"This model's maximum context length is {engine.max_context} tokens. However, "
                            f"your prompt is {len(ids)} tokens.", code="context_length_exceeded",
                       param="messages")
    return ids


def _include_usage(req: _Common) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


# -- the app --------------------------------------------------------------------------------------

def _install_guards(app, keys: list[bytes]) -> None:
    """The API-key check on every path, and OpenAI-shaped bodies for every error."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if keys:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
            # compare_digest against every key: the time taken says nothing about which was close
            if not any([hmac.compare_digest(given, k) for k in keys]):
                what = "Incorrect API key provided." if given else "Missing API key (Authorization: Bearer KEY)."
                return _error_response(401, what, code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return _error_response(400, f"We could not parse the JSON body of your request ({first.get('msg', '')}).")
        loc = ".".join(str(x) for x in first.get("loc", ())[1:])
        return _error_response(400, f"{loc}: {first.get('msg', 'invalid value')}", param=loc or None)

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


def create_app(engine: Engine, cfg: ServeConfig, api_keys: list[str] = ()):
    from fastapi import FastAPI

    model_id = cfg.model_name or os.path.basename(os.path.normpath(cfg.model))
    batcher = Batcher(engine, cfg.max_batch_size, cfg.batch_wait_ms / 1000)
    app = FastAPI(title="toucan serve", version="1")
    app.state.batcher = batcher
    _install_guards(app, [k.encode() for k in api_keys if k])

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "toucan"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": batcher.q.qsize() + len(batcher.pending),
                **batcher.stats}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        opts = _options(req, model_id, cfg)
        try:
            prompt = request_prompt(engine, req, opts.max_new_tokens)
        except ConfigError as e:
            raise APIError(400, str(e), param="messages") from None
        return await _respond(batcher, model_id, _encode(engine, prompt), opts, "chat", req.stream,
                              _include_usage(req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        opts = _options(req, model_id, cfg)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "prompt: give one string (batches of prompts are not supported)", param="prompt")
            prompt = prompt[0]
        return await _respond(batcher, model_id, _encode(engine, prompt), opts, "completion", req.stream,
                              _include_usage(req))

    return app


def api_keys_from(cfg: ServeConfig) -> list[str]:
    env = [k.strip() for k in os.environ.get("TOUCAN_API_KEYS", "").split(",") if k.strip()]
    return list(cfg.api_key) + env


def run_serve(cfg: ServeConfig) -> int:
    import uvicorn

    keys = api_keys_from(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not keys:
        log.warning("serving on %s with no API key: anyone who can reach this port can use the model", cfg.host)
    engine = Engine.from_config(cfg)
    app = create_app(engine, cfg, keys)
    log.info("toucan serve: http://%s:%d/v1 (model %s, %s)", cfg.host, cfg.port,
             cfg.model_name or os.path.basename(os.path.normpath(cfg.model)),
             f"{len(keys)} API key(s)" if keys else "no API key")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0
