"""The API's checks in `make validate`: `buf lint` and `buf breaking` against the released image (buf.yaml).

Each test runs buf on a copy of buf.yaml and proto/: a change that breaks existing clients must fail and name what it
broke, an added field must pass, and the lint exceptions for names already on the wire must not reach new files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def buf_binary() -> str:
    """The buf the Makefile installs (its BUF), else one on PATH."""
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        pytest.skip("buf is not installed: `make validate` installs it (npm's @bufbuild/buf) into .tools/")
    return found


def released_api() -> str:
    """The image `buf breaking` compares against, as the Makefile names it."""
    match = re.search(r"^RELEASED_API := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile: no RELEASED_API"
    return match.group(1)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of buf.yaml and proto/ to change."""
    shutil.copy(ROOT / "buf.yaml", tmp_path)
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    return tmp_path


def buf(tree: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([buf_binary(), *args], cwd=tree, capture_output=True, text=True, timeout=120, check=False)


def breaking(tree: Path) -> subprocess.CompletedProcess:
    return buf(tree, "breaking", "--against", released_api())


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path.name} no longer has {old!r}: pick another change"
    path.write_text(text.replace(old, new, 1))


def test_the_tree_lints_and_keeps_the_released_api(tree):
    assert (tree / released_api()).is_file()
    for args in (("lint",), ("breaking", "--against", released_api())):
        out = buf(tree, *args)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("path", "old", "new", "reported"),
    [
        ("ganserve/v1/generator.proto", "uint32 latent_dim = 5;", "uint32 latent_dim = 15;",
         'field "5" with name "latent_dim" on message "ModelInfo" was deleted'),
        # Invisible to the WIRE and WIRE_JSON rule sets, which compare message encodings only: why buf.yaml uses FILE.
        ("ganserve/v1/generator.proto", "rpc UnloadModel(UnloadModelRequest) returns (ModelStatus);", "",
         'RPC "UnloadModel" on service "ModelAdmin" was deleted'),
        ("inference/grpc_predict_v2.proto", "string model_name = 1;", "string model = 1;",
         'on message "ModelInferRequest" changed name from "model_name" to "model"'),
        ("inference/grpc_predict_v2.proto", "repeated int64 shape = 3;", "repeated int32 shape = 3;",
         'changed type from "int64" to "int32"'),
    ],
)  # fmt: skip
def test_a_change_that_breaks_clients_fails_and_says_what_broke(tree, path, old, new, reported):
    edit(tree / "proto" / path, old, new)
    out = breaking(tree)
    assert out.returncode != 0
    assert reported in out.stdout and f"proto/{path}:" in out.stdout, out.stdout + out.stderr


def test_an_added_field_keeps_the_released_api(tree):
    """What generator.proto promises: fields are only ever added."""
    edit(tree / "proto" / "ganserve" / "v1" / "generator.proto", "  map<string, string> metadata = 12;\n",
         "  map<string, string> metadata = 12;\n  string added = 99;\n")  # fmt: skip
    out = breaking(tree)
    assert out.returncode == 0, out.stdout + out.stderr


def test_lint_exceptions_cover_only_the_names_already_on_the_wire(tree):
    """generator.proto may keep its unprefixed enum values; a new file in the same package may not."""
    (tree / "proto" / "ganserve" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\n\npackage ganserve.v1;\n\nenum Colour {\n  COLOUR_UNSPECIFIED = 0;\n  RED = 1;\n}\n'
    )
    out = buf(tree, "lint")
    assert out.returncode != 0
    assert 'proto/ganserve/v1/extra.proto:7:3:Enum value name "RED" should be prefixed' in out.stdout, out.stdout
    assert "generator.proto" not in out.stdout
