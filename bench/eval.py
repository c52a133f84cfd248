"""The evaluation acceptance run: `toucan eval generate` + `judge` + `report` on the full BELLE eval
set (1000 questions) with a tiny model and a local OpenAI-compatible judge (the scripted server in
tests/eval_judge_server.py, a real HTTP server on 127.0.0.1), including a SIGKILL of the judge at
~50 % and a restart. Prints the timings, and the cached rerun's judge calls beside the first run's
(the baseline) as a ratio. Every step is the real CLI in its own process.

    .venv/bin/python bench/eval.py [--eval-set ../shared/data/belle_eval/eval_set.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TOUCAN = [sys.executable, "-m", "toucan.cli", "-q"]


def run(args: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(TOUCAN + args, check=True, **kw)
    return time.perf_counter() - t


def lines(p: Path) -> int:
    return p.read_text(encoding="utf-8").count("\n") if p.exists() else 0


def make_model(out: Path) -> None:
    from toucan.modeling import load_tokenizer, save_tiny_llama

    tok = load_tokenizer(ROOT / "tests/fixtures/tiny_tokenizer")
    # 2048 positions: the longest BELLE question is ~1150 tiny-tokenizer tokens
    save_tiny_llama(out, tok, command="bench-eval", max_position_embeddings=2048)


def start_judge(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests/eval_judge_server.py"), "--port", str(port)],
                            stdout=open(work / "judge_server.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc, f"http://127.0.0.1:{port}"
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("judge server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-set", default=str(ROOT.parent / "shared/data/belle_eval/eval_set.json"))
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared/data/belle_eval/eval_prompt.json"))
    ap.add_argument("--work", default="runs/bench_eval")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for generate")
    a = ap.parse_args()
    work = Path(a.work)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    make_model(work / "model")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    gen_s = run(["eval", "generate", "--model", str(work / "model"), "--data", a.eval_set,
                 "--output", str(work / "answers.jsonl"), "--model-name", "tiny-random", "--max-new-tokens",
                 str(a.max_new_tokens), "--batch-size", str(a.batch_size), "--device", a.device], env=env)
    n = lines(work / "answers.jsonl") - 1

    server, url = start_judge(work)
    try:
        judge = lambda out, cache: ["eval", "judge", "--data", str(work / "answers.jsonl"), "--prompts", a.prompts,  # noqa: E731
                                    "--judge-url", f"{url}/v1", "--judge-model", "scripted", "--output", str(out),
                                    "--cache", str(cache), "--concurrency", str(a.concurrency)]
        cache = work / "judge_cache.jsonl"
        # 1. killed with SIGKILL at ~50 % (no pause in the server: a real kill, mid-flight), then resumed
        t = time.perf_counter()
        p = subprocess.Popen(TOUCAN + judge(work / "scores.jsonl", cache))
        while lines(cache) < n // 2 and p.poll() is None:
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        at_kill = lines(cache)
        resume_s = run(judge(work / "scores.jsonl", cache))
        first_s = time.perf_counter() - t
        counts = httpx.get(f"{url}/admin/counts").json()
        dup_answered = sum(v - 1 for v in counts["answered"].values())
        dup_received = sum(v - 1 for v in counts["received"].values())
        # 2. the same judge run again: everything from the cache
        before = counts["total_received"]
        second_s = run(judge(work / "scores.jsonl", cache))
        second_calls = httpx.get(f"{url}/admin/counts").json()["total_received"] - before
        # 3. an uninterrupted run with its own cache: the same final scores?
        straight_s = run(judge(work / "scores_straight.jsonl", work / "cache_straight.jsonl"))
    finally:
        server.terminate()
        server.wait()

    def key(p):
        return [(r["id"], r["score"], r["status"]) for r in map(json.loads, open(p, encoding="utf-8")) if "_meta" not in r]

    same = key(work / "scores.jsonl") == key(work / "scores_straight.jsonl")
    report_s = run(["eval", "report", str(work / "scores.jsonl"), "--output", str(work / "report")])
    print((work / "report/table.md").read_text(encoding="utf-8"))
    print(f"eval set: {a.eval_set}; answers: {n}; device {a.device}, torch threads {a.threads}")
    print(f"generate: {gen_s:.1f} s for {n} questions ({n / gen_s:.1f} q/s, max_new_tokens {a.max_new_tokens}, "
          f"batch {a.batch_size})")
    print(f"judge, killed at {at_kill}/{n} cached replies and resumed: {first_s:.1f} s in all (resume {resume_s:.1f} s); "
          f"judge received {counts['total_received']} requests for {len(counts['received'])} distinct messages: "
          f"{dup_answered} answered twice, {dup_received} re-sent (in flight at the kill, never answered)")
    print(f"uninterrupted judge run: {straight_s:.1f} s; final scores equal to the killed+resumed run: {same}")
    print(f"second judge run: {second_calls} judge calls vs {n} in the first (ratio {second_calls / n:.2f}), "
          f"{second_s:.1f} s vs {straight_s:.1f} s uninterrupted (ratio {second_s / straight_s:.2f})")
    print(f"report: {report_s:.1f} s -> {work / 'report'}")


if __name__ == "__main__":
    main()
