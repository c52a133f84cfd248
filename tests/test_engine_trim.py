"""History trimming (Engine.chat_prompt) is linear in the history and keeps exactly the turns the
drop-oldest-until-it-fits rule keeps; a huge prompt is measured from a prefix (issue 11)."""

import random

from toucan.engine import Engine
from toucan.prompts import build_prompt


class CountingEngine(Engine):
    """The real engine, counting the characters it tokenizes."""

    chars = 0

    def encode(self, prompt):
        self.chars += len(prompt)
        return super().encode(prompt)


def drop_oldest_until_it_fits(engine, history, question, max_new_tokens, system=None):
    """The rule, done the slow obvious way (what chat_prompt did before: O(turns^2) tokenizing)."""
    history = list(history)
    while True:
        prompt = build_prompt(question, "", history, engine.template, system=system)
        if not history or len(engine.encode(prompt)) <= engine.max_context - max_new_tokens:
            return prompt, history
        history.pop(0)


def random_history(rng, n):
    words = ["鳕鱼", "很", "好吃", "cod", "is", " tasty", "。", "？", "\n", "1 2 3", "❤", "#"]
    text = lambda: "".join(rng.choice(words) for _ in range(rng.randint(0, 30)))  # noqa: E731
    return [(text(), text()) for _ in range(n)]


def test_trimming_keeps_the_same_turns_as_the_rule(tiny_tok):
    rng = random.Random(0)
    for trial in range(40):
        engine = Engine(None, tiny_tok, max_context=rng.choice([64, 128, 256, 512]))
        history = random_history(rng, rng.randint(0, 60))
        if trial % 5 == 0:  # a huge old turn, never worth tokenizing twice
            history.insert(0, ("鳕鱼" * 5000, "好吃" * 5000))
        max_new = rng.choice([1, 16, 48])
        system = rng.choice([None, "你是一个助手。"])
        got = engine.chat_prompt(history, "你好", max_new, system=system)
        assert got == drop_oldest_until_it_fits(engine, history, "你好", max_new, system=system)


def test_trimming_is_linear_in_the_history(tiny_tok):
    """1,000 short turns used to re-tokenize the whole remaining history once per dropped turn
    (~60 MB of tokenizing for 120 KB); now the work depends on the context, not the history."""
    history = [(f"第{i}个问题：鳕鱼好吃吗？" * 3, f"第{i}个回答：鳕鱼很好吃。" * 3) for i in range(1000)]
    size = sum(len(q) + len(a) for q, a in history)
    work = {}
    for n in (1000, 10_000):
        engine = CountingEngine(None, tiny_tok, max_context=512)
        prompt, kept = engine.chat_prompt(history * (n // 1000), "你好", 64)
        assert 0 < len(kept) < 100 and engine.count_tokens(prompt) <= 512 - 64
        work[n] = engine.chars
        assert engine.chars < 5 * len(prompt) + 2000, (engine.chars, len(prompt), size)
    assert work[10_000] == work[1000]  # ten times the history, the same work


def test_a_huge_prompt_is_measured_from_a_prefix(tiny_tok):
    engine = CountingEngine(None, tiny_tok, max_context=512)
    prompt = "鳕鱼很好吃 " * 200_000  # 1.2 M characters
    n = engine.count_tokens(prompt, cap=511)
    assert n > 511 and engine.chars <= 32 * (511 + 16)
    engine.chars = 0
    assert engine.count_tokens("鳕鱼很好吃", cap=511) == len(engine.encode("鳕鱼很好吃"))  # exact below the cap
    # many characters per token ("a" and 40,000 spaces): a prefix does not settle it, and the count
    # is still exact up to the cap, above it otherwise
    spaces = "a" + " " * 40_000
    exact, got = len(engine.encode(spaces)), engine.count_tokens(spaces, cap=511)
    assert got == exact if exact <= 511 else got > 511
