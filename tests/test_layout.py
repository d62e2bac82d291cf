"""Tests and benches share helpers through testkit/ alone: none imports a test module, conftest or tests/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("testkit/*.py")])


def imported(tree: ast.Module) -> list[str]:
    """Every module an import statement names, relative ones with their leading dots."""
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names += [base] if node.module else [f"{base}{a.name}" for a in node.names]
    return names


def forbidden(name: str) -> bool:
    parts = name.lstrip(".").split(".")
    return parts[0] == "tests" or "conftest" in parts or any(p.startswith("test_") for p in parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_test_module_or_conftest(path):
    bad = [n for n in imported(ast.parse(path.read_text(), str(path))) if forbidden(n)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: move what it needs to testkit/"


def test_the_check_sees_what_it_must_refuse():
    refused = "from tests.certs import CA\nfrom .conftest import x\nimport test_fuzz\nfrom . import test_oip\n"
    assert all(forbidden(n) for n in imported(ast.parse(refused)))
    assert not any(forbidden(n) for n in imported(ast.parse("from testkit.load import Tally\nimport pytest\n")))
