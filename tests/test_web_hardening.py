"""`toucan web` against hostile but fair users (issue 11): login throttling in Gradio's real
/login route, passwords out of `ps`, and a too-long question shown with its reason."""

import time

import httpx
import pytest

from conftest import free_port
from test_engine import train_parrot
from toucan.config import WebConfig
from toucan.engine import Engine
from toucan.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(tiny_tok):
    import torch

    torch.set_num_threads(1)
    return Engine(train_parrot(tiny_tok), tiny_tok)


def serve_page(engine, auth=None, **cfg):
    from toucan.serve.web import build_app, launch

    cfg = WebConfig(model="runs/parrot", port=free_port(), do_sample=False, repetition_penalty=1.0, **cfg)
    app = build_app(engine, cfg.sampling_params(), model_name="parrot", concurrency=cfg.concurrency)
    launch(app, host=cfg.host, port=cfg.port, auth=auth, login_attempts=cfg.login_attempts,
           login_lockout=cfg.login_lockout, prevent_thread_lock=True, quiet=True)
    return app, f"http://127.0.0.1:{cfg.port}"


def test_too_long_question_shows_the_reason(engine):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    app, url = serve_page(engine)
    try:
        client = Client(url + "/", verbose=False)
        knobs = (0.5, 0.75, 40, 1, 1.0, 16, False)  # temperature, top_p, top_k, beams, rep, max tokens, do_sample
        chat = [{"role": "user", "content": [{"type": "text", "text": "你好" * 600}]}]
        with pytest.raises(AppError, match="context is 512"):  # not "raised an exception but ..."
            client.predict(chat, *knobs, api_name="/respond")
        chat = [{"role": "user", "content": [{"type": "text", "text": "你好"}]}]
        out = client.predict(chat, *knobs, api_name="/respond")  # the page still answers
        assert out[-1]["content"][0]["text"] == "鳕鱼很好吃。"
    finally:
        app.close()


def test_failed_logins_lock_a_client_out(engine):
    app, url = serve_page(engine, auth=[("ann", "right-pw")], login_attempts=3, login_lockout=3.0)

    def login(pw, source="127.0.0.1"):
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as c:
            return c.post(url + "/login", data={"username": "ann", "password": pw}).status_code

    try:
        assert login("right-pw") == 200
        assert [login(f"guess{i}") for i in range(3)] == [400, 400, 400]  # Gradio's "Incorrect credentials"
        t0 = time.monotonic()
        assert login("guess3") == 429 and login("right-pw") == 429  # locked: even the right password
        assert login("right-pw", source="127.0.0.2") == 200  # another client address is not locked
        time.sleep(max(0.0, 3.2 - (time.monotonic() - t0)))
        assert login("right-pw") == 200  # the lockout ends, and a success clears the count
        assert login("guess4") == 400
    finally:
        app.close()


def test_passwords_from_the_environment_and_no_empty_auth(tmp_path, monkeypatch):
    from toucan.serve.web import check_bind

    monkeypatch.delenv("TOUCAN_WEB_AUTH", raising=False)
    with pytest.raises(ConfigError, match="empty value"):
        check_bind("127.0.0.1", "", False)
    empty = tmp_path / "users"
    empty.write_text("# nobody\n")
    with pytest.raises(ConfigError, match="no user:pass"):
        check_bind("0.0.0.0", str(empty), False)
    monkeypatch.setenv("TOUCAN_WEB_AUTH", "ann:pw\nbob:s3:cret\n")
    assert check_bind("0.0.0.0", None, False) == [("ann", "pw"), ("bob", "s3:cret")]
    assert check_bind("127.0.0.1", "cy:pw2", False) == [("cy", "pw2")]  # --auth wins
    monkeypatch.setenv("TOUCAN_WEB_AUTH", "")
    with pytest.raises(ConfigError, match="TOUCAN_WEB_AUTH"):
        check_bind("127.0.0.1", None, False)
