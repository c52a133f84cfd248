"""Typed exceptions for user mistakes. The CLI prints them as one clear line and exits non-zero;
anything else reaching the top is a bug and keeps its traceback."""

from __future__ import annotations


class ToucanError(Exception):
    """Base of every error that is the user's input, not our bug."""

    exit_code = 2


class ConfigError(ToucanError):
    """A bad option value or combination."""


class DataError(ToucanError):
    """Bad input data. Always names the file, and where known the line (or array index) and field."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 field: str | None = None, index: int | None = None):
        self.message, self.file, self.line, self.field, self.index = message, file, line, field, index
        where = []
        if file is not None:
            where.append(str(file))
        if line is not None:
            where.append(f"line {line}")
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__((", ".join(where) + ": " if where else "") + message)


class ModelError(ToucanError):
    """A model directory that is missing, incomplete or of the wrong kind."""


class OutputError(ToucanError):
    """An output path that would replace something toucan did not write, or an input (see fsutil.check_output)."""


class GgufError(ModelError):
    """A .gguf file that is not a complete GGUF model toucan can run (toucan.gguf_export.check_gguf)."""


class ManifestError(ToucanError):
    """A directory that does not match its toucan.json manifest."""


class DeltaError(ToucanError):
    """Delta weights that do not fit the base, or are corrupted."""


class QuantError(ToucanError):
    """Quantization settings or inputs that cannot work."""


class EvalError(ToucanError):
    """Evaluation inputs (answers, prompts, classes, judge endpoint) that cannot work."""
