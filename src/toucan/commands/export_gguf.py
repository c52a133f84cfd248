"""`toucan export gguf --model DIR --output FILE.gguf --type f16|bf16|q8_0|q4_0|q4_k_m`."""

from __future__ import annotations

from ..config import ExportGgufConfig
from ..gguf_export import export_gguf


def run(cfg: ExportGgufConfig) -> int:
    m = export_gguf(cfg.model, cfg.output, cfg.type, base=cfg.base, template=cfg.template,
                    overwrite=cfg.overwrite, threads=cfg.threads, trust_remote_code=cfg.trust_remote_code,
                    config=cfg)
    paths: dict[str, int] = {}
    for t in m["tensors"]:
        key = t["path"].split(" (")[0]
        paths[key] = paths.get(key, 0) + 1
    print(f"{cfg.output}: {cfg.type}, {len(m['tensors'])} tensors ("
          + ", ".join(f"{n} {k}" for k, n in sorted(paths.items())) + f"), {m['size'] / 1e6:.1f} MB, "
          f"vocabulary {m['tokenizer']['pieces']} pieces over {m['tokenizer']['rows']} rows")
    return 0
