"""Chinese toy instruction data for `toucan demo`: task families a tiny model can learn in minutes
on a CPU, each asked in several phrasings, with a train/held-out split that shares no problem.

A "problem" is a family plus its content (the two numbers, the string); its phrasing is drawn
separately. The held-out set is made of problems that never occur in training under any
phrasing, so exact-match accuracy measures a learned procedure, not memorised answers.
Each family answers in one fixed sentence, so exact match is unambiguous.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ConfigError

GENERATOR_VERSION = 9  # bump when the generated data changes: `toucan demo` then regenerates it

# Characters the string tasks draw from: common, distinct, one SentencePiece piece each.
POOL = "春夏秋冬山水火木金土日月星云风雨花草鸟鱼虫马牛羊猫狗书画琴棋红黄蓝绿"


@dataclass(frozen=True)
class Family:
    name: str
    phrasings: tuple[str, ...]                   # question templates (str.format over the slots)
    reply: str                                   # the one answer template
    sample: Callable[[random.Random], tuple]     # one random problem (hashable)
    slots: Callable[[tuple], dict]               # problem -> template slots, the answer included


def _string(rng: random.Random, lo: int, hi: int) -> tuple:
    return tuple(rng.choice(POOL) for _ in range(rng.randint(lo, hi)))


def _number_of_width(rng: random.Random, digits: int) -> int:
    """Widths drawn evenly, not numbers (most numbers below 100000 have five digits)."""
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _s(p: tuple) -> str:
    return "".join(p)


# Bare answers ("52", "奇数"): exact match is unambiguous. (Answers that restate the question,
# "36+7=43", were tried: more copying to get right, and 20 % instead of 25 % in the same budget.)
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("compare",
           ("{a}和{b}哪个大？", "比较{a}与{b}，较大的数是哪个？", "在{a}和{b}中，哪个数更大？"),
           "{c}",
           lambda r: tuple(r.sample(range(100), 2)),
           lambda p: {"a": p[0], "b": p[1], "c": max(p)}),
    Family("div5",
           ("{a}能被5整除吗？", "{a}是5的倍数吗？", "判断：{a}能否被5整除？"),
           "{c}",
           # half of them multiples of 5, so "否" alone scores 50 %, not 80 %
           lambda r: (r.randrange(0, 1000, 5) if r.random() < 0.5 else r.randint(0, 999),),
           lambda p: {"a": p[0], "c": "是" if p[0] % 5 == 0 else "否"}),
    Family("digits",
           ("{a}是几位数？", "{a}有几位？", "数字{a}一共有几位数字？"),
           "{c}",
           lambda r: (_number_of_width(r, r.randint(1, 5)),),
           lambda p: {"a": p[0], "c": len(str(p[0]))}),
    Family("greater",
           ("{a}比{b}大吗？", "{a}大于{b}吗？", "判断：{a}是否大于{b}？"),
           "{c}",
           lambda r: tuple(r.sample(range(100), 2)),
           lambda p: {"a": p[0], "b": p[1], "c": "是" if p[0] > p[1] else "否"}),
    Family("count",
           ("“{s}”有几个字？", "数一数“{s}”中有多少个字符。", "字符串“{s}”的长度是多少？"),
           "{c}",
           lambda r: _string(r, 1, 9),
           lambda p: {"s": _s(p), "c": len(p)}),
    Family("parity",
           ("{a}是奇数还是偶数？", "判断{a}的奇偶性。", "{a}是单数还是双数？"),
           "{c}",
           lambda r: (r.randint(0, 999),),
           lambda p: {"a": p[0], "c": "偶数" if p[0] % 2 == 0 else "奇数"}),
    Family("repeat",
           ("请重复“{s}”。", "把“{s}”再说一遍。", "跟我说：“{s}”"),
           "{s}",
           lambda r: _string(r, 2, 6),
           lambda p: {"s": _s(p)}),
    Family("reverse",
           ("把“{s}”倒过来写。", "请将字符串“{s}”反转。", "“{s}”倒序是什么？"),
           "{c}",
           lambda r: _string(r, 3, 5),
           lambda p: {"s": _s(p), "c": _s(reversed(p))}),
    Family("add",
           ("{a}加{b}等于多少？", "计算{a}+{b}。", "请问{a}与{b}的和是多少？", "{a}+{b}=？"),
           "{c}",
           lambda r: (r.randint(0, 99), r.randint(1, 9)),
           lambda p: {"a": p[0], "b": p[1], "c": p[0] + p[1]}),
)}
def make_example(family: Family, problem: tuple, rng: random.Random) -> dict:
    slots = family.slots(problem)
    return {"instruction": rng.choice(family.phrasings).format(**slots), "input": "",
            "output": family.reply.format(**slots), "family": family.name}


def generate(n_train: int, n_eval: int, seed: int, families: Sequence[str]) -> tuple[list[dict], list[dict]]:
    """(train, held_out) records, the families in equal shares, shuffled, deterministic in seed.
    No problem (family + content) is in both sets; held-out problems are distinct."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown demo task famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                          f"known: {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    train, held = [], []
    for k, name in enumerate(families):
        fam = FAMILIES[name]
        want_train = n_train // len(families) + (k < n_train % len(families))
        want_eval = n_eval // len(families) + (k < n_eval % len(families))
        held_out: set[tuple] = set()
        tries = 0
        while len(held_out) < want_eval:
            held_out.add(fam.sample(rng))
            tries += 1
            assert tries < 100 * want_eval + 1000, f"{name}: problem space too small"
        problems = sorted(held_out)
        rng.shuffle(problems)
        held += [make_example(fam, p, rng) for p in problems]
        # training problems avoid the held-out ones; they may repeat (in other phrasings) where
        # the problem space is small (add: 900 problems)
        while want_train:
            p = fam.sample(rng)
            if p not in held_out:
                train.append(make_example(fam, p, rng))
                want_train -= 1
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
