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
counted as missing in the report, and retried on the next run.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from tqdm import tqdm

from ..config import EvalJudgeConfig
from ..errors import EvalError
from ..fsutil import append_jsonl, atomic_write_text, read_jsonl, sha256_file
from ..prompts import judge_message
from .items import CLASSES, load_judge_prompts, normalize_class, read_records, repair_torn_tail
from .parse import parse_score

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


def _client(cfg: EvalJudgeConfig):
    from openai import OpenAI

    key = os.environ.get(cfg.api_key_env)
    if not key:
        if cfg.judge_url is None:
            raise EvalError(f"no API key: set ${cfg.api_key_env} (or --api-key-env VAR), or give --judge-url "
                            "for a local endpoint")
        key = "EMPTY"  # local servers without keys; the client refuses an empty key
    return OpenAI(base_url=cfg.judge_url, api_key=key, max_retries=cfg.retries, timeout=cfg.timeout)


def _ask(client, cfg: EvalJudgeConfig, message: str) -> tuple[str, dict | None]:
    kw = {"max_tokens": cfg.max_tokens} if cfg.max_tokens else {}
    r = client.chat.completions.create(model=cfg.judge_model, temperature=cfg.temperature,
                                       messages=[{"role": "user", "content": message}], **kw)
    usage = None
    if r.usage is not None:
        usage = {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
    return r.choices[0].message.content or "", usage


def fetch_replies(messages: list[str], cfg: EvalJudgeConfig, cache: JudgeCache) -> tuple[list, list, dict]:
    """For each message its cache record (cached, or asked now) or None, and its error (after
    retries) or None; and this run's spend."""
    import openai

    keys = [JudgeCache.key(cfg.judge_model, m) for m in messages]
    todo = {k: m for k, m in zip(keys, messages) if cache.get(k) is None}  # identical messages: asked once
    spend = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cache_hits": len(set(keys)) - len(todo)}
    errors: dict[str, str] = {}
    log.info("judge %s: %d messages, %d in the cache (%s), %d to ask", cfg.judge_model, len(set(keys)),
             spend["cache_hits"], cache.path, len(todo))
    if todo:
        client = _client(cfg)

        def work(k: str) -> None:
            reply, usage = _ask(client, cfg, todo[k])
            cache.put(k, cfg.judge_model, reply, usage)

        pool = cf.ThreadPoolExecutor(max_workers=max(1, cfg.concurrency), thread_name_prefix="judge")
        try:
            futures = {pool.submit(work, k): k for k in todo}
            for fut in tqdm(cf.as_completed(futures), total=len(futures), desc="judge", unit="msg"):
                k = futures[fut]
                try:
                    fut.result()
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                    raise EvalError(f"judge {cfg.judge_model} at {cfg.judge_url or 'the default endpoint'}: {e}") from None
                except openai.APITimeoutError as e:
                    errors[k] = f"timeout after {cfg.retries} retries: {e}"
                    continue
                except openai.APIConnectionError as e:
                    raise EvalError(f"cannot reach the judge at {cfg.judge_url or 'the default endpoint'} "
                                    f"after {cfg.retries} retries: {e}") from None
                except openai.APIError as e:
                    errors[k] = f"{type(e).__name__}: {e}"
                    continue
                spend["calls"] += 1
                usage = cache.get(k)["usage"] or {}
                spend["prompt_tokens"] += usage.get("prompt_tokens") or 0
                spend["completion_tokens"] += usage.get("completion_tokens") or 0
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    spend["failed"] = len(errors)
    return [cache.get(k) for k in keys], [errors.get(k) for k in keys], spend


def _llm_scores(answers: list[dict], cfg: EvalJudgeConfig) -> tuple[list[dict], dict]:
    if not cfg.prompts:
        raise EvalError("the LLM judge needs --prompts (BELLE's eval_prompt.json); or use --judge reference")
    prompts = load_judge_prompts(cfg.prompts)
    messages = [judge_message(prompts[a["class"]], a["question"], a["answer"], a["std_answer"], a["class"])
                for a in answers]
    cache = JudgeCache(cfg.cache or Path(cfg.output).parent / "judge_cache.jsonl")
    records, errors, spend = fetch_replies(messages, cfg, cache)
    scored, table_tokens = [], 0
    for a, rec, err in zip(answers, records, errors):
        if rec is None:
            scored.append({**a, "score": None, "status": "error", "value": None, "reply": None, "error": err})
            continue
        p = parse_score(rec["reply"], cfg.out_of_range)
        scored.append({**a, "score": p.score, "status": p.status, "value": p.value, "reply": rec["reply"],
                       "usage": rec["usage"]})
        table_tokens += sum((rec["usage"] or {}).values())
    spend["tokens_of_all_replies"] = table_tokens  # what the whole table cost, cached or not
    spend["cache"] = str(cache.path)
    return scored, spend


def run_eval_judge(cfg: EvalJudgeConfig) -> int:
    meta, answers = read_records(cfg.data, "answers")
    for a in answers:
        a["class"] = normalize_class(a["class"])
        if a["class"] not in CLASSES:
            raise EvalError(f"{cfg.data}: item {a.get('id')}: unknown class {a['class']!r}")
    judge = {"kind": cfg.judge, "comparable_with_llm_judge": cfg.judge == "llm"}
    if cfg.judge == "reference":
        from .reference import judge_reference  # rouge-score (and nltk) only when used

        scored = [{**a, **judge_reference(a)} for a in tqdm(answers, desc="rouge-l", unit="item")]
        judge["method"] = "character-level ROUGE-L F1 against std_answer (rouge-score)"
        spend = None
    else:
        scored, spend = _llm_scores(answers, cfg)
        judge.update(model=cfg.judge_model, url=cfg.judge_url, temperature=cfg.temperature,
                     max_tokens=cfg.max_tokens, out_of_range=cfg.out_of_range, prompts=cfg.prompts,
                     prompts_sha256=sha256_file(cfg.prompts))
    out_meta = {**meta, "kind": "scores", "answers": str(cfg.data), "judge": judge, "spend": spend}
    lines = [json.dumps({"_meta": out_meta}, ensure_ascii=False)]
    lines += [json.dumps(s, ensure_ascii=False) for s in sorted(scored, key=lambda s: s["index"])]
    atomic_write_text(cfg.output, "\n".join(lines) + "\n")

    counts = {st: sum(s["status"] == st for s in scored) for st in sorted({s["status"] for s in scored})}
    print(f"judged {len(scored)} answers of {meta.get('model')} -> {cfg.output}: "
          + ", ".join(f"{n} {st}" for st, n in counts.items()))
    if spend is not None:
        print(f"judge calls this run: {spend['calls']} answered, {spend['failed']} failed after retries "
              f"({spend['cache_hits']} answered from the cache); "
              f"tokens spent this run: {spend['prompt_tokens']} prompt + {spend['completion_tokens']} completion; "
              f"all replies in this table: {spend['tokens_of_all_replies']} tokens")
    if counts.get("error"):
        print(f"{counts['error']} item(s) failed after retries; run the same command again to retry only them")
        return 1
    return 0
