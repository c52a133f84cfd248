"""`toucan web`'s Gradio chat page on the engine (the command is toucan.commands.web).

What the original demo got wrong and this page does instead: it streams token by token; the whole
conversation goes into the prompt (toucan.prompts renders it; the engine drops the oldest turns
when it would not fit context - max tokens); the sliders are the original's (temperature 0.5,
top-p 0.75, top-k 40, beams, repetition penalty 1.2, max tokens 512) and `do_sample` is honoured
(off, or temperature 0, means greedy; beams > 1 means beam search, shown when done); it binds
127.0.0.1 and never makes a public share link; a non-loopback --host needs --auth or --insecure.
Passwords can come from a file (--auth FILE) or TOUCAN_WEB_AUTH, so they need not show in `ps`;
after --login-attempts failed logins a client address gets 429 for --login-lockout seconds
(LoginThrottle, around Gradio's own /login route). A question too long for the model's context is
shown as that reason (gr.Error), not as Gradio's generic "Error".

Each browser session has its own history: it lives in that session's Chatbot value (Gradio keeps
component values per session), never in a module global. Stop cancels the Gradio event and the
engine row (so the model stops too); Regenerate answers the last question again; Clear empties it.
"""

# (no `from __future__ import annotations`: Gradio finds the gr.Request parameter by its live annotation)

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Optional

from ..engine import Engine, Stream
from ..errors import ConfigError
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _auth_lines(text: str) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def parse_auth(auth: str | None) -> list[tuple[str, str]] | None:
    """'user:pass', or a file with one user:pass per line (blank lines and # comments skipped);
    with no --auth, TOUCAN_WEB_AUTH (user:pass lines). An empty value is an error, not "no login"."""
    env = os.environ.get("TOUCAN_WEB_AUTH")
    if auth is None and env is None:
        return None
    if auth is None:
        pairs, where = _auth_lines(env), "TOUCAN_WEB_AUTH"
    elif Path(auth).is_file():
        try:
            pairs, where = _auth_lines(Path(auth).read_text(encoding="utf-8")), auth
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--auth {auth}: {getattr(e, 'strerror', None) or e}") from None
    else:
        pairs, where = [auth.strip()] if auth.strip() else [], "--auth"
    if not pairs:
        raise ConfigError(f"{where}: no user:pass given (an empty value would switch the login off)")
    out = []
    for p in pairs:
        user, sep, pw = p.partition(":")
        if not sep or not user or not pw:
            raise ConfigError(f"{where}: expected user:pass, got {p[:40]!r}")
        out.append((user, pw))
    return out


def check_bind(host: str, auth: str | None, insecure: bool) -> list[tuple[str, str]] | None:
    """The logins (parse_auth) for a page bound to `host`; a non-loopback host needs some, or `insecure`."""
    logins = parse_auth(auth)
    if host not in LOOPBACK and not logins and not insecure:
        raise ConfigError(f"--host {host} would let anyone on the network use the model: give --auth user:pass "
                          "(or an auth file), or --insecure if you really mean it")
    return logins


class LoginThrottle:
    """Refuses (429) a client address for `lockout` seconds after `attempts` failed logins.

    Gradio's /login checks credentials with no limit and its auth callable never sees the client,
    so this is an ASGI middleware on Gradio's own app (launch(app_kwargs={"middleware": ...})): it
    sees every POST /login, counts Gradio's 400 answers per client address, and refuses the next
    ones before Gradio checks anything (a right password too, or the lockout would only slow
    guessing). A successful login clears the count."""

    def __init__(self, app, attempts: int = 5, lockout: float = 60.0):
        self.app, self.attempts, self.lockout = app, max(1, attempts), lockout
        self.failures: dict[str, list[float]] = {}  # client address -> times of recent failures
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/login":
            return await self.app(scope, receive, send)
        client = (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.failures.get(client, []) if now - t < self.lockout]
            self.failures[client] = recent
            if not recent:
                del self.failures[client]  # the dict holds only addresses failing right now
        if len(recent) >= self.attempts:
            wait = int(self.lockout - (now - recent[-self.attempts])) + 1
            body = json.dumps({"detail": f"Too many failed logins: try again in {wait} s."}).encode()
            await send({"type": "http.response.start", "status": 429,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", str(wait).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        with self.lock:
            if status.get("code") == 400:  # Gradio's "Incorrect credentials."
                self.failures.setdefault(client, []).append(time.monotonic())
                if len(self.failures) > 10_000:  # many addresses guessing: forget those not locked now
                    cut = time.monotonic() - self.lockout
                    self.failures = {c: ts for c, ts in self.failures.items() if ts[-1] > cut}
            elif status.get("code") == 200:
                self.failures.pop(client, None)


def launch(app, *, host: str, port: int, auth, login_attempts: int, login_lockout: float, **kwargs):
    """Gradio's launch with toucan's rules: the bind, no share link, login throttling."""
    from starlette.middleware import Middleware

    throttle = Middleware(LoginThrottle, attempts=login_attempts, lockout=login_lockout)
    return app.launch(server_name=host, server_port=port, auth=auth, share=False, inbrowser=False,
                      footer_links=[], app_kwargs={"middleware": [throttle]}, **kwargs)


def _text(content) -> str:
    """A Gradio message's content (a string, or a list of {'type': 'text', 'text': ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(_text(c) for c in content or [])


def history_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """Chatbot messages (user, assistant, user, assistant, ...) -> [(q, a), ...]."""
    pairs, q = [], None
    for m in messages:
        if m["role"] == "user":
            q = _text(m["content"])
        elif q is not None:
            pairs.append((q, _text(m["content"])))
            q = None
    return pairs


def web_prompt(engine: Engine, messages: list[dict], question: str, max_new_tokens: int) -> str:
    """The prompt the page sends for `question` after the conversation in `messages`."""
    return engine.chat_prompt(history_pairs(messages), question, max_new_tokens)[0]


def _add_user(message: str, chat: list):
    """Enter/Send: the question joins the conversation and the box empties (a blank one does nothing)."""
    import gradio as gr

    if not message.strip():
        return gr.update(), chat
    return "", chat + [{"role": "user", "content": message}]


def _drop_last_answer(chat: list) -> list:
    """Regenerate: the conversation up to the last question, which is then answered again."""
    while chat and chat[-1]["role"] == "assistant":
        chat = chat[:-1]
    return chat


def _settings_panel(gr, engine: Engine, params: SamplingParams) -> list:
    """The generation sliders (the original demo's, starting at `params`), in the order respond takes them."""
    with gr.Accordion("生成参数 Generation settings", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=params.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.05, 1, value=params.top_p, step=0.05, label="Top P")
            top_k = gr.Slider(0, 100, value=params.top_k, step=1, label="Top K")
        with gr.Row():
            beams = gr.Slider(1, 4, value=params.num_beams, step=1, label="Beams (>1: beam search, no streaming)")
            rep = gr.Slider(1, 2, value=params.repetition_penalty, step=0.05, label="Repetition penalty")
            max_tokens = gr.Slider(1, engine.max_context - 1,
                                   value=min(params.max_new_tokens, engine.max_context - 1),
                                   step=1, label="Max tokens")
            do_sample = gr.Checkbox(value=params.do_sample, label="do_sample (off = greedy)")
    return [temperature, top_p, top_k, beams, rep, max_tokens, do_sample]


def build_app(engine: Engine, params: SamplingParams, *, model_name: Optional[str] = None,
              concurrency: Optional[int] = None):
    """The page: `params` are the sliders' starting values (their stop strings and seed are not
    used: the page has no such controls), `model_name` is shown under the title, `concurrency`
    is how many chat requests Gradio runs at once (None: Gradio's default)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home
    import gradio as gr

    active: dict[str, Stream] = {}  # browser session -> its running generation (for Stop)
    lock = threading.Lock()

    def respond(chat: list, temperature, top_p, top_k, beams, rep, max_tokens, do_sample,
                request: gr.Request):
        if not chat or chat[-1]["role"] != "user":
            yield chat
            return
        question = _text(chat[-1]["content"])
        opts = dataclasses.replace(params, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                   num_beams=int(beams), repetition_penalty=float(rep),
                                   max_new_tokens=int(max_tokens), do_sample=bool(do_sample), stop=[], seed=None)
        try:
            stream = engine.stream(web_prompt(engine, chat[:-1], question, opts.max_new_tokens), opts)
        except ConfigError as e:  # the question alone does not fit the context: say so
            raise gr.Error(str(e), title="Question too long", print_exception=False) from None
        sid = request.session_hash or ""
        with lock:
            active[sid] = stream
        answer = ""
        chat = chat + [{"role": "assistant", "content": ""}]
        try:
            for delta in stream:
                answer += delta
                chat[-1] = {"role": "assistant", "content": answer}
                yield chat
        finally:  # also when Stop cancels this event or the browser goes away
            stream.cancel()
            with lock:
                if active.get(sid) is stream:
                    del active[sid]
        yield chat

    def stop(request: gr.Request):
        with lock:
            s = active.get(request.session_hash or "")
        if s is not None:
            s.cancel()

    with gr.Blocks(title="Toucan") as app:
        gr.Markdown("## Toucan 中文对话" + (f"\n`{model_name}`" if model_name else ""))
        chat = gr.Chatbot(label="Toucan", height=460, elem_id="chat",
                          placeholder="问我任何问题 · Ask anything", buttons=["copy"])
        with gr.Row():
            box = gr.Textbox(placeholder="输入问题，回车发送 (Enter to send)", show_label=False, scale=8,
                             elem_id="msg", autofocus=True)
            send = gr.Button("发送 Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop_btn = gr.Button("停止 Stop", elem_id="stop")
            regen = gr.Button("重新生成 Regenerate", elem_id="regen")
            clear = gr.Button("清空 Clear History", elem_id="clear")
        knobs = _settings_panel(gr, engine, params)

        runs = []
        for trigger in (box.submit, send.click):
            ev = trigger(_add_user, [box, chat], [box, chat], queue=False)
            runs.append(ev.then(respond, [chat, *knobs], chat))
        runs.append(regen.click(_drop_last_answer, chat, chat, queue=False).then(respond, [chat, *knobs], chat))
        stop_btn.click(stop, None, None, cancels=runs, queue=False)
        clear.click(stop, None, None, cancels=runs, queue=False).then(lambda: [], None, chat, queue=False)
    app.queue(**({} if concurrency is None else {"default_concurrency_limit": concurrency}))
    return app
