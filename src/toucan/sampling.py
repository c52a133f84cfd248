"""How the engine decodes one request: `SamplingParams` (like vLLM's), the one place its defaults live.

    eng.generate(prompt, SamplingParams(max_new_tokens=64, temperature=0))   # greedy
    eng.generate(prompt, SamplingParams())                                   # toucan's chat defaults

The defaults are the original demo's sliders (temperature 0.5, top-p 0.75, top-k 40, repetition
penalty 1.2, 512 new tokens) with one beam: its beams=4 made the sampling sliders do nothing.
The commands' options (`toucan.config.GenerationOptions`) take their defaults from these fields,
and `OPENAI` holds what an OpenAI-compatible request gets for a field it leaves out
(toucan serve's API).

Greedy is one rule, `is_sampling` (`SamplingParams.sampling`): tokens are drawn at random only with do_sample, a
temperature above 0 and one beam; anything else decodes greedily (or by beam search). Every
backend (transformers' generate, the continuous batcher, llama.cpp, an OpenAI request) reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SamplingParams:
    max_new_tokens: int = 512        # most tokens to generate (fewer when the context runs out)
    temperature: float = 0.5         # 0 = greedy
    top_p: float = 0.75              # nucleus sampling (1.0 = off)
    top_k: int = 40                  # 0 = no limit
    repetition_penalty: float = 1.2  # 1.0 = off
    num_beams: int = 1               # > 1: beam search (no sampling, no streaming token by token)
    do_sample: bool = True           # False = greedy
    seed: Optional[int] = None       # None = nondeterministic
    stop: list[str] = field(default_factory=list)  # generation ends before any of them (not returned)
    min_new_tokens: int = 0          # EOS is suppressed until this many tokens

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random; otherwise decoding is greedy (or beam search)."""
        return is_sampling(self)


def is_sampling(p: SamplingParams) -> bool:
    """The greedy rule (SamplingParams.sampling), for anything with these fields: random draws only
    with do_sample, temperature > 0 and one beam; otherwise greedy, or beam search."""
    return bool(p.do_sample) and p.temperature > 0 and max(1, p.num_beams) == 1


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))

# What an OpenAI-compatible request gets for a sampling field it leaves out (OpenAI's defaults:
# temperature 1, no top-p/top-k cut, no repetition penalty); max_new_tokens stays toucan's.
OPENAI = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
