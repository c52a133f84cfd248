"""`toucan web`: the Gradio chat page (toucan.serve.web) on the engine, bound to --host:--port."""

from __future__ import annotations

import logging

from ..config import WebConfig
from ..engine import Engine, model_id
from ..serve.web import LOOPBACK, build_app, check_bind, launch

log = logging.getLogger(__name__)


def run(cfg: WebConfig) -> int:
    auth = check_bind(cfg.host, cfg.auth, cfg.insecure)
    engine = Engine.from_dir(cfg.model, **cfg.engine_options())
    app = build_app(engine, cfg.sampling_params(), model_name=model_id(cfg.model), concurrency=cfg.concurrency)
    if cfg.host not in LOOPBACK:
        log.warning("serving the chat page on %s (%s)", cfg.host, "with login" if auth else "NO LOGIN: --insecure")
    launch(app, host=cfg.host, port=cfg.port, auth=auth, login_attempts=cfg.login_attempts,
           login_lockout=cfg.login_lockout)
    return 0
