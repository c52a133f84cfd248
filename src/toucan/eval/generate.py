"""`toucan eval generate` (the command is toucan.commands.eval_generate): answer every eval-set
question with a model, through the shared engine.

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
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..engine import Engine
from ..errors import EvalError
from ..fsutil import append_jsonl, check_output, sha256_file
from ..prompts import build_prompt
from ..sampling import SamplingParams, is_sampling
from .items import CLASSES, read_records, repair_torn_tail

log = logging.getLogger(__name__)


@dataclass
class Server:
    """An OpenAI-compatible server to ask instead of a local model (--api-url and its options)."""

    url: str            # base URL, e.g. http://127.0.0.1:8000/v1
    chat: bool          # /v1/chat/completions (the server builds the prompt) instead of /v1/completions
    concurrency: int    # requests in flight at once
    timeout: float      # seconds before one request times out
    retries: int        # retries per request (the openai client's)

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


def answers_meta(*, model_name: str, model_dir: str, server: Server | None, template: str, eval_set,
                 items: list[dict], params: SamplingParams) -> dict:
    """The answers file's first line: what a rerun must match to resume it."""
    counts = Counter(i["class"] for i in items)
    return {"kind": "answers", "model": model_name, "model_dir": model_dir,
            "endpoint": server.endpoint if server else None, "template": template,
            "eval_set": str(eval_set), "eval_set_sha256": sha256_file(eval_set),
            "class_counts": {c: counts[c] for c in CLASSES},
            "generation": dataclasses.asdict(params)}


def _is_answers_file(path: Path) -> bool:
    """Whether `path` is an answers file of `toucan eval generate` (its first line is the answers
    meta record): only such a file is resumed, repaired or started over without --overwrite."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = f.readline()
        if not line.endswith("\n"):  # torn while the first line was written (as the meta puts kind first)
            return line.startswith('{"_meta": {"kind": "answers"')
        first = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("_meta"), dict) and first["_meta"].get("kind") == "answers"


def done_ids(output, meta: dict, *, overwrite: bool, inputs: list) -> set[str]:
    """Ids already answered in an existing output (after checking it was made the same way)."""
    out = Path(output)
    own = _is_answers_file(out)
    # An answers file is resumed by design (or refused below when made another way): only some
    # other file needs --overwrite; an input never.
    check_output(out, overwrite=overwrite or own, inputs=[p for p in inputs if p], is_dir=False)
    if not own:  # no file, an empty one, or another file that --overwrite allows replacing
        return set()
    repair_torn_tail(out)
    if out.stat().st_size == 0:  # killed while writing the first line
        return set()
    old, answers = read_records(out, "answers")
    for key in ("model", "endpoint", "template", "eval_set_sha256", "generation"):
        if old.get(key) != meta[key]:
            if overwrite:
                log.warning("%s was made with a different %s: starting it over (--overwrite)", out, key)
                return set()
            raise EvalError(f"{out} was made with a different {key} ({old.get(key)!r}, now {meta[key]!r}); "
                            "write to a new --output (or pass --overwrite to start it over) instead of mixing answers")
    return {a["id"] for a in answers}


def start_answers(output, meta: dict) -> None:
    """A new answers file holding only its meta line."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).unlink(missing_ok=True)
    append_jsonl(output, {"_meta": meta})


def api_client(server: Server, api_key: str | None):
    from openai import OpenAI

    # the client refuses an empty key; servers without keys (vLLM's default) ignore this one
    return OpenAI(base_url=server.url.rstrip("/"), api_key=api_key or "EMPTY", max_retries=server.retries,
                  timeout=server.timeout)


def served_model(client, url: str) -> str:
    """The server's only model (/v1/models)."""
    import openai

    try:
        ids = [m.id for m in client.models.list().data]
    except openai.APIError as e:
        raise EvalError(f"--api-url {url}: cannot list its models ({e.__class__.__name__}: {e}); "
                        "name one with --served-model") from None
    if len(ids) != 1:
        raise EvalError(f"--api-url {url} serves {len(ids)} models ({', '.join(ids[:5])}): "
                        "name one with --served-model")
    return ids[0]


def request_fields(opts: SamplingParams) -> tuple[dict, dict]:
    """(OpenAI fields, extra_body) for the options. Only what differs from the OpenAI defaults is
    sent beyond max_tokens/temperature, so a hosted API is not sent fields it does not know;
    top_k, repetition_penalty and min_tokens are vLLM's and toucan serve's extensions."""
    sample = is_sampling(opts)
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


def _ask_server(client, server: Server, model: str, template: str, item: dict, kw: dict,
                extra: dict) -> dict | None:
    """One question to the server: the answer record, or None when its prompt does not fit the
    server's context (it is then missing from the answers, as locally)."""
    import openai

    try:
        if server.chat:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": item["question"]}],
                                               extra_body=extra or None, **kw)
            text = r.choices[0].message.content or ""
        else:
            r = client.completions.create(model=model, prompt=build_prompt(item["question"], template=template),
                                          extra_body=extra or None, **kw)
            text = r.choices[0].text or ""
    except openai.BadRequestError as e:
        if "context" in str(e).lower():
            log.warning("question %s does not fit the server's context: skipped (%s)", item["id"], e)
            return None
        raise EvalError(f"--api-url {server.url}: question {item['id']} refused ({e})") from None
    except openai.APIError as e:
        raise EvalError(f"--api-url {server.url}: question {item['id']} failed ({e.__class__.__name__}: {e})") from None
    except (AttributeError, IndexError, TypeError):  # a 200 that is not a completion
        raise EvalError(f"--api-url {server.url}: question {item['id']}: the reply is not a completion") from None
    usage = getattr(r, "usage", None)
    return {**item, "answer": text.strip(), "prompt_tokens": getattr(usage, "prompt_tokens", None),
            "completion_tokens": getattr(usage, "completion_tokens", None),
            "finish_reason": r.choices[0].finish_reason}


def generate_api(client, server: Server, model: str, todo: list[dict], *, params: SamplingParams,
                 template: str, output) -> tuple[int, int]:
    """Answer `todo` through the server, server.concurrency at a time; each answer is appended to
    `output` as it arrives. The first failure stops the run (the answers so far are kept; a rerun
    resumes). Returns (questions answered, tokens generated)."""
    kw, extra = request_fields(params)
    lock = threading.Lock()
    answered = tokens = 0
    # longest prompts first: the long tail of a concurrent run is then the short questions
    todo = sorted(todo, key=lambda i: -len(i["question"]))
    with tqdm(total=len(todo), desc="generate", unit="q") as bar, \
            ThreadPoolExecutor(max_workers=server.concurrency, thread_name_prefix="toucan-eval") as pool:
        futures = [pool.submit(_ask_server, client, server, model, template, item, kw, extra) for item in todo]
        try:
            for f in as_completed(futures):
                rec = f.result()
                if rec is not None:
                    with lock:
                        append_jsonl(output, rec)
                    answered += 1
                    tokens += rec["completion_tokens"] or 0
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return answered, tokens


def generate_local(engine: Engine, todo: list[dict], *, params: SamplingParams, template: str,
                   batch_size: int, output) -> tuple[int, int]:
    """Answer `todo` with the engine, batch_size questions per generate call in order of prompt
    length; each batch's answers are appended to `output` as it finishes. A question that does
    not fit the context is skipped with a warning (the report counts it missing). Returns
    (questions answered, tokens generated)."""
    prompts = {i["id"]: build_prompt(i["question"], template=template) for i in todo}
    n_tokens = {k: engine.count_tokens(p) for k, p in prompts.items()}
    too_long = [i for i in todo if not engine.fits(n_tokens[i["id"]])]
    if too_long:  # not answered, so the report counts them as missing (per class)
        log.warning("%d question(s) do not fit the model's %d-token context and are skipped: %s", len(too_long),
                    engine.max_context, ", ".join(i["id"] for i in too_long[:5]) + (" ..." if len(too_long) > 5 else ""))
    todo = sorted((i for i in todo if engine.fits(n_tokens[i["id"]])), key=lambda i: n_tokens[i["id"]])
    bs = max(1, batch_size)
    tokens = 0
    with tqdm(total=len(todo), desc="generate", unit="q") as bar:
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            completions = engine.generate_batch([prompts[i["id"]] for i in batch], params)
            for item, c in zip(batch, completions):
                append_jsonl(output, {**item, "answer": c.text.strip(), "prompt_tokens": c.prompt_tokens,
                                      "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason})
                tokens += c.completion_tokens
            bar.update(len(batch))
    return len(todo), tokens
