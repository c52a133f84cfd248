"""`toucan data FILE[:N] ...`: validate, sample, dedup, shuffle, length-filter; --stats, --output."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import DataConfig
from ..data import encode_records, load_dataset_spec, parse_spec, record_to_json
from ..errors import ConfigError
from ..fsutil import atomic_write_text, check_output
from ..modeling import load_tokenizer


def run(cfg: DataConfig) -> int:
    if cfg.max_len < 2:
        raise ConfigError(f"--max_len must be at least 2 (BOS + EOS), got {cfg.max_len}")
    if cfg.drop_too_long and not cfg.tokenizer:
        raise ConfigError("--drop_too_long needs --tokenizer (lengths are counted in tokens)")
    if cfg.output and Path(cfg.output).is_dir():  # checked before the work, not by a traceback after it
        raise ConfigError(f"--output {cfg.output} is a directory: give the path of the JSON Lines file to write")
    if cfg.output:  # an existing file only with --overwrite, and never one of the inputs
        check_output(cfg.output, overwrite=cfg.overwrite, is_dir=False,
                     inputs=[parse_spec(s)[0] for s in cfg.data] + [cfg.tokenizer])
    records, report = load_dataset_spec(cfg.data, seed=cfg.seed, shuffle=cfg.shuffle,
                                        dedup=cfg.dedup, skip_bad=cfg.skip_bad)
    lengths = None
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
        records, _, lengths = encode_records(tok, records, cfg.max_len, cfg.template,
                                             cfg.drop_too_long, cfg.min_response_tokens)
    summary = report.to_dict()
    summary["kept"] = len(records)
    if lengths is not None:
        summary["length"] = lengths.to_dict()
    if cfg.stats or not cfg.output:
        print(format_stats(summary))
    if cfg.output:
        atomic_write_text(cfg.output, "".join(json.dumps(record_to_json(r), ensure_ascii=False) + "\n"
                                              for r in records))
        print(f"wrote {len(records)} records to {cfg.output}")
    return 0


def format_stats(s: dict) -> str:
    """The --stats report: one line per file, the first bad records, the token-length figures."""
    lines = [f"records: {s['kept']} kept of {sum(f['read'] for f in s['files'])} read"
             f" ({len(s['bad'])} bad skipped)"]
    for f in s["files"]:
        lines.append(f"  {f['path']}: read {f['read']}, bad {f['bad']}, duplicates {f['duplicates']}, "
                     f"sample {f['sample']}, kept {f['kept']}")
    for b in s["bad"][:10]:
        lines.append(f"  bad: {b}")
    if len(s["bad"]) > 10:
        lines.append(f"  ... and {len(s['bad']) - 10} more bad records")
    L = s.get("length")
    if L is None:
        lines.append("token lengths: pass --tokenizer to count them")
        return "\n".join(lines)
    pct = L["token_length"]
    if pct:
        lines.append("token length (BOS + prompt + response + EOS): "
                     + ", ".join(f"{k} {v}" for k, v in pct.items()))
    lines.append(f"over max_len {L['max_len']}: {L['truncated'] + L['dropped_too_long']} "
                 f"({L['truncated']} truncated, {L['dropped_too_long']} dropped); "
                 f"no room for a response: {L['dropped_no_room']}; "
                 f"response under min tokens: {L['dropped_short']}")
    if L.get("cut_before_tokenizing"):
        lines.append(f"cut before tokenizing (over {L['cut_chars']} characters, far beyond max_len): "
                     f"{L['cut_before_tokenizing']} record(s); their lengths above count only up to the cut")
    return "\n".join(lines)
