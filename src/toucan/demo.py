"""The toy-scale recipe's own parts, for `toucan demo` (toucan.commands.demo): generated data, a
SentencePiece tokenizer trained on it, a random tiny LLaMA, greedy exact match through the engine,
a chat transcript and the summary text. Each step's output lives in a folder of the demo's run
folder with a settings stamp, so a rerun with the same settings reuses it.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .demo_tasks import GENERATOR_VERSION, generate
from .engine import Engine
from .errors import OutputError
from .fsutil import atomic_dir, atomic_write_text
from .modeling import load_tokenizer, save_model_dir, tiny_llama
from .prompts import build_prompt, get_template
from .sampling import SamplingParams
from .tokenizer import finish_tokenizer_dir

# What a demo run folder holds: the demo reuses and replaces its own steps in such a folder only.
DEMO_MARKERS = ("data/settings.json", "tokenizer/demo_settings.json", "base/toucan.json", "summary.json")

# Families as BELLE eval classes, so `toucan eval` (whose table has BELLE's ten columns) can score
# the demo's held-out questions; the reference judge's ROUGE-L against the one right answer is 1.0
# exactly when the answer is right.
EVAL_CLASS = {"parity": "math", "add": "math", "div5": "classification", "greater": "classification",
              "count": "extract", "digits": "extract", "compare": "closed qa", "reverse": "rewrite",
              "repeat": "rewrite"}


def check_run_folder(out: Path) -> None:
    """Refuse a non-empty --output that is not a demo run folder (the demo replaces the steps it
    redoes, so it must not run in a folder of other data, or in the working directory)."""
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in DEMO_MARKERS):
        raise OutputError(f"output {out} is not empty and is not a demo run folder: choose a new or empty one")


def auto_threads() -> int:
    """All cores on an idle machine, fewer when others are busy: on this 2-core box a 2-thread
    OpenMP step ran 7x slower than a 1-thread one while other processes kept the cores busy
    (threads spin-waiting for a core); the 1-minute load average is the cheap signal."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0]
    return max(1, min(cores, int(cores - busy + 0.5)))


def manifest_of(d: Path) -> dict:
    return json.loads((d / "toucan.json").read_text(encoding="utf-8"))


def same_settings(meta_file: Path, settings: dict) -> bool:
    return meta_file.is_file() and json.loads(meta_file.read_text(encoding="utf-8")) == settings


def make_data(out: Path, *, seed: int, train_examples: int, eval_examples: int,
              families: Sequence[str]) -> tuple[Path, Path]:
    """out/data/train.jsonl and heldout.jsonl: generated tasks (toucan.demo_tasks)."""
    d = out / "data"
    settings = {"seed": seed, "train_examples": train_examples, "eval_examples": eval_examples,
                "families": list(families), "generator": GENERATOR_VERSION}
    if not same_settings(d / "settings.json", settings):
        train_recs, held = generate(train_examples, eval_examples, seed, families)
        with atomic_dir(d, overwrite=True, markers=("settings.json",)) as tmp:  # only a demo data dir
            for name, recs in (("train.jsonl", train_recs), ("heldout.jsonl", held)):
                (tmp / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                                        encoding="utf-8")
            (tmp / "settings.json").write_text(json.dumps(settings))
    return d / "train.jsonl", d / "heldout.jsonl"


def _special_pieces(template: str) -> list[str]:
    """The template's fixed text as whole SentencePiece symbols, so the long Alpaca header costs
    one token instead of ~25 (SentencePiece matches user symbols after turning spaces into '▁')."""
    t = get_template(template)
    parts = [t.header.rstrip("\n"), t.header_input.rstrip("\n"), "\n\n" + t.instruction.split("{")[0],
             "\n\n" + t.input.split("{")[0], "\n\n" + t.response, "\n"]
    return [p.replace(" ", "\u2581") for p in parts]


def make_tokenizer(train_file: Path, out: Path, *, vocab_size: int, template: str) -> Path:
    """A small BPE SentencePiece model like LLaMA's (identity normalisation, byte fallback, digits
    split), trained on the generated questions and answers, saved as a Hugging Face tokenizer dir."""
    import sentencepiece as spm

    d = out / "tokenizer"
    settings = {"vocab_size": vocab_size, "template": template,
                "data": json.loads((train_file.parent / "settings.json").read_text())}
    if same_settings(d / "demo_settings.json", settings):
        return d
    # Question and answer on one line, as they follow each other in training: on a line of its
    # own an answer would get the dummy prefix and teach pieces like '▁木'.
    lines = []
    for line in train_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        lines.append(r["instruction"] + r["output"])
    # a little Latin text so the chat transcript's English is pieces, not bytes
    lines += ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 Hello hello"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=_special_pieces(template),
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with atomic_dir(d, overwrite=True, markers=("demo_settings.json",)) as tmp:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        tok = load_tokenizer(tmp / "tokenizer.model")
        tok.save_pretrained(str(tmp))
        finish_tokenizer_dir(tmp)  # toucan's chat template into tokenizer_config.json
        (tmp / "demo_settings.json").write_text(json.dumps(settings))
    return d


def make_base_model(tok_dir: Path, out: Path, *, hidden_size: int, num_layers: int, seed: int, max_len: int,
                    config: Any = None) -> Path:
    """out/base: a random tiny LLaMA for the tokenizer, saved as `toucan demo`'s (config: what its
    manifest records)."""
    d = out / "base"
    # LLaMA's 8/3 x width, rounded up to a multiple of 32 so every layer fits 4-bit GPTQ groups
    # of 32 and torch's int4 CPU kernel (in_features % group == 0, out_features % 16 == 0)
    settings = {"hidden_size": hidden_size, "layers": num_layers, "seed": seed,
                "intermediate_size": math.ceil(hidden_size * 8 / 3 / 32) * 32,
                "tokenizer": json.loads((tok_dir / "demo_settings.json").read_text())}
    if (d / "toucan.json").is_file() and manifest_of(d).get("demo") == settings:
        return d
    tok = load_tokenizer(tok_dir)
    model = tiny_llama(len(tok), seed=seed, tokenizer=tok, hidden_size=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
                       intermediate_size=settings["intermediate_size"], max_position_embeddings=max_len * 2)
    n = sum(p.numel() for p in model.parameters())
    save_model_dir(d, model, tok, command="demo", config=config, manifest_extra={"demo": settings, "parameters": n},
                   overwrite=True)
    return d


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, temperature=0.0,
                          repetition_penalty=1.0, num_beams=1)


def exact_match(model_dir: Path, held_file: Path, template: str, batch_size: int = 64) -> dict:
    """Greedy answers to the held-out questions through the shared engine; exact match per family."""
    import torch

    # a .gguf runs on llama.cpp (the same engine): on as many threads as torch was given
    engine = Engine.from_dir(model_dir, device="cpu", template=template, threads=torch.get_num_threads())
    recs = [json.loads(line) for line in held_file.read_text(encoding="utf-8").splitlines()]
    opts = greedy(max_new_tokens=12)
    answers = []
    for i in range(0, len(recs), batch_size):
        chunk = recs[i:i + batch_size]
        answers += [c.text for c in engine.generate_batch(
            [build_prompt(r["instruction"], r["input"], template=template) for r in chunk], opts)]
    per: dict[str, list[int]] = {}
    for r, a in zip(recs, answers):
        per.setdefault(r["family"], []).append(int(a.strip() == r["output"]))
    ok = sum(sum(v) for v in per.values())
    return {"accuracy": ok / len(recs), "correct": ok, "total": len(recs),
            "per_family": {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())},
            "examples": [{"q": r["instruction"], "want": r["output"], "got": a} for r, a in zip(recs[:5], answers)],
            "answers": answers}


def chat_transcript(model_dir: Path, template: str, questions: list[str]) -> list[dict]:
    """A few questions through the engine, each as a new chat: the toy model is trained on single
    questions (a fifth of them after earlier turns was tried: the chat then worked, but held-out
    accuracy fell by 6 to 12 points in the same budget)."""
    engine = Engine.from_dir(model_dir, device="cpu", template=template)
    return [{"user": q, "assistant": engine.generate(build_prompt(q, template=template), greedy(16)).text}
            for q in questions]


def write_eval_set(held_file: Path, out: Path) -> Path:
    """The held-out questions as a `toucan eval` set (question, class, std_answer)."""
    atomic_write_text(out, "".join(
        json.dumps({"question": r["instruction"], "class": EVAL_CLASS[r["family"]], "std_answer": r["output"]},
                   ensure_ascii=False) + "\n"
        for r in map(json.loads, held_file.read_text(encoding="utf-8").splitlines())))
    return out


def format_summary(s: dict) -> str:
    m, tr = s["model"], s["train"]
    lines = [
        f"toucan demo: tiny LLaMA, {m['parameters'] / 1e6:.2f} M parameters, vocabulary {m['vocab_size']}",
        f"SFT: {tr['steps']} steps x {tr['batch_size']} examples, loss {tr['first_loss']} -> {tr['last_loss']}",
        f"held-out exact match: before {s['before']['accuracy']:.1%}  after {s['after']['accuracy']:.1%}"
        f" ({s['after']['correct']}/{s['after']['total']})",
        "  per family after: " + ", ".join(f"{k} {v:.0%}" for k, v in s["after"]["per_family"].items()),
        "chat:",
    ]
    for turn in s["chat"]:
        lines += [f"  用户: {turn['user']}", f"  助手: {turn['assistant']}"]
    r = s.get("recipe") or {}
    if r:
        d, q = r["delta"], r["gptq_4bit"]
        kept = f" ({q['kept_vs_fp32']:.1%} of fp32)" if q["kept_vs_fp32"] is not None else ""
        lines += [f"delta round trip: base + {d['delta']} -> {d['restored']}, "
                  + ("bit-exact" if d["bit_exact"] else "NOT bit-exact"),
                  f"4-bit GPTQ (group {q['group_size']}): exact match {q['accuracy']:.1%}{kept}",
                  f"llama.cpp (GGUF), exact match beside fp32 {s['after']['accuracy']:.1%} and GPTQ {q['accuracy']:.1%}: "
                  + ", ".join(f"{k} {g['accuracy']:.1%} ({g['mib']:.2f} MiB, same answer as fp32 {g['same_as_fp32']:.0%})"
                              for k, g in r["gguf"].items()),
                  f"eval report (reference judge): {r['report']['table']}, chart {r['report']['chart']}"]
    lines.append(f"time: {s['total_seconds']} s " + json.dumps(s["seconds"]))
    lines.append(f"try it in the browser: {s['web_command']}")
    return "\n".join(lines)
