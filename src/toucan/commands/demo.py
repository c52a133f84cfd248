"""`toucan demo`: the recipe at toy scale, offline on a CPU, in a few minutes.

    generated Chinese tasks (toucan.demo_tasks) -> a SentencePiece tokenizer trained on them ->
    a random tiny LLaMA -> exact match before -> SFT with `toucan train` -> exact match after ->
    make-delta / apply-delta round trip -> 4-bit GPTQ -> `toucan eval` generate + judge (offline
    reference judge) + report for fp32 and 4-bit -> a short chat transcript,
    all through the same template (toucan.prompts) and generation engine (toucan.engine).

Everything goes under cfg.output; steps whose output already exists (for the same settings)
are reused, so a rerun after an interruption continues where it stopped. A recipe: each step is
the real command's `run` (train, make-delta, apply-delta, quantize, eval ...), so its output and
manifest are that command's; the demo's own parts (data, tokenizer, exact match) are toucan.demo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from ..config import (ApplyDeltaConfig, DemoConfig, EvalGenerateConfig, EvalJudgeConfig, EvalReportConfig,
                      MakeDeltaConfig, QuantizeConfig, TrainConfig)
from ..demo import (auto_threads, chat_transcript, check_run_folder, exact_match, format_summary, make_base_model,
                    make_data, make_tokenizer, manifest_of, same_settings, write_eval_set)
from ..fsutil import atomic_write_json, atomic_write_text, sha256_file
from ..gguf_export import export_gguf
from ..modeling import load_tokenizer
from ..training import checkpoint_dir
from . import apply_delta, eval_generate, eval_judge, eval_report, make_delta, quantize, train

log = logging.getLogger(__name__)


def train_config(cfg: DemoConfig, base: Path, train_file: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        model=str(base), data=[str(train_file)], output=str(out / "sft"),
        template=cfg.template, max_len=cfg.max_len, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        warmup_ratio=0.05, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=max(1, min(50, cfg.max_steps // 10)),
        save_steps=max(100, cfg.max_steps // 4), save_total_limit=1, seed=cfg.seed,
        resume_from_checkpoint="auto", overwrite=True)  # a step of this run folder: redone when settings change


def _trained_with(sft: Path, tcfg: TrainConfig) -> bool:
    """True when sft/ is a finished `toucan train` output for exactly these settings."""
    if not (sft / "toucan.json").is_file():
        return False
    return manifest_of(sft).get("config") == json.loads(json.dumps(dataclasses.asdict(tcfg)))


def _drop_stale_checkpoints(tcfg: TrainConfig, base_settings: dict) -> None:
    """Training resumes from its latest checkpoint (resume_from_checkpoint="auto"), but only one
    made for this same model and these same settings: others are removed first."""
    ckpt = checkpoint_dir(tcfg.output)
    stamp = ckpt.with_name(ckpt.name + ".settings.json")
    settings = {"train": json.loads(json.dumps(dataclasses.asdict(tcfg))), "base": base_settings}
    if ckpt.exists() and not same_settings(stamp, settings):
        log.info("demo: removing checkpoints of other settings in %s", ckpt)
        shutil.rmtree(ckpt)
    atomic_write_json(stamp, settings)


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
        _drop_stale_checkpoints(tcfg, manifest_of(base)["demo"])
        train.run(tcfg)
    else:
        log.info("demo: reusing %s (trained with these settings)", sft)
    return sft, [h["loss"] for h in manifest_of(sft)["train"]["log_history"] if "loss" in h]


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
    eval_set = write_eval_set(held_file, d / "eval_set.jsonl")
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


def run(cfg: DemoConfig) -> int:
    import torch

    t0 = time.time()
    torch.set_num_threads(cfg.threads or auto_threads())
    out = Path(cfg.output)
    check_run_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    with _lap(times, "data+tokenizer+model"):
        train_file, held_file = make_data(out, seed=cfg.seed, train_examples=cfg.train_examples,
                                          eval_examples=cfg.eval_examples, families=cfg.families)
        tok_dir = make_tokenizer(train_file, out, vocab_size=cfg.vocab_size, template=cfg.template)
        base = make_base_model(tok_dir, out, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed,
                               max_len=cfg.max_len, config=cfg)
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
        "model": {"parameters": manifest_of(base)["parameters"], "hidden_size": cfg.hidden_size, "layers": cfg.num_layers,
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
