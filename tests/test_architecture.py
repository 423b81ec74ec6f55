"""The layout's promises, checked on the source: one path from conversations to model inputs (one place builds the
conversation encoder, one transform prepares pixels, one constant names the image token), one atomic-write module,
one digest-cache module, commands apart from the library, and a docstring at the top of every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "spatial_mllm"
MODULES = sorted(PACKAGE.rglob("*.py"))


def where(pattern: str) -> set[str]:
    """Package-relative paths of the modules whose code (comments and docstrings aside) matches `pattern`."""
    found = set()
    for path in MODULES:
        code = _code_only(path.read_text(encoding="utf-8"))
        if re.search(pattern, code, flags=re.MULTILINE):
            found.add(path.relative_to(PACKAGE).as_posix())
    return found


def _code_only(source: str) -> str:
    tree = ast.parse(source)
    docstrings = {
        node.body[0].value.lineno
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    lines = []
    for number, line in enumerate(source.splitlines(), start=1):
        if number in docstrings or line.lstrip().startswith("#"):
            continue
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize(
    "pattern,allowed",
    [
        # inside the processor only, and its text-only twin for LLMs without images (the world's description LLM)
        (r"ConversationEncoder\(", {"model/processing.py", "diagnostics/text_accuracy.py"}),
        (r"^IMAGE_TOKEN\s*=", {"model/configuration.py"}),
        (r"pad_to_square\(|image_mean", {"model/image_transform.py"}),  # one image transform
        (r"os\.replace\(|os\.rename\(|tempfile\.mk", {"files.py"}),  # one atomic-publish helper
        (r"hashlib", {"cache.py", "demo/world/scene.py"}),  # digests (the world's use derives seeds)
        (r"^import argparse", {"cli.py", *{p for p in where(r"^def register\(") if p.endswith("commands.py")}}),
        (r"from \.+cli import|cli\.main\(", set()),  # nothing calls the command line from inside
    ],
)
def test_one_place_for(pattern, allowed):
    assert where(pattern) <= allowed


def test_every_module_opens_with_a_docstring():
    missing = [
        path.relative_to(PACKAGE).as_posix()
        for path in MODULES
        if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None
    ]
    assert missing == []


def test_commands_modules_only_parse_and_print():
    # Library modules return values; the functions a command module defines are its parser and its handlers.
    for path in PACKAGE.rglob("commands.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        public = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
        assert set(public) <= {"register", "key_table", "pope_table"}, path
