"""The one place prompts are built. Training, chat, web, the API server and evaluation all call
`build_prompt` (or `messages_to_turns` + `build_prompt`), so the bytes a model is trained on are the
bytes it is asked with. The original Toucan trained on the Alpaca prompt but demoed with another:
that is the bug this module exists to prevent.

Rendering (template "alpaca", Stanford Alpaca's prompt, exactly as the original Toucan trained):

    single turn, no input:  {header}### Instruction:\n{instruction}\n\n### Response:
    single turn, input:     {header_input}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:

and the training target is `{output}` followed by the EOS *token* (added as an id by toucan.data,
never as text, so no tokenizer can split "</s>" into pieces).

Multi-turn history: earlier turns are rendered, oldest first, between the header and the current
turn, each as `### Instruction:\n{q}\n\n### Response:{a}\n\n` (an earlier turn's input, if any, is
folded into its instruction as `{q}\n\n{input}`). With no history the result is byte-identical to the
single-turn prompt, which is what the model saw in training. Which turns fit the context is decided
by the caller (toucan.engine truncates oldest-first); this module only renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import ConfigError


@dataclass(frozen=True)
class Template:
    name: str
    header: str            # used when the current turn has no input
    header_input: str      # used when the current turn has an input
    instruction: str       # "{instruction}" slot
    input: str             # "{input}" slot
    response: str          # what the model continues after
    turn_sep: str          # between a finished answer and the next instruction


ALPACA = Template(
    name="alpaca",
    header=("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"),
    header_input=("Below is an instruction that describes a task, paired with an input that provides "
                  "further context. Write a response that appropriately completes the request.\n\n"),
    instruction="### Instruction:\n{instruction}\n\n",
    input="### Input:\n{input}\n\n",
    response="### Response:",
    turn_sep="\n\n",
)

TEMPLATES: dict[str, Template] = {t.name: t for t in (ALPACA,)}
DEFAULT_TEMPLATE = "alpaca"


def get_template(name: str | Template = DEFAULT_TEMPLATE) -> Template:
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}") from None


Turn = tuple[str, str]  # (user text, assistant text)


def build_prompt(instruction: str, input: str = "", history: Iterable[Turn] = (),
                 template: str | Template = DEFAULT_TEMPLATE, system: str | None = None) -> str:
    """The text the model continues. `system`, when given, replaces the template's header."""
    t = get_template(template)
    header = system if system is not None else (t.header_input if input else t.header)
    parts = [header]
    parts += [render_turn(q, a, t) for q, a in history]
    parts.append(t.instruction.format(instruction=instruction))
    if input:
        parts.append(t.input.format(input=input))
    parts.append(t.response)
    return "".join(parts)


def render_turn(question: str, answer: str, template: str | Template = DEFAULT_TEMPLATE) -> str:
    """One earlier turn as build_prompt renders it in the history (the engine sizes turns with it)."""
    t = get_template(template)
    return t.instruction.format(instruction=question) + t.response + answer + t.turn_sep


def fold_input(instruction: str, input: str = "") -> str:
    """An earlier turn's instruction+input as one user message (how history keeps inputs)."""
    return f"{instruction}\n\n{input}" if input else instruction


def messages_to_turns(messages: Sequence[dict]) -> tuple[str | None, list[Turn], str]:
    """OpenAI-style messages -> (system, history, current instruction).

    The last message must be the user's; user/assistant messages before it must alternate.
    """
    system = None
    msgs = list(messages)
    if msgs and msgs[0].get("role") == "system":
        system = str(msgs.pop(0).get("content") or "")
    if not msgs or msgs[-1].get("role") != "user":
        raise ConfigError("the last message must have role 'user'")
    history: list[Turn] = []
    pending: str | None = None
    for i, m in enumerate(msgs[:-1]):
        role, content = m.get("role"), str(m.get("content") or "")
        if role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            history.append((pending, content))
            pending = None
        else:
            raise ConfigError(f"message {i}: expected role {'user' if pending is None else 'assistant'}, got {role!r}")
    if pending is not None:
        raise ConfigError("two user messages in a row before the last one")
    return system, history, str(msgs[-1].get("content") or "")


def chat_prompt(messages: Sequence[dict], template: str | Template = DEFAULT_TEMPLATE) -> str:
    system, history, instruction = messages_to_turns(messages)
    return build_prompt(instruction, history=history, template=template, system=system)


def chat_template(template: str | Template = DEFAULT_TEMPLATE) -> str:
    """The Jinja chat template that renders `chat_prompt(messages)` byte for byte, generated from the
    same Template fields, so there is one definition of the prompt. It goes into every
    tokenizer_config.json toucan writes (transformers' apply_chat_template and the servers built on
    it) and into GGUF files as tokenizer.chat_template (llama.cpp's chat and server).

    Messages: an optional first system message (replaces the header), then user/assistant turns
    alternating, starting with the user. A user turn renders its instruction block; an assistant turn
    renders the response marker, its text and the turn separator; add_generation_prompt appends the
    response marker the model continues after. So with add_generation_prompt the result equals
    `chat_prompt(messages)`, and without it a finished conversation renders as the history does.
    BOS is not in the text: it is added as an id (toucan.data, llama.cpp's add_bos_token)."""
    t = get_template(template)
    ins_pre, ins_post = t.instruction.split("{instruction}")

    def lit(s: str) -> str:  # a JSON string literal is a valid Jinja one (", \\ and \n escaped)
        return json.dumps(s, ensure_ascii=False)

    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{- messages[0]['content'] or '' -}}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{{- " + lit(t.header) + " -}}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'user' and loop.index0 % 2 == 0 -%}"
        "{{- " + lit(ins_pre) + " + (message['content'] or '') + " + lit(ins_post) + " -}}"
        "{%- elif message['role'] == 'assistant' and loop.index0 % 2 == 1 -%}"
        "{{- " + lit(t.response) + " + (message['content'] or '') + " + lit(t.turn_sep) + " -}}"
        "{%- else -%}"
        "{{- raise_exception('messages must be: an optional system message, then user and assistant "
        "alternating, starting with user') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- " + lit(t.response) + " -}}"
        "{%- endif -%}"
    )


# ----------------------------------------------------------------------------------------------
# The BELLE judge message (toucan eval judge), byte for byte as BELLE's eval page builds it,
# including its odd spacing and quotes: judge scores are only comparable if the judge reads the
# same text. Classes whose std_answer BELLE does not show the judge: generation, brainstorming,
# rewrite (BELLE uses the no-reference form for rewrite even where a reference exists).
JUDGE_NO_REFERENCE = ("generation", "brainstorming", "rewrite")


def judge_message(judge_prompt: str, question: str, answer: str, std_answer: str, cls: str) -> str:
    """The user message sent to the judge for one answer; `cls` is a normalised class name."""
    if cls in JUDGE_NO_REFERENCE:
        return f"{judge_prompt} {question}  模型回答： '{answer}'。请针对模型回答给出得分，顺便给出理由："
    return (f"{judge_prompt} {question} 标准回答:{std_answer}  模型回答：' {answer}'。"
            "请针对模型回答给出得分，顺便给出理由：")
