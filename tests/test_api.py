"""`toucan serve` as a real process on 127.0.0.1, driven with the official openai client and httpx."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import free_port
from test_engine import REPLY, save_parrot

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "sk-toucan-test"
# One thread per test process: 2 OpenMP threads on 2 cores shared with other tests are far slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENDPOINTS = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("GET", "/health"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no/such/path")]


def start_server(args, port, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "toucan.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV)
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {open(log_path).read()[-2000:]}")
        try:
            httpx.get(base + "/v1/models", timeout=1)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 120 s")


@pytest.fixture(scope="module")
def server(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    model = save_parrot(tiny_tok, d / "parrot")
    proc, base = start_server(["--model", str(model), "--api-key", "sk-other", KEY,
                               "--max_batch_size", "8", "--batch_wait_ms", "50"], free_port(), d / "server.log")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def health(server):
    return httpx.get(server + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_models_and_chat_completion(client):
    assert [m.id for m in client.models.list().data] == ["parrot"]
    r = client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "你好"}], temperature=0)
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_openai_client(client, tiny_tok):
    stream = client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "你好"}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == REPLY and len(deltas) >= 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(tiny_tok(REPLY, add_special_tokens=False)["input_ids"]) + 1


def test_completions_stop_and_max_tokens(client):
    from toucan.prompts import build_prompt

    p = build_prompt("你好")
    r = client.completions.create(model="parrot", prompt=p, temperature=0, stop=["好吃"])
    assert r.choices[0].text == "鳕鱼很" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="parrot", prompt=p, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="parrot", prompt=p, temperature=0, stop="。", stream=True))
    assert text == REPLY[:-1]


def test_every_endpoint_needs_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        for method, path in ENDPOINTS:
            r = httpx.request(method, server + path, headers=headers, json={"model": "parrot", "prompt": "x"})
            assert r.status_code == 401, (headers, path, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "你好"}], stream=True)
    ok = httpx.get(server + "/v1/models", headers={"Authorization": "Bearer sk-other"})  # any configured key
    assert ok.status_code == 200


def test_bad_requests_are_openai_errors(server, client):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [(b'{"model": "parrot", "messages": [', 400), (b'{"model": "parrot"}', 400),
             (json.dumps({"model": "parrot", "messages": [{"role": "user", "content": "x"}], "n": 2}), 400),
             (json.dumps({"model": "parrot", "messages": [{"role": "robot", "content": "x"}]}), 400),
             (json.dumps({"model": "parrot", "messages": [{"role": "assistant", "content": "x"}]}), 400),
             (json.dumps({"model": "parrot", "messages": [{"role": "user", "content": "x"}], "temperature": 9}), 400),
             (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404)]
    for body, status in cases:
        r = httpx.post(server + "/v1/chat/completions", content=body, headers=h)
        assert r.status_code == status, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as e:  # 512-token context
        client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "你好" * 600}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="parrot", prompt="你好" * 600, stream=True)
    assert health(server)["status"] == "ok"  # still serving


def test_concurrent_requests_are_batched(client, server):
    before = health(server)
    results, errors = [], []

    def one(i):
        try:
            s = client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": "你好"}],
                                               temperature=0, stream=i % 2 == 0, max_tokens=32)
            results.append("".join(c.choices[0].delta.content or "" for c in s if c.choices) if i % 2 == 0
                           else s.choices[0].message.content)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [REPLY] * 8
    after = health(server)
    assert after["completed"] - before["completed"] == 8
    # continuous batching: some requests shared decode steps
    assert (after["rows"] - before["rows"]) / (after["steps"] - before["steps"]) > 1
    assert after["max_batch"] > 1 and after["joined"] - before["joined"] == 8


def test_disconnect_mid_stream_cancels_generation(server):
    before = health(server)
    body = {"model": "parrot", "prompt": "1 2 3", "max_tokens": 400, "min_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
    for _ in range(100):  # closed: the row stops at its next token
        after = health(server)
        if after.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.1)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 400


def test_serve_prompt_bytes_equal_training(server, client, tiny_tok):
    """usage.prompt_tokens of a served chat request = [BOS] + tokens(training prompt)."""
    from toucan.data import Record, encode_example, record_prompt

    rec = Record(instruction="把这句话翻译成英文：鳕鱼很好吃。", output="Cod is tasty.")
    train_ids = encode_example(tiny_tok, record_prompt(rec), rec.output, 512).input_ids
    n_prompt = train_ids.index(tiny_tok.eos_token_id) - len(tiny_tok(rec.output, add_special_tokens=False)["input_ids"])
    r = client.chat.completions.create(model="parrot", messages=[{"role": "user", "content": rec.instruction}],
                                       max_tokens=1)
    assert r.usage.prompt_tokens == n_prompt
