"""`toucan demo`: the recipe at toy scale, offline on a CPU, in a few minutes.

    generated Chinese tasks (toucan.demo_tasks) -> a SentencePiece tokenizer trained on them ->
    a random tiny LLaMA -> exact match before -> SFT with `toucan train` -> exact match after ->
    make-delta / apply-delta round trip -> 4-bit GPTQ -> `toucan eval` generate + judge (offline
    reference judge) + report for fp32 and 4-bit -> a short chat transcript,
    all through the same template (toucan.prompts) and generation engine (toucan.engine).

Everything goes under cfg.output; steps whose output already exists (for the same settings)
are reused, so a rerun after an interruption continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import time
from pathlib import Path

from .config import (ApplyDeltaConfig, DemoConfig, EvalGenerateConfig, EvalJudgeConfig, EvalReportConfig,
                     GenerationOptions, MakeDeltaConfig, QuantizeConfig, TrainConfig)
from .commands import apply_delta, eval_generate, eval_judge, eval_report, make_delta, quantize, train
from .demo_tasks import GENERATOR_VERSION, generate
from .engine import Engine
from .errors import OutputError
from .fsutil import atomic_dir, atomic_write_json, atomic_write_text, sha256_file
from .gguf_export import export_gguf
from .modeling import load_tokenizer, save_model_dir, tiny_llama
from .prompts import build_prompt, get_template
from .tokenizer import finish_tokenizer_dir
from .training import checkpoint_dir

log = logging.getLogger(__name__)


def _same_settings(meta_file: Path, settings: dict) -> bool:
    return meta_file.is_file() and json.loads(meta_file.read_text(encoding="utf-8")) == settings


def make_data(cfg: DemoConfig, out: Path) -> tuple[Path, Path]:
    d = out / "data"
    settings = {"seed": cfg.seed, "train_examples": cfg.train_examples, "eval_examples": cfg.eval_examples,
                "families": list(cfg.families), "generator": GENERATOR_VERSION}
    if not _same_settings(d / "settings.json", settings):
        train_recs, held = generate(cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.families)
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


def make_tokenizer(cfg: DemoConfig, train_file: Path, out: Path) -> Path:
    """A small BPE SentencePiece model like LLaMA's (identity normalisation, byte fallback, digits
    split), trained on the generated questions and answers, saved as a Hugging Face tokenizer dir."""
    import sentencepiece as spm

    d = out / "tokenizer"
    settings = {"vocab_size": cfg.vocab_size, "template": cfg.template,
                "data": json.loads((train_file.parent / "settings.json").read_text())}
    if _same_settings(d / "demo_settings.json", settings):
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
        sentence_iterator=iter(lines), model_writer=model, vocab_size=cfg.vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=_special_pieces(cfg.template),
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with atomic_dir(d, overwrite=True, markers=("demo_settings.json",)) as tmp:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        tok = load_tokenizer(tmp / "tokenizer.model")
        tok.save_pretrained(str(tmp))
        finish_tokenizer_dir(tmp)  # toucan's chat template into tokenizer_config.json
        (tmp / "demo_settings.json").write_text(json.dumps(settings))
    return d


def make_base_model(cfg: DemoConfig, tok_dir: Path, out: Path) -> Path:
    d = out / "base"
    # LLaMA's 8/3 x width, rounded up to a multiple of 32 so every layer fits 4-bit GPTQ groups
    # of 32 and torch's int4 CPU kernel (in_features % group == 0, out_features % 16 == 0)
    settings = {"hidden_size": cfg.hidden_size, "layers": cfg.num_layers, "seed": cfg.seed,
                "intermediate_size": math.ceil(cfg.hidden_size * 8 / 3 / 32) * 32,
                "tokenizer": json.loads((tok_dir / "demo_settings.json").read_text())}
    if (d / "toucan.json").is_file() and _manifest(d).get("demo") == settings:
        return d
    tok = load_tokenizer(tok_dir)
    model = tiny_llama(len(tok), seed=cfg.seed, tokenizer=tok, hidden_size=cfg.hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.hidden_size // 32,
                       intermediate_size=settings["intermediate_size"], max_position_embeddings=cfg.max_len * 2)
    n = sum(p.numel() for p in model.parameters())
    save_model_dir(d, model, tok, command="demo", config=cfg, manifest_extra={"demo": settings, "parameters": n},
                   overwrite=True)
    return d


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


def edge(cfg: DemoConfig, fp32_dir: Path, gptq_dir: Path, held_file: Path, out: Path, fp32: dict) -> dict:
    """The edge step: the fp32 model exported to q8_0 and q4_0 GGUF, and the GPTQ model to q4_0
    (its symmetric group-32 blocks are Q4_0's layout: carried over without a second rounding), each
    answering the held-out questions through the engine's llama.cpp backend. `same_as_fp32`: the
    share of answers equal to the transformers fp32 model's."""

    res = {}
    for name, src, gtype in (("q8_0", fp32_dir, "q8_0"), ("q4_0", fp32_dir, "q4_0"), ("gptq-q4_0", gptq_dir, "q4_0")):
        f = out / f"sft-{name}.gguf"
        export_gguf(src, f, gtype, template=cfg.template, overwrite=True)
        acc = exact_match(f, held_file, cfg.template)
        same = sum(a == b for a, b in zip(acc["answers"], fp32["answers"])) / len(acc["answers"])
        res[name] = {"file": str(f), "mib": round(f.stat().st_size / 2**20, 3), "accuracy": acc["accuracy"],
                     "per_family": acc["per_family"], "same_as_fp32": round(same, 4)}
    return res


def greedy(max_new_tokens: int) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=max_new_tokens, do_sample=False, temperature=0.0,
                             repetition_penalty=1.0, num_beams=1)


def chat_transcript(model_dir: Path, template: str, questions: list[str]) -> list[dict]:
    """A few questions through the engine, each as a new chat: the toy model is trained on single
    questions (a fifth of them after earlier turns was tried: the chat then worked, but held-out
    accuracy fell by 6 to 12 points in the same budget)."""

    engine = Engine.from_dir(model_dir, device="cpu", template=template)
    return [{"user": q, "assistant": engine.generate(build_prompt(q, template=template), greedy(16)).text}
            for q in questions]


def train_config(cfg: DemoConfig, base: Path, train_file: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        model=str(base), data=[str(train_file)], output=str(out / "sft"),
        template=cfg.template, max_len=cfg.max_len, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        warmup_ratio=0.05, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=max(1, min(50, cfg.max_steps // 10)),
        save_steps=max(100, cfg.max_steps // 4), save_total_limit=1, seed=cfg.seed,
        resume_from_checkpoint="auto", overwrite=True)  # a step of this run folder: redone when settings change


# Families as BELLE eval classes, so `toucan eval` (whose table has BELLE's ten columns) can score
# the demo's held-out questions; the reference judge's ROUGE-L against the one right answer is 1.0
# exactly when the answer is right.
EVAL_CLASS = {"parity": "math", "add": "math", "div5": "classification", "greater": "classification",
              "count": "extract", "digits": "extract", "compare": "closed qa", "reverse": "rewrite",
              "repeat": "rewrite"}


def delta_round_trip(base: Path, sft: Path, out: Path) -> Path:
    """make-delta then apply-delta (which verifies sha256 of every restored file) -> restored dir."""

    delta, restored = out / "delta", out / "sft-restored"
    make_delta.run(MakeDeltaConfig(base=str(base), model=str(sft), output=str(delta), overwrite=True))
    apply_delta.run(ApplyDeltaConfig(base=str(base), delta=str(delta), output=str(restored), overwrite=True))
    return restored


def quantize_4bit(cfg: DemoConfig, model: Path, calib: Path, out: Path) -> Path:
    q = out / "sft-gptq-4bit"
    # sym: the edge step exports this GPTQ model to GGUF Q4_0, which takes symmetric g32 groups over
    # exactly (quantize's default is asymmetric since issue 16)
    quantize.run(QuantizeConfig(model=str(model), output=str(q), method="gptq", bits=4, sym=True,
                                group_size=cfg.quant_group_size, data=str(calib), calib_samples=128,
                                max_len=cfg.max_len, template=cfg.template, seed=cfg.seed, device="cpu",
                                overwrite=True))
    return q


def evaluate(cfg: DemoConfig, models: dict[str, Path], held_file: Path, out: Path) -> Path:
    """`toucan eval` generate + judge (offline reference judge) + report for each model."""

    d = out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    eval_set = d / "eval_set.jsonl"
    atomic_write_text(eval_set, "".join(
        json.dumps({"question": r["instruction"], "class": EVAL_CLASS[r["family"]], "std_answer": r["output"]},
                   ensure_ascii=False) + "\n"
        for r in map(json.loads, held_file.read_text(encoding="utf-8").splitlines())))
    scores = []
    for name, model in models.items():
        answers = d / f"answers-{name}.jsonl"
        answers.unlink(missing_ok=True)  # the model may have been retrained: never resume stale answers
        eval_generate.run(EvalGenerateConfig(
            model=str(model), data=str(eval_set), output=str(answers), model_name=f"demo-{name}",
            template=cfg.template, device="cpu", batch_size=64, max_new_tokens=32, do_sample=False,
            temperature=0.0, repetition_penalty=1.0, overwrite=True))
        scores.append(d / f"scores-{name}.jsonl")
        eval_judge.run(EvalJudgeConfig(data=str(answers), output=str(scores[-1]), judge="reference", overwrite=True))
    report = out / "report"
    eval_report.run(EvalReportConfig(scores=[str(x) for x in scores], output=str(report), overwrite=True))
    return report


def _manifest(d: Path) -> dict:
    return json.loads((d / "toucan.json").read_text(encoding="utf-8"))


def _trained_with(sft: Path, tcfg: TrainConfig) -> bool:
    """True when sft/ is a finished `toucan train` output for exactly these settings."""
    if not (sft / "toucan.json").is_file():
        return False
    return _manifest(sft).get("config") == json.loads(json.dumps(dataclasses.asdict(tcfg)))


def _drop_stale_checkpoints(tcfg: TrainConfig, base_settings: dict) -> None:
    """Training resumes from its latest checkpoint (resume_from_checkpoint="auto"), but only one
    made for this same model and these same settings: others are removed first."""
    import shutil

    ckpt = checkpoint_dir(tcfg.output)
    stamp = ckpt.with_name(ckpt.name + ".settings.json")
    settings = {"train": json.loads(json.dumps(dataclasses.asdict(tcfg))), "base": base_settings}
    if ckpt.exists() and not _same_settings(stamp, settings):
        log.info("demo: removing checkpoints of other settings in %s", ckpt)
        shutil.rmtree(ckpt)
    atomic_write_json(stamp, settings)


def auto_threads() -> int:
    """All cores on an idle machine, fewer when others are busy: on this 2-core box a 2-thread
    OpenMP step ran 7x slower than a 1-thread one while other processes kept the cores busy
    (threads spin-waiting for a core); the 1-minute load average is the cheap signal."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0]
    return max(1, min(cores, int(cores - busy + 0.5)))


@contextlib.contextmanager
def _lap(times: dict[str, float], name: str):
    """Time one step of the demo into `times` (summary.json's "seconds") and log it."""
    t = time.time()
    yield
    times[name] = round(time.time() - t, 1)
    log.info("demo: %s done in %.1f s", name, times[name])


def _sft(cfg: DemoConfig, base: Path, train_file: Path, out: Path) -> tuple[Path, list[float]]:
    """`toucan train` on the generated data, or the model trained before with the same settings;
    returns its directory and training losses."""

    tcfg = train_config(cfg, base, train_file, out)
    sft = Path(tcfg.output)
    if not _trained_with(sft, tcfg):
        _drop_stale_checkpoints(tcfg, _manifest(base)["demo"])
        train.run(tcfg)
    else:
        log.info("demo: reusing %s (trained with these settings)", sft)
    return sft, [h["loss"] for h in _manifest(sft)["train"]["log_history"] if "loss" in h]


def _full_recipe(cfg: DemoConfig, base: Path, sft: Path, train_file: Path, held_file: Path, out: Path,
                 fp32: dict, times: dict[str, float]) -> tuple[dict, Path]:
    """Delta round trip, 4-bit GPTQ and its accuracy, GGUF on llama.cpp, eval report: (summary's
    "recipe", the restored model the chat then uses). fp32: the fine-tuned model's exact_match."""
    fp32_accuracy = fp32["accuracy"]
    recipe: dict = {}
    with _lap(times, "delta round trip"):
        restored = delta_round_trip(base, sft, out)
        recipe["delta"] = {"delta": str(out / "delta"), "restored": str(restored), "bit_exact": all(
            sha256_file(f) == sha256_file(restored / f.name) for f in sft.glob("*.safetensors"))}
    with _lap(times, "gptq 4-bit"):
        q4 = quantize_4bit(cfg, restored, train_file, out)
    with _lap(times, "eval 4-bit"):
        acc4 = exact_match(q4, held_file, cfg.template)
        recipe["gptq_4bit"] = {"dir": str(q4), "group_size": cfg.quant_group_size,
                               "accuracy": acc4["accuracy"], "per_family": acc4["per_family"],
                               "kept_vs_fp32": round(acc4["accuracy"] / fp32_accuracy, 4) if fp32_accuracy else None}
    with _lap(times, "edge (gguf, llama.cpp)"):
        recipe["gguf"] = edge(cfg, restored, q4, held_file, out, fp32)
    with _lap(times, "eval generate+judge+report"):
        report = evaluate(cfg, {"fp32": restored, "4bit": q4}, held_file, out)
        recipe["report"] = {"dir": str(report), "table": str(report / "table.md"), "chart": str(report / "chart.png")}
    return recipe, restored


# What a demo run folder holds: the demo reuses and replaces its own steps in such a folder only.
DEMO_MARKERS = ("data/settings.json", "tokenizer/demo_settings.json", "base/toucan.json", "summary.json")


def check_run_folder(out: Path) -> None:
    """Refuse a non-empty --output that is not a demo run folder (the demo replaces the steps it
    redoes, so it must not run in a folder of other data, or in the working directory)."""
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in DEMO_MARKERS):
        raise OutputError(f"output {out} is not empty and is not a demo run folder: choose a new or empty one")


def run_demo(cfg: DemoConfig) -> int:
    import torch

    t0 = time.time()
    torch.set_num_threads(cfg.threads or auto_threads())
    out = Path(cfg.output)
    check_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    with _lap(times, "data+tokenizer+model"):
        train_file, held_file = make_data(cfg, out)
        tok_dir = make_tokenizer(cfg, train_file, out)
        base = make_base_model(cfg, tok_dir, out)
    with _lap(times, "eval before"):
        before = exact_match(base, held_file, cfg.template)
    with _lap(times, "train"):
        sft, losses = _sft(cfg, base, train_file, out)
    with _lap(times, "eval after"):
        after = exact_match(sft, held_file, cfg.template)
    recipe, final = {}, sft
    if cfg.full_recipe:
        recipe, final = _full_recipe(cfg, base, sft, train_file, held_file, out, after, times)
    with _lap(times, "chat"):
        held = [json.loads(line) for line in held_file.read_text(encoding="utf-8").splitlines()]
        transcript = chat_transcript(final, cfg.template, [r["instruction"] for r in held[:3]])

    tok = load_tokenizer(tok_dir)
    summary = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "before": before, "after": after, "chat": transcript, "recipe": recipe,
        "web_command": f"toucan web --model {final}",
        "model": {"parameters": _manifest(base)["parameters"], "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
                  "vocab_size": len(tok), "dir": str(sft)},
        "train": {"steps": cfg.max_steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                  "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None},
        "seconds": times, "total_seconds": round(time.time() - t0, 1),
        "torch_threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    text = format_summary(summary)
    atomic_write_text(out / "summary.txt", text + "\n")
    print(text)
    return 0


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
