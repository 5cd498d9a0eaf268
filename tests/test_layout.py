"""The code keeps the shape docs/architecture.md draws: small modules, and one direction of
imports (nothing below the verb imports the verb or the CLI back)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "llmpress"
MAX_LINES = 460  # "about 450"; a module over it says why in its docstring
TOP = {"api.py", "cli.py", "cli_options.py", "__init__.py"}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "egg-info" not in str(p))


def test_modules_are_small_or_say_why():
    long = []
    for path in _modules():
        text = path.read_text()
        lines = len(text.splitlines())
        why = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and "over 450 lines because" not in why:
            long.append(f"{path.relative_to(SRC)}: {lines} lines")
    assert not long, long


def test_nothing_below_the_verb_imports_it():
    upward = []
    for path in _modules():
        if path.name in TOP and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name in ("llmpress.api", "llmpress.cli", "llmpress.cli_options"):
                    upward.append(f"{path.relative_to(SRC)} imports {name}")
    assert not upward, upward
