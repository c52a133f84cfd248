"""Serving benchmark: continuous vs static batching in `toucan serve` on loopback, and engine speed.

    .venv/bin/python bench/serve.py --threads 1          # CPU, tiny random LLaMA, 16 and 32 concurrent clients
    .venv/bin/python bench/serve.py --device cuda --hidden_size 1024 --layers 8   # (bench/gpu.sh)

Part 1 (in process): decode tokens/s of Engine.generate vs plain model.generate on the same model,
batch 1, greedy, 128 new tokens (EOS suppressed), median of --repeats; ratio printed. Then the
engine's offline batched throughput at each batch size of --concurrency (generate_batch of that
many prompts, the load test's sampling settings, exactly --tokens tokens each): the ceiling a
server can reach at that batch size; measured again right before and after every server run, and
each run is compared with the mean of those two.
Part 2 (a real `toucan serve` process per run): for each --concurrency C, --rounds times, each
batching mode (continuous, static; --max_batch_size C) in alternating order: one stream alone
(baseline), then --requests_per_client x C streaming chat requests, C at a time, each exactly
--tokens tokens. Reports aggregate tokens/s (vs one stream and vs offline at batch C), p50/p95 time
to first token (vs the lone request) over the steady load (each client's first request, the
start-up burst of C at once, left out) and over all requests, mean rows per decode step
(continuous) or per batch (static), errors, 5xx and the server's peak RSS; then, on the medians
over rounds, the acceptance checks of issue 15 (continuous: aggregate >= 0.85x offline and >=
static, steady TTFT p95 <= 3x alone and <= 0.5x static, 0 errors; a ratio to a run's own
baseline is taken within each run, then its median). Exits non-zero if a request failed or a check
did not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench"


def make_model(out: Path, hidden: int, layers: int) -> Path:
    from toucan.modeling import load_tokenizer, save_tiny_llama

    tok = load_tokenizer(ROOT / "tests/fixtures/tiny_tokenizer")
    return save_tiny_llama(out, tok, command="bench-serve", hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), intermediate_size=int(hidden * 2.6875),
                           max_position_embeddings=1024)


def decode_speed(model_dir: Path, device: str, tokens: int, repeats: int) -> dict:
    import torch

    from toucan.sampling import SamplingParams
    from toucan.engine import Engine

    eng = Engine.from_dir(model_dir, device=device)
    prompt = eng.chat_prompt([], "请写一首关于大海的诗。", tokens)[0]
    ids = torch.tensor([eng.encode(prompt)], device=eng.model.device)
    opts = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    tok = eng.tokenizer

    def plain():
        out = eng.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return out.shape[1] - ids.shape[1]

    def engine():
        return eng.generate(prompt, opts).completion_tokens

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # Interleaved (plain, engine, plain, ...) so both see the same background load on a shared box.
    rates = {"plain": [], "engine": []}
    plain(), engine()  # warm-up
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("engine", engine)):
            sync()
            t = time.perf_counter()
            n = fn()
            sync()
            assert n == tokens, (name, n)
            rates[name].append(n / (time.perf_counter() - t))
    res = {k: statistics.median(v) for k, v in rates.items()}
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: Path, device: str, max_batch: int, threads: int, log: Path, batching: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toucan.cli", "-q", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--device", device, "--api-key", KEY, "--max_batch_size", str(max_batch), "--model_name", "bench",
             "--batching", batching, "--threads", str(threads)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                httpx.get(self.base + "/v1/models", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        p = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:  # the server and its engine process (continuous batching runs the model in a child)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak_rss = max(self.peak_rss, rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()

    def close(self):
        self._stop.set()
        self.proc.terminate()
        self.proc.wait(30)


async def one_request(client: httpx.AsyncClient, base: str, tokens: int, i: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"第{i}个问题：请写一首关于大海的诗。"}],
            "stream": True, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0.7, "top_p": 0.9,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, status = None, None, 0
    try:
        async with client.stream("POST", base + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
            status = r.status_code
            if status != 200:
                await r.aread()
                return {"ok": False, "status": status}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return {"ok": False, "status": 500}
                if msg["choices"] and msg["choices"][0]["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                if msg.get("usage"):
                    usage = msg["usage"]
    except httpx.HTTPError as e:
        return {"ok": False, "status": status, "error": repr(e)}
    ok = usage is not None and usage["completion_tokens"] == tokens and ttft is not None
    return {"ok": ok, "status": status, "ttft": ttft, "total": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"] if usage else 0}


async def load(base: str, n: int, concurrency: int, tokens: int) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        async def bounded(i):
            async with sem:
                return await one_request(client, base, tokens, i)

        t = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        return results, time.perf_counter() - t


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


LOAD_OPTS = dict(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.0)  # one_request's, serve's defaults


def question(i: int) -> str:
    return f"第{i}个问题：请写一首关于大海的诗。"


def offline_engine(model_dir: Path, device: str, batch: int):
    from toucan.engine import Engine

    eng = Engine.from_dir(model_dir, device=device)
    eng.max_rows = batch  # before its scheduler starts (on first use)
    return eng


def offline_throughput(eng, batch: int, tokens: int, repeats: int) -> dict:
    """tokens/s of Engine.generate_batch over `batch` chat prompts at once (the load test's
    settings), continuous engine and the static path; median of `repeats`."""
    import torch

    from toucan.sampling import SamplingParams

    prompts = [eng.messages_prompt([{"role": "user", "content": question(i)}], tokens) for i in range(batch)]
    opts = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, **LOAD_OPTS)
    rates = {"continuous": [], "static": []}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for mode in rates:
            eng.continuous = mode == "continuous"
            t = time.perf_counter()
            out = eng.generate_batch(prompts, opts)
            if eng.model.device.type == "cuda":
                torch.cuda.synchronize()
            assert all(c.completion_tokens == tokens for c in out)
            rates[mode].append(batch * tokens / (time.perf_counter() - t))
    eng.continuous = True
    return {k: statistics.median(v[1:]) for k, v in rates.items()}


def engine_under_load(eng, clients: int, per_client: int, tokens: int) -> dict:
    """The continuous engine under the load test's pattern with no HTTP in between: `clients`
    threads, each submitting its next request (Engine.submit) as soon as its last is done. Splits the
    server's figures into what the scheduler itself costs and what serving adds. Steady TTFT (each
    client's first request left out) is submit -> first text delta."""
    from toucan.sampling import SamplingParams

    opts = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, **LOAD_OPTS)
    ids = [eng.encode(eng.messages_prompt([{"role": "user", "content": question(i)}], tokens)) for i in range(clients)]
    ttfts: list[float] = []
    steps0 = eng.batch_stats()

    def client(k: int) -> None:
        for j in range(per_client):
            done, first, t0 = threading.Event(), [], time.perf_counter()
            eng.submit(ids[k], opts, on_done=lambda r: done.set(),
                       on_text=lambda _: first or first.append(time.perf_counter() - t0))
            done.wait()
            if j:
                ttfts.append(first[0])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    gc.collect()  # as the server does (and run_server_bench here): no full collections mid-run
    gc.freeze()
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    st = eng.batch_stats()
    return {"tok_per_s": clients * per_client * tokens / wall, "ttft_p50_s": pct(ttfts, 50),
            "ttft_p95_s": pct(ttfts, 95),
            "mean_rows": (st["rows"] - steps0.get("rows", 0)) / max(1, st["steps"] - steps0.get("steps", 0))}


def run_server_bench(model_dir, args, concurrency: int, batching: str, work: Path, eng) -> dict:
    # The ceiling is measured right before and right after the server run, in this process with the
    # server idle or gone: this VM's speed drifts by up to a third within minutes, and an offline
    # figure taken once at the start made the aggregate/offline ratio swing between runs.
    repeats = max(1, args.repeats // 2)
    before_off = offline_throughput(eng, concurrency, args.tokens, repeats)["continuous"]
    srv = Server(model_dir, args.device, concurrency, args.threads, work / f"server-{batching}-{concurrency}.log",
                 batching)
    # This process holds torch and the offline engine: a full garbage collection here takes ~230 ms
    # and would stall the load clients' event loop (the first server run measured p95 TTFT 240 ms
    # from it, and 56 ms the next round). Frozen, the collector leaves the long-lived objects alone.
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(load(srv.base, 4, 4, 4))  # warm-up
        single, t_single = asyncio.run(load(srv.base, args.single, 1, args.tokens))
        before = srv.health()
        results, wall = asyncio.run(load(srv.base, args.requests_per_client * concurrency, concurrency, args.tokens))
        after = srv.health()
    finally:
        srv.close()
    after_off = offline_throughput(eng, concurrency, args.tokens, repeats)["continuous"]
    good = [r for r in results if r["ok"]]
    # load() starts requests in index order, C at a time: the first C are the start-up burst (C
    # prompts in the same millisecond, admitted a few per step); the rest arrive as earlier ones
    # finish, which is the steady load a server sees. Both are reported.
    steady = [r for r in results[concurrency:] if r["ok"]]
    single_tps = sum(r["tokens"] for r in single) / t_single
    agg_tps = sum(r["tokens"] for r in good) / wall
    steps = after.get("steps" if batching == "continuous" else "batches", 0) - before.get(
        "steps" if batching == "continuous" else "batches", 0)
    return {
        "batching": batching, "concurrency": concurrency, "requests": len(results), "ok": len(good),
        "errors": len(results) - len(good), "5xx": sum(1 for r in results if r["status"] >= 500),
        "wall_s": wall, "req_per_s": len(good) / wall, "agg_tok_per_s": agg_tps,
        "single_stream_tok_per_s": single_tps, "agg_vs_single": agg_tps / single_tps,
        "ttft_p50_s": pct([r["ttft"] for r in good], 50), "ttft_p95_s": pct([r["ttft"] for r in good], 95),
        "ttft_p50_steady_s": pct([r["ttft"] for r in steady], 50),
        "ttft_p95_steady_s": pct([r["ttft"] for r in steady], 95),
        "single_ttft_s": statistics.median(r["ttft"] for r in single),
        "offline_before_tok_per_s": before_off, "offline_after_tok_per_s": after_off,
        "offline_tok_per_s": (before_off + after_off) / 2,
        # ratios are taken within the run, against its own baselines, and their medians over rounds
        # are what the checks read: a ratio of two medians would pair figures from different minutes
        "agg_vs_offline": agg_tps / ((before_off + after_off) / 2),
        "ttft_p95_steady_vs_single": pct([r["ttft"] for r in steady], 95) / statistics.median(r["ttft"] for r in single),
        "mean_rows": (after.get("rows", 0) - before.get("rows", 0)) / max(1, steps),
        "peak_rss_mb": srv.peak_rss / 2**20,
    }


def median_run(rs: list[dict]) -> dict | None:
    """The median over rounds of each figure on its own, ratios included (so a median line's ratio
    need not be the quotient of the medians printed beside it). Errors and 5xx are summed over the
    rounds; the other counts (concurrency, requests) are the same in every round."""
    if not rs:
        return None
    out = {k: statistics.median(r[k] for r in rs) if isinstance(v, float) else v for k, v in rs[0].items()}
    out.update({k: sum(r[k] for r in rs) for k in ("errors", "5xx")})
    return out


def report(r: dict, tokens: int, label: str) -> None:
    ms = lambda k: f"{r[k] * 1000:.0f}"  # noqa: E731
    print(f"serve {r['batching']:10s} C={r['concurrency']} ({label}): {r['requests']} streaming requests x {tokens} "
          f"tokens: {r['agg_tok_per_s']:.1f} tok/s aggregate vs one stream {r['single_stream_tok_per_s']:.1f} "
          f"-> {r['agg_vs_single']:.2f}x, vs offline batch {r['concurrency']} {r['offline_tok_per_s']:.1f} (before "
          f"{r['offline_before_tok_per_s']:.0f}, after {r['offline_after_tok_per_s']:.0f}) -> "
          f"{r['agg_vs_offline']:.2f}x; TTFT steady p50 {ms('ttft_p50_steady_s')} ms, p95 "
          f"{ms('ttft_p95_steady_s')} ms (alone {ms('single_ttft_s')} ms -> p95 "
          f"{r['ttft_p95_steady_vs_single']:.1f}x); with the start-up burst p50 {ms('ttft_p50_s')}, "
          f"p95 {ms('ttft_p95_s')} ms; mean rows per {'step' if r['batching'] == 'continuous' else 'batch'} "
          f"{r['mean_rows']:.1f}; errors {r['errors']}, 5xx {r['5xx']}; peak RSS {r['peak_rss_mb']:.0f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random tiny LLaMA made here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden_size", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--requests_per_client", type=int, default=8, help="requests per client (C x this in all)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32], help="concurrent clients (= max batch)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request (exact)")
    ap.add_argument("--single", type=int, default=5, help="requests in the one-stream baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (bench and server)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="server runs per mode and concurrency, in alternating order; figures are their medians")
    ap.add_argument("--skip_static", action="store_true", help="skip the static-batching runs (no comparison)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model_dir = Path(args.model) if args.model else make_model(work / "tiny", args.hidden_size, args.layers)
        n_params = None
        if not args.model:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(model_dir)
            n_params = f"hidden {c.hidden_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}"
        print(f"model: {model_dir if args.model else n_params}; device {args.device}; threads {args.threads}; "
              f"cpu: {psutil.cpu_count()} cores")
        dec = decode_speed(model_dir, args.device, 128, args.repeats)
        print(f"decode (batch 1, 128 new tokens, greedy): engine {dec['engine']:.1f} tok/s vs plain "
              f"model.generate {dec['plain']:.1f} tok/s  -> ratio {dec['engine'] / dec['plain']:.2f}")
        offline, runs = {}, []
        for c in args.concurrency:
            eng = offline_engine(model_dir, args.device, c)
            offline[c] = offline_throughput(eng, c, args.tokens, max(1, args.repeats // 2))
            print(f"offline generate_batch, batch {c} x {args.tokens} tokens: continuous engine "
                  f"{offline[c]['continuous']:.1f} tok/s, static (one generate call) {offline[c]['static']:.1f} tok/s "
                  f"-> ratio {offline[c]['continuous'] / offline[c]['static']:.2f}")
            inproc = engine_under_load(eng, c, args.requests_per_client, args.tokens)
            print(f"engine under load in process (no HTTP), {c} closed-loop clients x {args.requests_per_client}: "
                  f"{inproc['tok_per_s']:.1f} tok/s; steady TTFT (submit -> first text) p50 "
                  f"{inproc['ttft_p50_s'] * 1000:.0f} ms, p95 {inproc['ttft_p95_s'] * 1000:.0f} ms; mean rows per "
                  f"step {inproc['mean_rows']:.1f}")
            offline[c]["in_process_load"] = inproc
            modes = ("continuous",) + (() if args.skip_static else ("static",))
            for k in range(args.rounds):  # the order alternates, so neither mode always runs on the later minutes
                for mode in modes[::-1] if k % 2 else modes:
                    runs.append(run_server_bench(model_dir, args, c, mode, work, eng))
                    report(runs[-1], args.tokens, f"round {k + 1}")
    failed = False
    for c in args.concurrency:
        cont = median_run([r for r in runs if r["concurrency"] == c and r["batching"] == "continuous"])
        report(cont, args.tokens, f"median of {args.rounds}")
        stat = median_run([r for r in runs if r["concurrency"] == c and r["batching"] == "static"])
        if stat is not None:
            report(stat, args.tokens, f"median of {args.rounds}")
        # TTFT is checked on the steady load (see run_server_bench); the start-up burst is printed beside it
        checks = {"aggregate >= 0.85x offline": cont["agg_vs_offline"] >= 0.85,
                  "TTFT p95 <= 3x alone": cont["ttft_p95_steady_vs_single"] <= 3,
                  "0 errors": not any(r["errors"] or r["5xx"] for r in runs if r["concurrency"] == c)}
        if stat is not None:
            checks["aggregate >= static"] = cont["agg_tok_per_s"] >= stat["agg_tok_per_s"]
            checks["TTFT p95 <= 0.5x static"] = cont["ttft_p95_steady_s"] <= 0.5 * stat["ttft_p95_steady_s"]
            print(f"C={c}: continuous vs static: aggregate {cont['agg_tok_per_s'] / stat['agg_tok_per_s']:.2f}x, "
                  f"steady TTFT p95 {cont['ttft_p95_steady_s'] / stat['ttft_p95_steady_s']:.2f}x, "
                  f"p50 {cont['ttft_p50_steady_s'] / stat['ttft_p50_steady_s']:.2f}x; with the burst: TTFT p95 "
                  f"{cont['ttft_p95_s'] / stat['ttft_p95_s']:.2f}x, p50 {cont['ttft_p50_s'] / stat['ttft_p50_s']:.2f}x")
        print(f"C={c} acceptance: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))
        failed |= not all(checks.values())
    if args.out:
        Path(args.out).write_text(json.dumps({"decode": dec, "offline": offline, "serve": runs}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
