"""`toucan eval generate`: answer every eval-set question with a local model or an OpenAI-compatible
server (toucan.eval.generate), resuming an answers file made the same way."""

from __future__ import annotations

import logging
import os

from ..config import EvalGenerateConfig
from ..engine import Engine, model_id
from ..errors import ConfigError
from ..eval.generate import (Server, answers_meta, api_client, done_ids, generate_api, generate_local,
                             served_model, start_answers)
from ..eval.items import load_eval_set

log = logging.getLogger(__name__)


def check_options(cfg: EvalGenerateConfig) -> None:
    if (cfg.model is None) == (cfg.api_url is None):
        raise ConfigError("eval generate: give exactly one of --model (a local model) or --api-url (a server)")
    if cfg.api_url is None:
        for name in ("served_model", "api_key", "chat"):
            if getattr(cfg, name):
                raise ConfigError(f"eval generate: --{name.replace('_', '-')} needs --api-url")
        return
    if not cfg.api_url.startswith(("http://", "https://")):
        raise ConfigError(f"--api-url {cfg.api_url!r}: expected an http:// or https:// base URL")
    if cfg.num_beams > 1:
        raise ConfigError("--num-beams > 1: OpenAI-compatible servers do not take beam search; use a local --model")
    if cfg.concurrency < 1:
        raise ConfigError(f"--concurrency must be at least 1, got {cfg.concurrency}")


def run(cfg: EvalGenerateConfig) -> int:
    check_options(cfg)
    items = load_eval_set(cfg.data)
    params = cfg.sampling_params()
    server = client = served = None
    if cfg.api_url is not None:
        server = Server(url=cfg.api_url, chat=cfg.chat, concurrency=cfg.concurrency, timeout=cfg.timeout,
                        retries=cfg.retries)
        client = api_client(server, cfg.api_key or os.environ.get(cfg.api_key_env))
        served = cfg.served_model or served_model(client, cfg.api_url)
    # class counts of the whole set: the report counts missing answers against it
    meta = answers_meta(model_name=cfg.model_name or served or model_id(cfg.model),
                        model_dir=cfg.api_url or str(cfg.model), server=server, template=cfg.template,
                        eval_set=cfg.data, items=items, params=params)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    done = done_ids(cfg.output, meta, overwrite=cfg.overwrite, inputs=[cfg.data, cfg.model])
    todo = [i for i in items if i["id"] not in done]
    if not done:
        start_answers(cfg.output, meta)
    log.info("%s: %d questions, %d already answered, %d to go", cfg.output, len(items), len(items) - len(todo), len(todo))
    if not todo:
        print(f"{cfg.output}: all {len(items)} questions already answered")
        return 0
    if server is not None:
        answered, tokens = generate_api(client, server, served, todo, params=params, template=cfg.template,
                                        output=cfg.output)
        print(f"answered {answered} questions ({tokens} tokens generated) via {cfg.api_url} -> {cfg.output}")
        return 0
    engine = Engine.from_dir(cfg.model, **cfg.engine_options())
    answered, tokens = generate_local(engine, todo, params=params, template=cfg.template, batch_size=cfg.batch_size,
                                      output=cfg.output)
    print(f"answered {answered} questions ({tokens} tokens generated) -> {cfg.output}")
    return 0
