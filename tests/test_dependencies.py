"""pyproject's dependencies match what the code imports (issue 12, point 8): every third-party
module that src/toucan, tests/ or bench/ import is declared, and every declared distribution is
imported somewhere, except the few used without an import statement (listed with the reason)."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# Declared but never imported: what uses them instead.
NOT_IMPORTED = {
    "optimum": "transformers loads GPTQ checkpoints through it (quantization_config in config.json)",
    "import-linter": "its lint-imports command runs in tests/test_layers.py",
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(requirement: str) -> str:
    return _canon(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


RUNTIME = {_dist_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {extra: {_dist_name(r) for r in reqs} for extra, reqs in PROJECT["optional-dependencies"].items()}
DECLARED = RUNTIME.union(*EXTRAS.values())


def _imports(*dirs: str) -> dict[str, set[str]]:
    """Top-level third-party module -> files importing it (inside functions too: lazy imports count)."""
    local = {p.stem for d in dirs for p in (ROOT / d).rglob("*.py")}  # bench's `import quant`, tests' helpers
    out: dict[str, set[str]] = {}
    for d in dirs:
        for p in (ROOT / d).rglob("*.py"):
            if "__pycache__" in p.parts:
                continue
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), str(p))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "toucan" and top not in local:
                        out.setdefault(top, set()).add(str(p.relative_to(ROOT)))
    return out


_PACKAGES = functools.cache(md.packages_distributions)  # scans every installed distribution: once


def _distributions(module: str) -> set[str]:
    dists = _PACKAGES().get(module)
    assert dists, f"{module} is imported but no installed distribution provides it (run `make install`)"
    return {_canon(d) for d in dists}


def test_every_import_is_declared():
    """src's imports are runtime dependencies or extras; tests' and bench's may also be test extras."""
    missing = []
    for module, files in sorted(_imports("src").items()):
        if not _distributions(module) & DECLARED:
            missing.append(f"{module} ({sorted(_distributions(module))[0]}; {sorted(files)[0]})")
    for module, files in sorted(_imports("tests", "bench").items()):
        if not _distributions(module) & DECLARED:
            missing.append(f"{module} ({sorted(_distributions(module))[0]}; {sorted(files)[0]})")
    assert not missing, "imported but not declared in pyproject.toml: " + ", ".join(missing)


def test_every_declaration_is_used():
    """A declared distribution that nothing imports (and that is not in NOT_IMPORTED) is dead weight."""
    used = {d for m in _imports("src", "tests", "bench") for d in _distributions(m)}
    unused = sorted(d for d in DECLARED - used if d not in NOT_IMPORTED)
    assert not unused, "declared in pyproject.toml but never imported: " + ", ".join(unused)


def test_src_imports_need_no_test_extra():
    """The package itself never needs what only the test extra installs."""
    test_only = EXTRAS["test"] - RUNTIME - set().union(*(v for k, v in EXTRAS.items() if k != "test"))
    wrong = sorted(f"{m} ({sorted(f)[0]})" for m, f in _imports("src").items() if _distributions(m) <= test_only)
    assert not wrong, "src imports test-only packages: " + ", ".join(wrong)


def test_package_data_exists():
    """Every package-data pattern in pyproject matches at least one file."""
    missing = [f"{pkg}/{pat}" for pkg, pats in PYPROJECT["tool"]["setuptools"].get("package-data", {}).items()
               for pat in pats if not list((ROOT / "src" / pkg).glob(pat))]
    assert not missing, "package-data matching no file: " + ", ".join(missing)
