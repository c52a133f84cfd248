"""`toucan serve`: the OpenAI-compatible API (toucan.serve.api) on the engine, run by uvicorn."""

from __future__ import annotations

import gc
import logging

from ..config import ServeConfig
from ..engine import Engine, model_id
from ..llamacpp import is_gguf
from ..serve.api import ServeSettings, allowed_hosts, check_serve, create_app, is_loopback
from ..serve.engine_process import EngineProcess

log = logging.getLogger(__name__)


def check_options(cfg: ServeConfig) -> list[str]:
    """What can fail about the options, checked before the model loads; returns the API keys."""
    return check_serve(host=cfg.host, port=cfg.port, api_key=cfg.api_key, api_key_file=cfg.api_key_file,
                       insecure=cfg.insecure, max_request_bytes=cfg.max_request_bytes)


def run(cfg: ServeConfig) -> int:
    import uvicorn

    keys = check_options(cfg)
    if not is_loopback(cfg.host) and not keys:
        log.warning("serving on %s with no API key (--insecure): anyone who can reach this port can use the model",
                    cfg.host)
    if cfg.api_key:
        log.info("keys given with --api-key show in `ps`; --api-key-file or TOUCAN_API_KEYS keep them private")
    if cfg.batching == "continuous" and not is_gguf(cfg.model):
        # the model and its batch in a child process: the scheduler then has a GIL of its own
        engine = EngineProcess(cfg.model, max_rows=cfg.max_batch_size, **cfg.engine_options())
    else:  # a .gguf (llama.cpp), or today's static batching (bench/serve.py compares the two)
        engine = Engine.from_dir(cfg.model, **cfg.engine_options())
        engine.continuous = False
    name = cfg.model_name or model_id(cfg.model)
    settings = ServeSettings(model_id=name, max_tokens=cfg.max_tokens, repetition_penalty=cfg.repetition_penalty,
                             max_tokens_limit=cfg.max_tokens_limit, max_batch_size=cfg.max_batch_size,
                             batch_wait_s=cfg.batch_wait_ms / 1000, max_request_bytes=cfg.max_request_bytes,
                             allowed_hosts=allowed_hosts(cfg.host, cfg.port, cfg.allowed_hosts))
    app = create_app(engine, settings, keys)
    log.info("toucan serve: http://%s:%d/v1 (model %s, %s)", cfg.host, cfg.port, name,
             f"{len(keys)} API key(s)" if keys else "no API key")
    # the server's long-lived objects (torch, transformers, the app) out of the collector's full
    # passes: each took ~230 ms with the GIL held, stalling every stream (engine_process freezes too)
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        if isinstance(engine, EngineProcess):
            engine.close()
    return 0
