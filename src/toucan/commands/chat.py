"""`toucan chat`: streaming multi-turn terminal chat on the engine.

Commands (FastChat's `!!` forms work too): /reset (!!reset) forget the history, /undo (!!remove,
!!undo) drop the last turn, /regen (!!regen) answer the last question again, /save FILE (!!save)
and /load FILE (!!load) the history as OpenAI-style messages JSON, /exit (!!exit, or EOF).
History goes into every prompt (toucan.prompts renders it); the engine drops the oldest turns when
prompt + max_new_tokens would not fit the context, and we say so (toucan.serve.chat).

`--plain` is for scripts: the whole of stdin is one question, the answer goes to stdout (no
banner, no prompt marks), exit status 0.
"""

from __future__ import annotations

import sys

from ..config import ChatConfig
from ..engine import Engine
from ..errors import ConfigError, OutputError
from ..sampling import SamplingParams
from ..serve.chat import answer_stream, load_history, read_plain_question, save_history

HELP = ("commands: /reset  /undo  /regen  /save FILE  /load FILE  /exit  (or !!reset !!remove !!regen "
        "!!save FILE !!load FILE !!exit)")
ALIASES = {"!!reset": "/reset", "!!remove": "/undo", "!!undo": "/undo", "!!regen": "/regen",
           "!!save": "/save", "!!load": "/load", "!!exit": "/exit", "/quit": "/exit", "/clear": "/reset"}


def answer(engine: Engine, history, question: str, params: SamplingParams) -> str:
    """Stream the answer to `question` after `history` onto the current sys.stdout (looked up per
    call, so a replaced stdout is honoured); Ctrl-C stops this answer, not the chat. Returns it."""
    out = sys.stdout
    stream = answer_stream(engine, history, question, params)
    parts = []
    try:
        for delta in stream:
            parts.append(delta)
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        stream.cancel()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(parts)


def run(cfg: ChatConfig) -> int:
    engine = Engine.from_dir(cfg.model, **cfg.engine_options())
    params = cfg.sampling_params()
    if cfg.plain:
        question = read_plain_question(sys.stdin.buffer)
        if not question:
            raise ConfigError("--plain: no question on stdin")
        answer(engine, [], question, params)
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
            history.append((q, answer(engine, history, q, params)))
        elif cmd == "/save":
            if not arg:
                print("[usage: /save FILE]")
                continue
            try:
                save_history(arg, history)
            except (OSError, OutputError) as e:  # a bad path must not end the chat
                print(f"[cannot save to {arg}: {e}]")
                continue
            print(f"[saved {len(history)} turn(s) to {arg}]")
        elif cmd == "/load":
            try:
                history = load_history(arg)
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
            history.append((text, answer(engine, history, text, params)))
    return 0
