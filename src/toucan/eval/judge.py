"""`toucan eval judge`: score answers with BELLE's judge prompts on any OpenAI-compatible endpoint.

Flow: answers.jsonl -> one judge message per answer (toucan.prompts.judge_message, BELLE's exact
text) -> replies, from the on-disk cache or from the endpoint -> parse.parse_score -> scores.jsonl.

The cache is what makes runs cheap and restartable. It is a JSON Lines file keyed by
sha256(judge model, judge message); each reply is appended and fsync'd BEFORE it is counted, so a
run killed with SIGKILL and restarted re-sends only what was in flight at the kill (at most
--concurrency messages) and a second model whose answer is the same text costs nothing. The default
cache lives beside --output, so every model judged into one folder shares it. As the key is only
(model, message), changing --temperature or --max-tokens reuses earlier replies: use another --cache.

Transport is the official `openai` client: it already retries 408/409/429/5xx, timeouts and
connection errors with exponential backoff and jitter (and honours Retry-After), so `--retries` is
its max_retries. Requests run on a thread pool of --concurrency workers (the sync client is
thread-safe). Errors that retrying cannot fix (bad key, unknown model, endpoint unreachable) stop
the run with an EvalError; an item that still fails after its retries is recorded as "error",
counted as missing in the report, and retried on the next run. A malformed 200 reply (an HTML page,
broken JSON, {}, no choices), which the client does not retry, is retried here on the same
schedule and then counts as such a failure. After --max-consecutive-failures failures in a row
(a dead or hanging judge) nothing more is sent: the scores so far are written, the summary
printed, and the run ends with an EvalError.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import EvalError
from ..fsutil import append_jsonl, atomic_write_text, read_jsonl, sha256_file
from ..prompts import judge_message
from .items import CLASSES, load_judge_prompts, normalize_class, read_records, repair_torn_tail
from .parse import parse_score
from .reference import judge_reference

log = logging.getLogger(__name__)


class JudgeCache:
    """Append-only JSON Lines: {key, judge_model, reply, usage}. Safe for the pool's threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_torn_tail(self.path)
        rows = read_jsonl(self.path, tolerate_torn_tail=True) if self.path.is_file() else []
        self.entries = {r["key"]: r for r in rows}
        self.lock = threading.Lock()

    @staticmethod
    def key(judge_model: str, message: str) -> str:
        return hashlib.sha256(json.dumps([judge_model, message], ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, judge_model: str, reply: str, usage: dict | None) -> dict:
        rec = {"key": key, "judge_model": judge_model, "reply": reply, "usage": usage}
        with self.lock:
            append_jsonl(self.path, rec)  # on disk (fsync'd) before anyone counts it
            self.entries[key] = rec
        return rec


@dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible judge and how to ask it. No defaults here: they are the `eval judge`
    flags' (toucan.config.EvalJudgeConfig), which build it."""

    model: str
    url: str | None                 # None: the openai client's default ($OPENAI_BASE_URL or OpenAI)
    api_key_env: str                # the variable holding the key, named so errors can say which
    temperature: float
    max_tokens: int | None
    concurrency: int
    retries: int
    timeout: float
    max_consecutive_failures: int   # 0: never stop


def _client(ep: JudgeEndpoint):
    from openai import OpenAI

    key = os.environ.get(ep.api_key_env)
    if not key:
        if ep.url is None:
            raise EvalError(f"no API key: set ${ep.api_key_env} (or --api-key-env VAR), or give --judge-url "
                            "for a local endpoint")
        key = "EMPTY"  # local servers without keys; the client refuses an empty key
    return OpenAI(base_url=ep.url, api_key=key, max_retries=ep.retries, timeout=ep.timeout)


class MalformedReply(Exception):
    """A 200 reply that is not a chat completion (an HTML page, broken JSON, {}, no choices): the
    openai client hands such bodies back as they are (a str, a list, a model with None fields)."""


def _ask(client, ep: JudgeEndpoint, message: str) -> tuple[str, dict | None]:
    kw = {"max_tokens": ep.max_tokens} if ep.max_tokens else {}
    try:
        r = client.chat.completions.create(model=ep.model, temperature=ep.temperature,
                                           messages=[{"role": "user", "content": message}], **kw)
    except ValueError as e:  # json.JSONDecodeError: a body announced as JSON that is not
        raise MalformedReply(f"reply is not valid JSON ({e})") from None
    return _completion_content(r)


def _completion_content(r) -> tuple[str, dict | None]:
    """(reply text, usage) of a chat completion, or MalformedReply saying what is wrong with it."""
    if isinstance(r, (str, bytes, list, dict)) or r is None:
        shown = " ".join(str(r).split())[:80]
        raise MalformedReply(f"reply is not a chat completion ({type(r).__name__}: {shown!r})")
    choices = getattr(r, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedReply(f"reply has no choices (choices={choices!r})")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise MalformedReply("reply's first choice has no message")
    content = getattr(message, "content", None)  # None is legal (a refusal): no score in it
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"reply content is {type(content).__name__}, not text")
    usage, u = None, getattr(r, "usage", None)
    if u is not None:
        usage = {k: v if isinstance(v := getattr(u, k, None), int) else 0  # a sloppy server's null: 0
                 for k in ("prompt_tokens", "completion_tokens")}
    return content or "", usage


def _backoff(attempt: int) -> float:
    """Seconds before re-asking after a malformed reply: the openai client's own schedule
    (0.5 s doubling, at most 8 s), which it applies to 429/5xx but not to a 200 it cannot read."""
    return min(0.5 * 2 ** attempt, 8.0)


def fetch_replies(messages: list[str], ep: JudgeEndpoint, cache: JudgeCache) -> tuple[list, list, dict]:
    """For each message its cache record (cached, or asked now) or None, and its error (after
    retries) or None; and this run's spend."""
    import openai

    keys = [JudgeCache.key(ep.model, m) for m in messages]
    todo = {k: m for k, m in zip(keys, messages) if cache.get(k) is None}  # identical messages: asked once
    spend = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cache_hits": len(set(keys)) - len(todo),
             "stopped": None}
    errors: dict[str, str] = {}
    log.info("judge %s: %d messages, %d in the cache (%s), %d to ask", ep.model, len(set(keys)),
             spend["cache_hits"], cache.path, len(todo))
    if not todo:
        spend["failed"] = 0
        return [cache.get(k) for k in keys], [None] * len(keys), spend
    client = _client(ep)
    stop = threading.Event()  # set after too many failures in a row: no new requests
    lock = threading.Lock()
    in_a_row = 0

    def ask(k: str) -> str | None:
        """The item's error after its retries, or None once its reply is in the cache."""
        for attempt in range(ep.retries + 1):
            try:
                reply, usage = _ask(client, ep, todo[k])
                break
            except MalformedReply as e:
                if attempt == ep.retries or stop.is_set():
                    return f"malformed reply after {ep.retries} retries: {e}"
                stop.wait(_backoff(attempt))
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                raise EvalError(f"judge {ep.model} at {ep.url or 'the default endpoint'}: {e}") from None
            except openai.APITimeoutError as e:
                return f"timeout after {ep.retries} retries: {e}"
            except openai.APIConnectionError as e:
                raise EvalError(f"cannot reach the judge at {ep.url or 'the default endpoint'} "
                                f"after {ep.retries} retries: {e}") from None
            except openai.APIError as e:
                return f"{type(e).__name__}: {e}"
        cache.put(k, ep.model, reply, usage)
        return None

    def work(k: str) -> str | None:
        nonlocal in_a_row
        if stop.is_set():  # queued before the stop: never sent
            return f"not asked: {spend['stopped']}"
        err = ask(k)
        # Counted here, in the worker, before it takes its next item: counted by the main thread,
        # a fast-failing judge let the pool send several more requests before the stop was seen.
        with lock:
            in_a_row = 0 if err is None else in_a_row + 1
            if err is not None and ep.max_consecutive_failures and not stop.is_set() \
                    and in_a_row >= ep.max_consecutive_failures:
                # a dead or hanging judge would otherwise cost (retries + 1) x timeout per item
                spend["stopped"] = (f"stopped after {in_a_row} judge requests in a row failed "
                                    f"(last: {' '.join(err.split())[:200]})")
                stop.set()
        return err

    pool = cf.ThreadPoolExecutor(max_workers=max(1, ep.concurrency), thread_name_prefix="judge")
    cancelled = False
    try:
        futures = {pool.submit(work, k): k for k in todo}
        for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="judge", unit="msg"):
            k = futures[fut]
            err = f"not asked: {spend['stopped']}" if fut.cancelled() else fut.result()
            if err is not None:
                errors[k] = err
                if stop.is_set() and not cancelled:  # once: what has not started is never sent
                    cancelled = True
                    for f in futures:  # (what is in flight ends)
                        f.cancel()
                continue
            spend["calls"] += 1
            usage = cache.get(k)["usage"] or {}
            spend["prompt_tokens"] += usage.get("prompt_tokens") or 0
            spend["completion_tokens"] += usage.get("completion_tokens") or 0
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    spend["failed"] = sum(not e.startswith("not asked") for e in errors.values())
    return [cache.get(k) for k in keys], [errors.get(k) for k in keys], spend


def llm_scores(answers: list[dict], ep: JudgeEndpoint, prompts: str, cache_file: str | os.PathLike,
               out_of_range: str = "reject") -> tuple[list[dict], dict]:
    """Each answer with its judge score (BELLE's per-class judge prompts from `prompts`), and the spend."""
    if not prompts:
        raise EvalError("the LLM judge needs --prompts (BELLE's eval_prompt.json); or use --judge reference")
    by_class = load_judge_prompts(prompts)
    messages = [judge_message(by_class[a["class"]], a["question"], a["answer"], a["std_answer"], a["class"])
                for a in answers]
    cache = JudgeCache(cache_file)
    records, errors, spend = fetch_replies(messages, ep, cache)
    scored, table_tokens = [], 0
    for a, rec, err in zip(answers, records, errors):
        if rec is None:
            scored.append({**a, "score": None, "status": "error", "value": None, "reply": None, "error": err})
            continue
        p = parse_score(rec["reply"], out_of_range)
        scored.append({**a, "score": p.score, "status": p.status, "value": p.value, "reply": rec["reply"],
                       "usage": rec["usage"]})
        table_tokens += sum((rec["usage"] or {}).values())
    spend["tokens_of_all_replies"] = table_tokens  # what the whole table cost, cached or not
    spend["cache"] = str(cache.path)
    return scored, spend


def cache_path(cache: str | None, output: str | os.PathLike) -> Path:
    """The judge cache: `cache`, or judge_cache.jsonl beside the scores file."""
    return Path(cache) if cache else Path(output).parent / "judge_cache.jsonl"


def scores_of(path: str | os.PathLike, answers: str | os.PathLike) -> bool:
    """Whether `path` is a scores file this command wrote for the same answers file: rerunning the
    judge to retry failed items replaces it by design, without --overwrite."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.loads(f.readline()).get("_meta") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return meta.get("kind") == "scores" and meta.get("answers") == str(answers)


def judge_answers(data: str, output: str, method: str, ep: JudgeEndpoint | None,
                  prompts: str | None = None, cache: str | os.PathLike | None = None,
                  out_of_range: str = "reject") -> tuple[dict, list[dict], dict | None]:
    """Score the answers file `data` into the scores file `output` (atomically): method "llm" asks
    `ep` (replies cached in `cache`), "reference" scores offline (`ep` unused). Returns (answers' meta, scored
    items, spend or None)."""
    meta, answers = read_records(data, "answers")
    for a in answers:
        a["class"] = normalize_class(a["class"])
        if a["class"] not in CLASSES:
            raise EvalError(f"{data}: item {a.get('id')}: unknown class {a['class']!r}")
    judge = {"kind": method, "comparable_with_llm_judge": method == "llm"}
    if method == "reference":
        scored = [{**a, **judge_reference(a)} for a in tqdm(answers, desc="rouge-l", unit="item")]
        judge["method"] = "character-level ROUGE-L F1 against std_answer (rouge-score)"
        spend = None
    else:
        scored, spend = llm_scores(answers, ep, prompts, cache_path(cache, output), out_of_range)
        judge.update(model=ep.model, url=ep.url, temperature=ep.temperature,
                     max_tokens=ep.max_tokens, out_of_range=out_of_range, prompts=prompts,
                     prompts_sha256=sha256_file(prompts))
    out_meta = {**meta, "kind": "scores", "answers": str(data), "judge": judge, "spend": spend}
    lines = [json.dumps({"_meta": out_meta}, ensure_ascii=False)]
    lines += [json.dumps(s, ensure_ascii=False) for s in sorted(scored, key=lambda s: s["index"])]
    atomic_write_text(output, "\n".join(lines) + "\n")
    return meta, scored, spend
