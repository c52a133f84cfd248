"""The layering contract (docs/ARCHITECTURE.md "Layers"), checked on the source.

import-linter checks who may import whom (contracts in pyproject.toml); the AST checks here cover
what an import graph cannot see: toucan imports hidden inside functions, and library code that
prints, exits, reads sys.argv or takes a command's config.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "toucan"
# The layers above the library: they may print, exit and take configs.
NOT_LIBRARY = {"cli", "config", "__main__"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _name(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def _is_library(path: Path) -> bool:
    rel = path.relative_to(SRC).with_suffix("")
    return rel.parts[0] != "commands" and rel.as_posix() not in NOT_LIBRARY


def _toucan_import(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == "toucan"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "toucan" for a in node.names)
    return False


def _function_bodies(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


MODULES = _modules()
IDS = [_name(p) for p in MODULES]


@pytest.mark.parametrize("path", MODULES, ids=IDS)
def test_toucan_imports_at_module_top(path):
    tree = ast.parse(path.read_text(), str(path))
    inside = sorted({f"{path.name}:{n.lineno}" for f in _function_bodies(tree)
                     for n in ast.walk(f) if _toucan_import(n)})
    assert not inside, f"toucan imports inside functions (move them to the module top): {inside}"


LIBRARY = [p for p in MODULES if _is_library(p)]


def _library_findings(tree: ast.AST) -> set[str]:
    """'function: what' for each print()/exit(), sys.argv/sys.exit use and config parameter."""
    found = set()
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] + [tree]:
        where = getattr(fn, "name", "<module>")
        body = fn.body if fn is not tree else [n for n in tree.body
                                                 if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for node in (x for b in body for x in ast.walk(b)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "exit"):
                found.add(f"{where}: {node.func.id}()")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sys" \
                    and node.attr in ("argv", "exit"):
                found.add(f"{where}: sys.{node.attr}")
        if fn is not tree:
            for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs:
                ann = ast.unparse(a.annotation) if a.annotation is not None else ""
                if ann.split(".")[-1].strip("'\"").endswith("Config") and "PretrainedConfig" not in ann \
                        or a.arg == "cfg":
                    found.add(f"{fn.name}: takes {a.arg}")
    return found



@pytest.mark.parametrize("path", LIBRARY, ids=[_name(p) for p in LIBRARY])
def test_library_never_prints_exits_or_takes_a_config(path):
    found = sorted(_library_findings(ast.parse(path.read_text(), str(path))))
    assert not found, (f"library module {_name(path)} prints, exits or takes a command config: {found} "
                       "(that belongs in its command, toucan/commands/<name>.py)")


def test_import_contract():
    """import-linter's contracts (pyproject.toml [tool.importlinter]) hold."""
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe), "--no-cache"], capture_output=True, text=True,
                       cwd=SRC.parents[1])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
