"""`toucan chat`'s conversation logic (the REPL itself is toucan.commands.chat): the history as
OpenAI-style messages for /save and /load, the streamed answer to a question after the history
(the engine drops the oldest turns when prompt + max_new_tokens would not fit the context, and we
log it), and `--plain`'s stdin question.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..engine import Engine, Stream
from ..errors import ConfigError
from ..fsutil import atomic_write_json, check_output
from ..sampling import SamplingParams

log = logging.getLogger(__name__)


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


def answer_stream(engine: Engine, history, question: str, params: SamplingParams) -> Stream:
    """The streamed answer to `question` after `history` (the oldest turns left out when the
    prompt would not fit, which is logged); iterate it for text deltas, .cancel() to stop."""
    prompt, kept = engine.chat_prompt(history, question, params.max_new_tokens)
    if len(kept) < len(history):
        log.info("history too long for the context: the oldest %d turn(s) are left out of the prompt",
                 len(history) - len(kept))
    return engine.stream(prompt, params)


def read_plain_question(stream) -> str:
    """All of stdin as one question, decoded as UTF-8 here (not by the locale's text layer) so bad
    bytes are one clear error naming where they start, not a UnicodeDecodeError traceback."""
    raw = stream.read()
    try:
        return raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"--plain: stdin is not UTF-8 text (byte {e.start}, line {line})") from None


def is_saved_chat(path: str) -> bool:
    """A file /save wrote: a JSON list of {role, content} messages (so /save may replace it)."""
    try:
        msgs = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(msgs, list) and all(isinstance(m, dict) and set(m) <= {"role", "content"} for m in msgs)


def save_history(path: str, history: list[tuple[str, str]]) -> None:
    """/save: the history as messages JSON; replaces a chat saved before, never some other file."""
    check_output(path, overwrite=is_saved_chat(path), is_dir=False)
    atomic_write_json(path, history_to_messages(history))


def load_history(path: str) -> list[tuple[str, str]]:
    """/load: a file /save wrote (OSError, ValueError or ConfigError when it is not one)."""
    return messages_to_history(json.loads(Path(path).read_text(encoding="utf-8")), path)
