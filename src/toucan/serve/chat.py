"""`toucan chat`: streaming multi-turn terminal chat on the engine.

Commands (FastChat's `!!` forms work too): /reset (!!reset) forget the history, /undo (!!remove,
!!undo) drop the last turn, /regen (!!regen) answer the last question again, /save FILE (!!save)
and /load FILE (!!load) the history as OpenAI-style messages JSON, /exit (!!exit, or EOF).
History goes into every prompt (toucan.prompts renders it); the engine drops the oldest turns when
prompt + max_new_tokens would not fit the context, and we say so.

`--plain` is for scripts: the whole of stdin is one question, the answer goes to stdout (no
banner, no prompt marks), exit status 0.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..config import ChatConfig
from ..engine import Engine, options_from
from ..errors import ConfigError, OutputError
from ..fsutil import atomic_write_json, check_output

log = logging.getLogger(__name__)

HELP = ("commands: /reset  /undo  /regen  /save FILE  /load FILE  /exit  (or !!reset !!remove !!regen "
        "!!save FILE !!load FILE !!exit)")
ALIASES = {"!!reset": "/reset", "!!remove": "/undo", "!!undo": "/undo", "!!regen": "/regen",
           "!!save": "/save", "!!load": "/load", "!!exit": "/exit", "/quit": "/exit", "/clear": "/reset"}


def history_to_messages(history: list[tuple[str, str]]) -> list[dict]:
    msgs = []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def messages_to_history(msgs, path: str) -> list[tuple[str, str]]:
    if not isinstance(msgs, list) or len(msgs) % 2 or any(
            not isinstance(m, dict) or m.get("role") != r or not isinstance(m.get("content"), str)
            for m, r in zip(msgs, ["user", "assistant"] * len(msgs))):
        raise ConfigError(f"{path}: expected a JSON list of alternating user/assistant messages")
    return [(msgs[i]["content"], msgs[i + 1]["content"]) for i in range(0, len(msgs), 2)]


def answer(engine: Engine, history, question: str, opts, out=None) -> str:
    """Stream the answer to `question` after `history` onto `out` (default: the current
    sys.stdout, looked up per call, not at import, so a replaced stdout is honoured); returns the
    full answer."""
    out = sys.stdout if out is None else out
    prompt, kept = engine.chat_prompt(history, question, opts.max_new_tokens)
    if len(kept) < len(history):
        log.info("history too long for the context: the oldest %d turn(s) are left out of the prompt",
                 len(history) - len(kept))
    stream = engine.stream(prompt, opts)
    parts = []
    try:
        for delta in stream:
            parts.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        stream.cancel()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(parts)


def read_plain_question(stream) -> str:
    """All of stdin as one question, decoded as UTF-8 here (not by the locale's text layer) so bad
    bytes are one clear error naming where they start, not a UnicodeDecodeError traceback."""
    raw = stream.read()
    try:
        return raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"--plain: stdin is not UTF-8 text (byte {e.start}, line {line})") from None


def _is_saved_chat(path: str) -> bool:
    """A file /save wrote: a JSON list of {role, content} messages (so /save may replace it)."""
    try:
        msgs = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(msgs, list) and all(isinstance(m, dict) and set(m) <= {"role", "content"} for m in msgs)


def run_chat(cfg: ChatConfig) -> int:
    engine = Engine.from_config(cfg)
    opts = options_from(cfg)
    if cfg.plain:
        question = read_plain_question(sys.stdin.buffer)
        if not question:
            raise ConfigError("--plain: no question on stdin")
        answer(engine, [], question, opts)
        return 0

    history: list[tuple[str, str]] = []
    tty = sys.stdin.isatty()
    print(f"toucan chat: {cfg.model}  ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input("用户: " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        except UnicodeDecodeError:  # a strict (non-C) locale's stdin
            print("[this line is not UTF-8 text: ignored]", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        try:  # stdin decodes bad bytes to lone surrogates (surrogateescape), which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError:
            print("[this line is not UTF-8 text: ignored]", file=sys.stderr)
            continue
        word, _, arg = text.partition(" ")
        cmd = ALIASES.get(word, word)
        if cmd == "/exit":
            break
        if cmd == "/reset":
            history.clear()
            print("[history cleared]")
        elif cmd == "/undo":
            if history:
                history.pop()
            print(f"[{len(history)} turn(s) left]")
        elif cmd == "/regen":
            if not history:
                print("[nothing to regenerate]")
                continue
            q, _ = history.pop()
            print("Toucan: ", end="", flush=True)
            history.append((q, answer(engine, history, q, opts)))
        elif cmd == "/save":
            if not arg:
                print("[usage: /save FILE]")
                continue
            try:  # replaces a chat saved before, never some other file (fsutil.check_output)
                check_output(arg, overwrite=_is_saved_chat(arg), is_dir=False)
                atomic_write_json(arg, history_to_messages(history))
            except (OSError, OutputError) as e:  # a bad path must not end the chat
                print(f"[cannot save to {arg}: {e}]")
                continue
            print(f"[saved {len(history)} turn(s) to {arg}]")
        elif cmd == "/load":
            try:
                history = messages_to_history(json.loads(Path(arg).read_text(encoding="utf-8")), arg)
            except (OSError, ValueError, ConfigError) as e:  # a bad file must not end the chat
                print(f"[cannot load {arg}: {e}]")
                continue
            print(f"[loaded {len(history)} turn(s) from {arg}]")
        elif cmd in ("/help", "!!help"):
            print(HELP)
        else:
            if cmd.startswith(("/", "!!")) and " " not in text and len(text) < 12:
                print(f"[unknown command {cmd}; {HELP}]")
                continue
            print("Toucan: ", end="", flush=True)
            history.append((text, answer(engine, history, text, opts)))
    return 0
