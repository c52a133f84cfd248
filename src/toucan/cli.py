"""`toucan` console script: a thin shell that turns argv into a config dataclass and calls the
command function. Commands import lazily so `toucan --help` does not load torch."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import types
import typing
from typing import Any, Sequence

from . import __version__
from . import config as C
from .errors import ConfigError, ToucanError
from .logs import setup_logging

log = logging.getLogger("toucan")

# name -> (config dataclass, "module:function"). A space in the name makes a command group
# ("tokenizer extend"). Add a line here when you add a command; nothing else to register.
COMMANDS: dict[str, tuple[type, str]] = {
    "data": (C.DataConfig, "toucan.commands.data:run"),
    "train": (C.TrainConfig, "toucan.commands.train:run"),
    "merge-lora": (C.MergeLoraConfig, "toucan.commands.merge_lora:run"),
    "chat": (C.ChatConfig, "toucan.commands.chat:run"),
    "web": (C.WebConfig, "toucan.commands.web:run"),
    "serve": (C.ServeConfig, "toucan.commands.serve:run"),
    "demo": (C.DemoConfig, "toucan.commands.demo:run"),
    "verify": (C.VerifyConfig, "toucan.commands.verify:run"),
    "quantize": (C.QuantizeConfig, "toucan.commands.quantize:run"),
    "ppl": (C.PplConfig, "toucan.commands.ppl:run"),
    "prune": (C.PruneConfig, "toucan.commands.prune:run"),
    "tokenizer extend": (C.TokenizerExtendConfig, "toucan.commands.tokenizer_extend:run"),
    "make-delta": (C.MakeDeltaConfig, "toucan.commands.make_delta:run"),
    "apply-delta": (C.ApplyDeltaConfig, "toucan.commands.apply_delta:run"),
    "check-delta": (C.CheckDeltaConfig, "toucan.commands.check_delta:run"),
    "eval generate": (C.EvalGenerateConfig, "toucan.commands.eval_generate:run"),
    "eval judge": (C.EvalJudgeConfig, "toucan.commands.eval_judge:run"),
    "eval report": (C.EvalReportConfig, "toucan.commands.eval_report:run"),
    "export gguf": (C.ExportGgufConfig, "toucan.commands.export_gguf:run"),
}

# Commands whose unknown --flags are collected into the config's `extra_args` (HF Trainer flags).
PASSTHROUGH = {"train"}


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for X | None / Optional[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flag_names(f: dataclasses.Field) -> list[str]:
    """The option strings of a field: the primary (hyphenated) spelling first, then its aliases
    (the underscore spelling and any HF Trainer / FastChat names), which work but are not shown."""
    flags = [f"--{f.name.replace('_', '-')}"]
    if "_" in f.name:
        flags.append(f"--{f.name}")
    return flags + [a for a in f.metadata.get("aliases", ()) if a not in flags]


def _add_field(p: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    meta = f.metadata
    inner, _ = _unwrap(tp)
    help_text = meta.get("help", "")
    kw: dict[str, Any] = {"dest": f.name}
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    is_list = typing.get_origin(inner) is list
    elem = typing.get_args(inner)[0] if is_list else inner
    if meta.get("positional"):
        kw.pop("dest")
        if is_list:
            kw["nargs"] = "+" if meta.get("required") else "*"
        kw["type"] = elem
        p.add_argument(f.name, help=help_text.replace("%", "%%"), **kw)
        return
    if inner is bool:
        kw["action"] = argparse.BooleanOptionalAction
    else:
        kw["type"] = elem
        if elem in (int, float) and "choices" not in kw:  # `--per-device-train-batch-size N`, not N's dest
            kw.setdefault("metavar", "N" if elem is int else "X")
        if is_list:
            # extend: `--stop a b` and `--stop a --stop b` both give [a, b]
            kw["nargs"], kw["action"] = "+", "extend"
    if meta.get("required"):
        # Checked after --config is merged (see main), so a config file can supply it.
        help_text = f"{help_text} (required)"
    else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if default not in (None, []) and help_text:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text = f"{help_text} (default: {shown})"
    primary, *aliases = flag_names(f)
    p.add_argument(primary, help=help_text.replace("%", "%%"), **kw)
    if aliases:
        # argparse cannot hide one spelling of an option, so the aliases are a second option with
        # the same dest and no help line: they parse exactly like the primary one.
        kw.pop("metavar", None)
        p.add_argument(*aliases, help=argparse.SUPPRESS, **kw)


class HelpFormatter(argparse.HelpFormatter):
    """Booleans read `--x/--no-x` (argparse's default is `--x, --no-x`)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction):
            return "/".join(action.option_strings)
        return super()._format_action_invocation(action)


# Help lists these first, in this order, in every command (shared option groups come first in
# dataclass order otherwise, which put chat's --model after twenty sampling options).
FIRST = ("model", "base", "data", "output")


def add_config_arguments(p: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    fields = sorted(dataclasses.fields(cls), key=lambda f: FIRST.index(f.name) if f.name in FIRST else len(FIRST))
    for f in fields:  # sorted() is stable: the other fields keep their dataclass order
        if f.name == "extra_args":
            continue
        _add_field(p, f, hints[f.name])


def config_from_args(cls: type, ns: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    # argparse defaults are all None, so a non-None value was given: unset fields keep the
    # dataclass default (the one place defaults live).
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}
    if extra:
        values["extra_args"] = list(extra)
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--model` must never be read as a prefix of a hidden alias
    # (`--model_max_length`), and `train` passes unknown flags on to TrainingArguments.
    common = {"allow_abbrev": False, "formatter_class": HelpFormatter}
    parser = argparse.ArgumentParser(
        prog="toucan", **common,
        description="Toucan: LLaMA-architecture base model -> Chinese chat assistant "
                    "(data, SFT, delta weights, 4-bit GPTQ, chat/web/API, judge evaluation).")
    parser.add_argument("--version", action="version", version=f"toucan {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--config", help="JSON or YAML file of option defaults (command-line flags win)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (cls, _) in COMMANDS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        if " " in name:
            group, sub = name.split(" ", 1)
            if group not in groups:
                gp = subs.add_parser(group, help=f"{group} commands", **common)
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
            sp = groups[group].add_parser(sub, help=doc, description=doc, **common)
        else:
            sp = subs.add_parser(name, help=doc, description=doc, **common)
        sp.set_defaults(_command=name)
        add_config_arguments(sp, cls)
    return parser


def _load_config_file(path: str) -> dict:
    """The mapping in a --config file; a missing, unreadable or malformed file is one ConfigError
    naming the file (and the line where the parser knows it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.MarkedYAMLError as e:
                mark = e.problem_mark or e.context_mark
                line = f", line {mark.line + 1}" if mark else ""
                raise ConfigError(f"--config {path}{line}: invalid YAML ({e.problem or e.context})") from None
            except yaml.YAMLError as e:
                raise ConfigError(f"--config {path}: invalid YAML ({' '.join(str(e).split())})") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--config {path}, line {e.lineno}: invalid JSON ({e.msg})") from None
            except ValueError as e:  # an integer beyond Python's int-string digit limit
                raise ConfigError(f"--config {path}: invalid JSON ({e})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply") from None
    if data is None:  # an empty file: no defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def config_value(f: dataclasses.Field, tp: Any, value: Any, where: str) -> Any:
    """A --config value for field f, by the command line's rules: what argparse would make of the
    same text is what the file may hold (max_len: "512" -> 512, like --max-len 512; a YAML 1e-5,
    which PyYAML reads as a string, -> 1e-05), anything else is a ConfigError naming the option.
    Booleans must be true/false (the command line has --x/--no-x, no text to convert)."""
    inner, _ = _unwrap(tp)
    if value is None:  # null: keep the default
        return None
    if typing.get_origin(inner) is list:
        elem = typing.get_args(inner)[0]
        items = value if isinstance(value, list) else [value]  # like `--data a.json`: a list of one
        return [_scalar(f, elem, v, where) for v in items]
    return _scalar(f, inner, value, where)


def _scalar(f: dataclasses.Field, tp: Any, v: Any, where: str) -> Any:
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, tp.__name__)

    def bad():
        shown = json.dumps(v, ensure_ascii=False, default=str)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ConfigError(f"{where}: option '{f.name}' must be {want}, got {type(v).__name__} {shown}")

    if tp is bool:
        if not isinstance(v, bool):
            raise bad()
        return v
    if isinstance(v, bool) or isinstance(v, (dict, list)):  # YAML yes/no/on/off or a structure
        raise bad()
    if tp is float and isinstance(v, int):
        out = float(v)
    elif isinstance(v, tp):
        out = v
    elif isinstance(v, str) or (tp is str and isinstance(v, (int, float))):
        try:
            out = tp(v) if tp is not str else str(v)  # the type argparse applies to a flag's text
        except (TypeError, ValueError):
            raise bad() from None
    else:  # e.g. 2.5 for an integer option: `--x 2.5` fails too
        raise bad()
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{where}: option '{f.name}' must be one of {', '.join(map(str, choices))}, got {out!r}")
    return out


def run_command(name: str, cfg: Any) -> int:
    module, func = COMMANDS[name][1].split(":")
    result = getattr(importlib.import_module(module), func)(cfg)
    return int(result or 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, extra = parser.parse_known_args(argv)
    name = getattr(ns, "_command", None)
    if name is None:
        if getattr(ns, "command", None):  # a group given without its subcommand
            parser.parse_args([ns.command, "--help"])
        parser.print_help()
        return 2
    if extra and name not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(ns.verbose, ns.quiet)
    cls = COMMANDS[name][0]
    try:
        if ns.config:
            defaults = _load_config_file(ns.config)
            # a key is a field name or any of its flag spellings without "--" (model_name_or_path)
            known = {a[2:].replace("-", "_"): f.name for f in dataclasses.fields(cls) for a in flag_names(f)}
            unknown = {str(k) for k in defaults if str(k).replace("-", "_") not in known}
            if unknown:
                raise ConfigError(f"{ns.config}: unknown option(s) for '{name}': {', '.join(sorted(unknown))}")
            fields, hints = {f.name: f for f in dataclasses.fields(cls)}, typing.get_type_hints(cls)
            for k, v in defaults.items():
                dest = known[k.replace("-", "_")]
                v = config_value(fields[dest], hints[dest], v, f"--config {ns.config}")  # checked even if unused
                # flags given on the command line win over the file ([]: an unfilled positional list)
                if getattr(ns, dest, None) in (None, []):
                    setattr(ns, dest, v)
        missing = [f.name if f.metadata.get("positional") else flag_names(f)[0] for f in dataclasses.fields(cls)
                   if f.metadata.get("required") and getattr(ns, f.name, None) in (None, [])]
        if missing:
            parser.error(f"{name}: missing required option(s): " + ", ".join(missing))
        cfg = config_from_args(cls, ns, extra)
        return run_command(name, cfg)
    except ToucanError as e:
        print(f"toucan {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"toucan {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
