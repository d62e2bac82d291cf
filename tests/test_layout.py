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


SERVICE = ROOT / "service"
FRONT_ENDS = ("ganserve", "admin", "oip_grpc", "oip_rest", "pages", "images")
# What each layer of the service may not import: the data plane speaks no wire, the gate knows no transport, the
# two transport adapters know neither each other nor a front end, and no front end imports another.
LAYERS = {
    "service/dataplane.py": ("grpc", "aiohttp", "service.frontends", "service.api", "service.gate"),
    "service/domain.py": ("grpc", "aiohttp", "service.frontends", "service.api"),
    "service/cache.py": ("grpc", "aiohttp", "service.frontends", "service.api", "service.registry"),
    "service/gate.py": ("aiohttp", "service.frontends", "service.http", "service.interceptor", "service.api"),
    "service/interceptor.py": ("aiohttp", "service.http", "service.frontends"),
    "service/http.py": ("grpc", "service.interceptor", *(f"service.frontends.{f}" for f in FRONT_ENDS)),
    **{
        f"service/frontends/{f}.py": tuple(f"service.frontends.{other}" for other in FRONT_ENDS if other != f)
        for f in FRONT_ENDS
    },
}


@pytest.mark.parametrize(("module", "refused"), LAYERS.items(), ids=list(LAYERS))
def test_each_layer_imports_only_what_is_below_it(module, refused):
    names = imported(ast.parse((ROOT / module).read_text(), module))
    bad = [n for n in names if any(n == r or n.startswith(r + ".") for r in refused)]
    assert not bad, f"{module} imports {bad}"
