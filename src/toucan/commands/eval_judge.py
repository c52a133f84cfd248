"""`toucan eval judge --answers A --output S`: score answers with BELLE's judge (cached) or offline."""

from __future__ import annotations

from ..config import EvalJudgeConfig
from ..errors import EvalError
from ..eval.judge import JudgeEndpoint, cache_path, judge_answers, scores_of
from ..fsutil import check_output


def run(cfg: EvalJudgeConfig) -> int:
    cache = cache_path(cfg.cache, cfg.output)
    check_output(cfg.output, overwrite=cfg.overwrite or scores_of(cfg.output, cfg.data), is_dir=False,
                 inputs=[cfg.data, cfg.prompts, cache if cfg.judge == "llm" else None])
    ep = JudgeEndpoint(model=cfg.judge_model, url=cfg.judge_url, api_key_env=cfg.api_key_env,
                       temperature=cfg.temperature, max_tokens=cfg.max_tokens, concurrency=cfg.concurrency,
                       retries=cfg.retries, timeout=cfg.timeout,
                       max_consecutive_failures=cfg.max_consecutive_failures)
    meta, scored, spend = judge_answers(cfg.data, cfg.output, cfg.judge, ep, prompts=cfg.prompts, cache=cache,
                                        out_of_range=cfg.out_of_range)
    counts = {st: sum(s["status"] == st for s in scored) for st in sorted({s["status"] for s in scored})}
    print(f"judged {len(scored)} answers of {meta.get('model')} -> {cfg.output}: "
          + ", ".join(f"{n} {st}" for st, n in counts.items()))
    if spend is not None:
        print(f"judge calls this run: {spend['calls']} answered, {spend['failed']} failed after retries "
              f"({spend['cache_hits']} answered from the cache); "
              f"tokens spent this run: {spend['prompt_tokens']} prompt + {spend['completion_tokens']} completion; "
              f"all replies in this table: {spend['tokens_of_all_replies']} tokens")
    if spend is not None and spend["stopped"]:
        # after the summary and the scores file, so nothing already paid for is lost
        raise EvalError(f"{spend['stopped']}; {len(scored) - counts.get('error', 0)} of {len(scored)} answers "
                        f"scored in {cfg.output}; check the judge, then run the same command again to resume "
                        f"(--max-consecutive-failures {cfg.max_consecutive_failures})")
    if counts.get("error"):
        print(f"{counts['error']} item(s) failed after retries; run the same command again to retry only them")
        return 1
    return 0
