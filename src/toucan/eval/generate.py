"""`toucan eval generate`: answer every eval-set question with a model, through the shared engine.

Each question is asked exactly as a user would ask it in chat (toucan.prompts.build_prompt with
the model's template, no input, no history). Questions are batched in order of prompt length (less
padding per batch) and each answer is appended to answers.jsonl and fsync'd as soon as its batch
finishes, so a killed run loses at most one batch and a rerun skips every question already answered.
The first line of answers.jsonl records the model, the eval set and the generation settings; a
rerun with different settings is refused rather than mixing two kinds of answers in one file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from ..config import EvalGenerateConfig, GenerationOptions
from ..errors import EvalError
from ..fsutil import append_jsonl, check_output, sha256_file
from ..prompts import build_prompt
from .items import CLASSES, load_eval_set, read_records, repair_torn_tail

log = logging.getLogger(__name__)


def generation_options(cfg: EvalGenerateConfig) -> GenerationOptions:
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    return GenerationOptions(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def _meta(cfg: EvalGenerateConfig, items: list[dict]) -> dict:
    counts = Counter(i["class"] for i in items)
    return {"kind": "answers", "model": cfg.model_name or Path(cfg.model).resolve().name,
            "model_dir": str(cfg.model), "template": cfg.template,
            "eval_set": str(cfg.data), "eval_set_sha256": sha256_file(cfg.data),
            "class_counts": {c: counts[c] for c in CLASSES},
            "generation": dataclasses.asdict(generation_options(cfg))}


def _is_answers_file(path: Path) -> bool:
    """Whether `path` is an answers file of `toucan eval generate` (its first line is the answers
    _meta record): only such a file is resumed, repaired or started over without --overwrite."""
    import json

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            line = f.readline()
        if not line.endswith("\n"):  # torn while the first line was written (as _meta puts kind first)
            return line.startswith('{"_meta": {"kind": "answers"')
        first = json.loads(line)
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and isinstance(first.get("_meta"), dict) and first["_meta"].get("kind") == "answers"


def _done_ids(cfg: EvalGenerateConfig, meta: dict) -> set[str]:
    """Ids already answered in an existing output (after checking it was made the same way)."""
    out = Path(cfg.output)
    own = _is_answers_file(out)
    # An answers file is resumed by design (or refused below when made another way): only some
    # other file needs --overwrite; an input never.
    check_output(out, overwrite=cfg.overwrite or own, inputs=[cfg.data, cfg.model], is_dir=False)
    if not own:  # no file, an empty one, or another file that --overwrite allows replacing
        return set()
    repair_torn_tail(out)
    if out.stat().st_size == 0:  # killed while writing the first line
        return set()
    old, answers = read_records(out, "answers")
    for key in ("model", "template", "eval_set_sha256", "generation"):
        if old.get(key) != meta[key]:
            if cfg.overwrite:
                log.warning("%s was made with a different %s: starting it over (--overwrite)", out, key)
                return set()
            raise EvalError(f"{out} was made with a different {key} ({old.get(key)!r}, now {meta[key]!r}); "
                            "write to a new --output (or pass --overwrite to start it over) instead of mixing answers")
    return {a["id"] for a in answers}


def run_eval_generate(cfg: EvalGenerateConfig) -> int:
    from ..engine import Engine

    items = load_eval_set(cfg.data)
    meta = _meta(cfg, items)  # class counts of the whole set: the report counts missing answers against it
    if cfg.limit is not None:
        items = items[: cfg.limit]
    done = _done_ids(cfg, meta)
    todo = [i for i in items if i["id"] not in done]
    if not done:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).unlink(missing_ok=True)
        append_jsonl(cfg.output, {"_meta": meta})
    log.info("%s: %d questions, %d already answered, %d to go", cfg.output, len(items), len(items) - len(todo), len(todo))
    if not todo:
        print(f"{cfg.output}: all {len(items)} questions already answered")
        return 0

    engine = Engine.from_config(cfg)
    opts = generation_options(cfg)
    prompts = {i["id"]: build_prompt(i["question"], template=cfg.template) for i in todo}
    n_tokens = {k: engine.count_tokens(p) for k, p in prompts.items()}
    too_long = [i for i in todo if n_tokens[i["id"]] >= engine.max_context]
    if too_long:  # not answered, so the report counts them as missing (per class)
        log.warning("%d question(s) do not fit the model's %d-token context and are skipped: %s", len(too_long),
                    engine.max_context, ", ".join(i["id"] for i in too_long[:5]) + (" ..." if len(too_long) > 5 else ""))
    todo = sorted((i for i in todo if n_tokens[i["id"]] < engine.max_context), key=lambda i: n_tokens[i["id"]])
    bs = max(1, cfg.batch_size)
    tokens = 0
    with tqdm(total=len(todo), desc="generate", unit="q") as bar:
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            completions = engine.generate_batch([prompts[i["id"]] for i in batch], opts)
            for item, c in zip(batch, completions):
                append_jsonl(cfg.output, {**item, "answer": c.text.strip(), "prompt_tokens": c.prompt_tokens,
                                          "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason})
                tokens += c.completion_tokens
            bar.update(len(batch))
    print(f"answered {len(todo)} questions ({tokens} tokens generated) -> {cfg.output}")
    return 0
