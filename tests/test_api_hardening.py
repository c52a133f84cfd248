"""`toucan serve` against hostile but fair clients (issue 11): body limit, a busy server still
answering /health, key and bind rules, 400s instead of 500s, disconnects, the Host header.
A real server process on 127.0.0.1, raw sockets where a client library would be too polite."""

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import free_port
from test_api import ENV, start_server
from test_engine import save_parrot
from toucan.commands.serve import check_options as check_serve
from toucan.config import ServeConfig
from toucan.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 1 << 20  # the default --max-request-bytes
MSG = [{"role": "user", "content": "你好"}]


@pytest.fixture(scope="module")
def server(tiny_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    model = save_parrot(tiny_tok, d / "parrot")
    port = free_port()
    (d / "keys").write_text(f"# the key, kept out of ps\n{KEY}\n")
    proc, base = start_server(["--model", str(model), "--api-key-file", str(d / "keys"),
                               "--allowed-hosts", "toucan.test", "--batch_wait_ms", "5"], port, d / "server.log")
    yield base, port, proc
    proc.terminate()
    proc.wait(timeout=20)


def health(base, timeout=30):
    return httpx.get(base + "/health", headers=AUTH, timeout=timeout).json()


def raw_request(port, head: bytes, body_chunks=(), read_timeout=10.0) -> tuple[bytes, int]:
    """Send a request by hand; returns (the response bytes, body bytes we managed to send)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server answered and closed while we were still sending: what we want
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except OSError:
            pass
    return data, sent


def test_body_over_the_limit_is_refused_before_it_is_read(server):
    base, port, _ = server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {60 * 2**20}\r\n\r\n").encode()
    t0 = time.monotonic()
    data, _ = raw_request(port, head)  # a 60 MB Content-Length, and not one byte of the body
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"request_too_large" in data and time.monotonic() - t0 < 5

    # chunked (no Content-Length): refused once the limit is passed, without the rest being read
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"x" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(1000))  # 64 MB offered
    data, sent = raw_request(port, head, chunks)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert sent < 32 * LIMIT  # the server stopped reading long before the end (socket buffers aside)
    # just under the limit is read and judged on its content
    r = httpx.post(base + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "parrot", "prompt": "a" * (LIMIT - 200), "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert health(base)["status"] == "ok"


def test_health_answers_while_big_requests_are_worked_on(server):
    """1,000 short history turns (used to take 13.6 s with /health blocked 12 s) and a ~1 MB
    prompt, several at once: /health must keep answering in well under a second."""
    base, _, _ = server
    turns = []
    for i in range(1000):
        turns += [{"role": "user", "content": f"第{i}个问题：鳕鱼好吃吗？" * 3},
                  {"role": "assistant", "content": f"第{i}个回答：鳕鱼很好吃。" * 3}]
    history_body = {"model": "parrot", "messages": turns + MSG, "max_tokens": 4, "temperature": 0}
    assert 100_000 < len(json.dumps(history_body, ensure_ascii=False).encode()) < LIMIT
    big_body = {"model": "parrot", "prompt": "鳕鱼很好吃 " * 50_000, "max_tokens": 1}  # ~0.9 MB
    results, latencies = [], []
    done = threading.Event()

    def send(client, path, content):
        r = client.post(base + path, headers={**AUTH, "Content-Type": "application/json"}, content=content)
        results.append((r.status_code, r.json()))

    # bodies encoded and clients made up front (an httpx client costs ~60 ms of CPU to make), so
    # this process's own work does not slow the /health calls it times
    jobs = [("/v1/chat/completions", json.dumps(history_body, ensure_ascii=False).encode()),
            ("/v1/completions", json.dumps(big_body, ensure_ascii=False).encode())] * 3
    workers = [threading.Thread(target=send, args=(httpx.Client(timeout=120), *job)) for job in jobs]
    poll = httpx.Client(headers=AUTH, timeout=10)
    for w in workers:
        w.start()

    def watch():
        for w in workers:
            w.join()
        done.set()

    threading.Thread(target=watch).start()
    while not done.is_set():
        t0 = time.monotonic()
        assert poll.get(base + "/health").json()["status"] == "ok"
        latencies.append(time.monotonic() - t0)
        time.sleep(0.02)
    codes = sorted(c for c, _ in results)
    assert codes == [200] * 3 + [400] * 3, results
    assert all(b["usage"]["prompt_tokens"] < 512 for c, b in results if c == 200)  # history trimmed
    latencies.sort()
    print(f"/health during load: {len(latencies)} calls, median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms")
    # Before the fix one such history blocked /health for 12 s. Typical here: tens of ms; the max
    # bound leaves room for a loaded 2-core CI box descheduling the server. How many polls fit
    # depends on how fast the server gets through the six requests (with the model in its own
    # process they took 0.1-0.5 s in CI: 2 polls once), so at least one, each timed while work was
    # in flight (the loop stops when the last request is answered).
    assert latencies and latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 2.0


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages.0.content.0.text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, "messages.0.content.0.text"),
    ({"prompt": "x\ud800"}, "prompt"),
    ({"messages": MSG, "stop": ["\ud800"]}, "stop.0"),
    ({"messages": MSG, "seed": 2 ** 64}, "seed"),
    ({"messages": MSG, "temperature": 1e-38}, "temperature"),
    ({"messages": MSG, "repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"messages": MSG, "history": 0}, "history"),
    ({"messages": MSG, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MSG, "max_tokens": 5.0}, "max_tokens"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "temperature": True}, "temperature"),
    ({"messages": [{"role": "user", "content": "x", "history": [["a", "b"]]}]}, "messages.0.history"),
])
def test_client_mistakes_are_400_naming_the_field(server, body, field):
    base, _, _ = server
    body = {"model": "parrot", **body}
    # json.dumps writes a lone surrogate as the escape "\ud800", as a hostile client would send it
    r = httpx.post(base + ("/v1/completions" if "prompt" in body else "/v1/chat/completions"), headers={
        **AUTH, "Content-Type": "application/json"}, content=json.dumps(body), timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(field + ": "), err


def test_seed_and_small_temperature_still_generate(server):
    base, _, _ = server
    for extra in ({"seed": 2 ** 64 - 1}, {"seed": -1}, {"temperature": 1e-5}, {"repetition_penalty": 0.01}):
        r = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"model": "parrot", "messages": MSG, "max_tokens": 3, **extra})
        assert r.status_code == 200, (extra, r.text)


def test_non_streaming_request_stops_when_its_client_leaves(server):
    base, _, _ = server
    before = health(base)
    body = {"model": "parrot", "prompt": "1 2 3", "max_tokens": 500, "min_tokens": 500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(base + "/v1/completions", headers=AUTH, json=body, timeout=httpx.Timeout(60, read=0.3))
    for _ in range(100):  # the row stops at its next token
        after = health(base)
        if after.get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.1)
    assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 500


def test_host_header_must_name_this_server(server):
    base, port, _ = server
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "localhost:1"):
        r = httpx.get(base + "/v1/models", headers={**AUTH, "Host": host})
        assert r.status_code == 421 and r.json()["error"]["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"toucan.test:{port}",
                 "TOUCAN.test"):
        assert httpx.get(base + "/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host
    from toucan.serve.api import allowed_hosts

    assert allowed_hosts("0.0.0.0", 8000) is None  # the key guards a LAN bind
    assert allowed_hosts("127.0.0.1", 8000, ["*"]) is None


def test_key_and_bind_rules(tmp_path, monkeypatch):
    monkeypatch.delenv("TOUCAN_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="empty key"):
        check_serve(ServeConfig(model="m", api_key=[""], port=free_port()))
    with pytest.raises(ConfigError, match="empty key"):
        check_serve(ServeConfig(model="m", api_key=["k", "  "], port=free_port()))
    with pytest.raises(ConfigError, match="--insecure"):
        check_serve(ServeConfig(model="m", host="0.0.0.0", port=free_port()))
    assert check_serve(ServeConfig(model="m", host="0.0.0.0", insecure=True, port=free_port())) == []
    assert check_serve(ServeConfig(model="m", host="0.0.0.0", api_key=["k"], port=free_port())) == ["k"]
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nsk-a\n\n  sk-b  \n")
    assert check_serve(ServeConfig(model="m", host="0.0.0.0", api_key_file=str(keys), port=free_port())) == \
        ["sk-a", "sk-b"]
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="no key"):
        check_serve(ServeConfig(model="m", api_key_file=str(tmp_path / "empty"), port=free_port()))
    with pytest.raises(ConfigError, match="api-key-file"):
        check_serve(ServeConfig(model="m", api_key_file=str(tmp_path / "missing"), port=free_port()))
    monkeypatch.setenv("TOUCAN_API_KEYS", "sk-c, sk-d")
    assert check_serve(ServeConfig(model="m", port=free_port())) == ["sk-c", "sk-d"]
    for bad in ("", " ", "sk-c,,sk-d"):
        monkeypatch.setenv("TOUCAN_API_KEYS", bad)
        with pytest.raises(ConfigError, match="TOUCAN_API_KEYS"):
            check_serve(ServeConfig(model="m", port=free_port()))


@pytest.mark.parametrize("args, says", [
    (["--api-key", ""], "--api-key: an empty key"),
    (["--host", "0.0.0.0"], "--insecure"),
    (["--port", "99999"], "--port 99999"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
])
def test_serve_refuses_bad_options_before_loading_the_model(tmp_path, args, says):
    """The model folder does not even exist: the options are checked first, in one line."""
    cmd = [sys.executable, "-m", "toucan.cli", "serve", "--model", str(tmp_path / "no-model"), *args]
    if "--port" not in args:
        cmd += ["--port", str(free_port())]
    env = {k: v for k, v in ENV.items() if k != "TOUCAN_API_KEYS"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if "toucan serve: error" in ln]
    assert len(err) == 1 and says in err[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_port_in_use_is_refused_before_loading(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            check_serve(ServeConfig(model="m", port=s.getsockname()[1]))


def test_a_key_from_a_file_does_not_show_in_ps(server):
    base, _, proc = server
    assert KEY.encode() not in open(f"/proc/{proc.pid}/cmdline", "rb").read()
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/v1/models", headers=AUTH).status_code == 200
