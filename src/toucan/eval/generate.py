"""`toucan eval generate`: answer every eval-set question with a model, through the shared engine.

Each question is asked exactly as a user would ask it in chat (toucan.prompts.build_prompt with
the model's template, no input, no history). Questions are batched in order of prompt length (less
padding per batch) and each answer is appended to answers.jsonl and fsync'd as soon as its batch
finishes, so a killed run loses at most one batch and a rerun skips every question already answered.
The first line of answers.jsonl records the model, the eval set and the generation settings; a
rerun with different settings is refused rather than mixing two kinds of answers in one file.

With --api-url the same questions go to any OpenAI-compatible server (toucan serve, vLLM, a
llama.cpp server, a hosted API) through the official `openai` client, --concurrency requests at
a time, each answer appended as it arrives (resume works the same). By default the exact toucan
prompt goes to /v1/completions, so every server sees the same bytes (it adds BOS itself, as
toucan.data does); --chat sends the question as one user message to /v1/chat/completions for
servers that only speak chat (the server's chat template then builds the prompt).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..config import EvalGenerateConfig, GenerationOptions
from ..engine import Engine
from ..errors import ConfigError, EvalError
from ..fsutil import append_jsonl, check_output, sha256_file
from ..prompts import build_prompt
from .items import CLASSES, load_eval_set, read_records, repair_torn_tail

log = logging.getLogger(__name__)


def generation_options(cfg: EvalGenerateConfig) -> GenerationOptions:
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    return GenerationOptions(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def _endpoint(cfg: EvalGenerateConfig) -> str | None:
    if cfg.api_url is None:
        return None
    return "/v1/chat/completions" if cfg.chat else "/v1/completions"


def _meta(cfg: EvalGenerateConfig, items: list[dict], served: str | None = None) -> dict:
    counts = Counter(i["class"] for i in items)
    name = cfg.model_name or served or Path(cfg.model).resolve().name
    return {"kind": "answers", "model": name, "model_dir": cfg.api_url or str(cfg.model),
            "endpoint": _endpoint(cfg), "template": cfg.template,
            "eval_set": str(cfg.data), "eval_set_sha256": sha256_file(cfg.data),
            "class_counts": {c: counts[c] for c in CLASSES},
            "generation": dataclasses.asdict(generation_options(cfg))}


def _is_answers_file(path: Path) -> bool:
    """Whether `path` is an answers file of `toucan eval generate` (its first line is the answers
    _meta record): only such a file is resumed, repaired or started over without --overwrite."""
    import json

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = f.readline()
        if not line.endswith("\n"):  # torn while the first line was written (as _meta puts kind first)
            return line.startswith('{"_meta": {"kind": "answers"')
        first = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("_meta"), dict) and first["_meta"].get("kind") == "answers"


def _done_ids(cfg: EvalGenerateConfig, meta: dict) -> set[str]:
    """Ids already answered in an existing output (after checking it was made the same way)."""
    out = Path(cfg.output)
    own = _is_answers_file(out)
    # An answers file is resumed by design (or refused below when made another way): only some
    # other file needs --overwrite; an input never.
    check_output(out, overwrite=cfg.overwrite or own, inputs=[p for p in (cfg.data, cfg.model) if p], is_dir=False)
    if not own:  # no file, an empty one, or another file that --overwrite allows replacing
        return set()
    repair_torn_tail(out)
    if out.stat().st_size == 0:  # killed while writing the first line
        return set()
    old, answers = read_records(out, "answers")
    for key in ("model", "endpoint", "template", "eval_set_sha256", "generation"):
        if old.get(key) != meta[key]:
            if cfg.overwrite:
                log.warning("%s was made with a different %s: starting it over (--overwrite)", out, key)
                return set()
            raise EvalError(f"{out} was made with a different {key} ({old.get(key)!r}, now {meta[key]!r}); "
                            "write to a new --output (or pass --overwrite to start it over) instead of mixing answers")
    return {a["id"] for a in answers}


def check_generate(cfg: EvalGenerateConfig) -> None:
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


def api_client(cfg: EvalGenerateConfig):
    from openai import OpenAI

    # the client refuses an empty key; servers without keys (vLLM's default) ignore this one
    key = cfg.api_key or os.environ.get(cfg.api_key_env) or "EMPTY"
    return OpenAI(base_url=cfg.api_url.rstrip("/"), api_key=key, max_retries=cfg.retries, timeout=cfg.timeout)


def _served_model(client, cfg: EvalGenerateConfig) -> str:
    import openai

    if cfg.served_model:
        return cfg.served_model
    try:
        ids = [m.id for m in client.models.list().data]
    except openai.APIError as e:
        raise EvalError(f"--api-url {cfg.api_url}: cannot list its models ({e.__class__.__name__}: {e}); "
                        "name one with --served-model") from None
    if len(ids) != 1:
        raise EvalError(f"--api-url {cfg.api_url} serves {len(ids)} models ({', '.join(ids[:5])}): "
                        "name one with --served-model")
    return ids[0]


def request_fields(opts: GenerationOptions) -> tuple[dict, dict]:
    """(OpenAI fields, extra_body) for the options. Only what differs from the OpenAI defaults is
    sent beyond max_tokens/temperature, so a hosted API is not sent fields it does not know;
    top_k, repetition_penalty and min_tokens are vLLM's and toucan serve's extensions."""
    sample = opts.do_sample and opts.temperature > 0
    kw: dict = {"max_tokens": opts.max_new_tokens, "temperature": opts.temperature if sample else 0.0}
    extra: dict = {}
    if sample:
        kw["top_p"] = opts.top_p
        if opts.top_k:
            extra["top_k"] = opts.top_k
    if opts.seed is not None:
        kw["seed"] = opts.seed
    if opts.stop:
        kw["stop"] = list(opts.stop)
    if opts.repetition_penalty != 1.0:
        extra["repetition_penalty"] = opts.repetition_penalty
    if opts.min_new_tokens:
        extra["min_tokens"] = opts.min_new_tokens
    return kw, extra


def _ask_server(client, cfg: EvalGenerateConfig, model: str, item: dict, kw: dict, extra: dict) -> dict | None:
    """One question to the server: the answer record, or None when its prompt does not fit the
    server's context (it is then missing from the answers, as locally)."""
    import openai

    try:
        if cfg.chat:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": item["question"]}],
                                               extra_body=extra or None, **kw)
            text = r.choices[0].message.content or ""
        else:
            r = client.completions.create(model=model, prompt=build_prompt(item["question"], template=cfg.template),
                                          extra_body=extra or None, **kw)
            text = r.choices[0].text or ""
    except openai.BadRequestError as e:
        if "context" in str(e).lower():
            log.warning("question %s does not fit the server's context: skipped (%s)", item["id"], e)
            return None
        raise EvalError(f"--api-url {cfg.api_url}: question {item['id']} refused ({e})") from None
    except openai.APIError as e:
        raise EvalError(f"--api-url {cfg.api_url}: question {item['id']} failed ({e.__class__.__name__}: {e})") from None
    except (AttributeError, IndexError, TypeError):  # a 200 that is not a completion
        raise EvalError(f"--api-url {cfg.api_url}: question {item['id']}: the reply is not a completion") from None
    usage = getattr(r, "usage", None)
    return {**item, "answer": text.strip(), "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
            "finish_reason": r.choices[0].finish_reason}


def _generate_api(cfg: EvalGenerateConfig, client, model: str, todo: list[dict]) -> tuple[int, int]:
    """Answer `todo` through the server, cfg.concurrency at a time; each answer is appended as it
    arrives. The first failure stops the run (the answers so far are kept; a rerun resumes)."""
    kw, extra = request_fields(generation_options(cfg))
    lock = threading.Lock()
    answered = tokens = 0
    # longest prompts first: the long tail of a concurrent run is then the short questions
    todo = sorted(todo, key=lambda i: -len(i["question"]))
    with tqdm(total=len(todo), desc="generate", unit="q") as bar, \
            ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="toucan-eval") as pool:
        futures = [pool.submit(_ask_server, client, cfg, model, item, kw, extra) for item in todo]
        try:
            for f in as_completed(futures):
                rec = f.result()
                if rec is not None:
                    with lock:
                        append_jsonl(cfg.output, rec)
                    answered += 1
                    tokens += rec["completion_tokens"] or 0
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return answered, tokens


def run_eval_generate(cfg: EvalGenerateConfig) -> int:

    check_generate(cfg)
    items = load_eval_set(cfg.data)
    client = served = None
    if cfg.api_url is not None:
        client = api_client(cfg)
        served = _served_model(client, cfg)
    meta = _meta(cfg, items, served)  # class counts of the whole set: the report counts missing answers against it
    if cfg.limit is not None:
        items = items[: cfg.limit]
    done = _done_ids(cfg, meta)
    todo = [i for i in items if i["id"] not in done]
    if not done:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).unlink(missing_ok=True)
        append_jsonl(cfg.output, {"_meta": meta})
    log.info("%s: %d questions, %d already answered, %d to go", cfg.output, len(items), len(items) - len(todo), len(todo))
    if not todo:
        print(f"{cfg.output}: all {len(items)} questions already answered")
        return 0
    if client is not None:
        answered, tokens = _generate_api(cfg, client, served, todo)
        print(f"answered {answered} questions ({tokens} tokens generated) via {cfg.api_url} -> {cfg.output}")
        return 0

    engine = Engine.from_config(cfg)
    opts = generation_options(cfg)
    prompts = {i["id"]: build_prompt(i["question"], template=cfg.template) for i in todo}
    n_tokens = {k: engine.count_tokens(p) for k, p in prompts.items()}
    too_long = [i for i in todo if n_tokens[i["id"]] >= engine.max_context]
    if too_long:  # not answered, so the report counts them as missing (per class)
        log.warning("%d question(s) do not fit the model's %d-token context and are skipped: %s", len(too_long),
                    engine.max_context, ", ".join(i["id"] for i in too_long[:5]) + (" ..." if len(too_long) > 5 else ""))
    todo = sorted((i for i in todo if n_tokens[i["id"]] < engine.max_context), key=lambda i: n_tokens[i["id"]])
    bs = max(1, cfg.batch_size)
    tokens = 0
    with tqdm(total=len(todo), desc="generate", unit="q") as bar:
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            completions = engine.generate_batch([prompts[i["id"]] for i in batch], opts)
            for item, c in zip(batch, completions):
                append_jsonl(cfg.output, {**item, "answer": c.text.strip(), "prompt_tokens": c.prompt_tokens,
                                          "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason})
                tokens += c.completion_tokens
            bar.update(len(batch))
    print(f"answered {len(todo)} questions ({tokens} tokens generated) -> {cfg.output}")
    return 0
