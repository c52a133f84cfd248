"""`toucan tokenizer extend --base BASE.model --add ADD.model --output DIR`: Chinese-LLaMA's
vocabulary merge (toucan.tokenizer.extend)."""

from __future__ import annotations

from pathlib import Path

from ..config import TokenizerExtendConfig
from ..tokenizer import extend


def run(cfg: TokenizerExtendConfig) -> int:
    stats = extend(cfg.base, cfg.add, cfg.output, overwrite=cfg.overwrite, command="tokenizer extend", config=cfg)
    print(f"{cfg.output}: {stats['pieces']} pieces ({stats['base_pieces']} base + {stats['appended']} "
          f"appended of {stats['add_pieces']} in {Path(cfg.add).name})")
    return 0
