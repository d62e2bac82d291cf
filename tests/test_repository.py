"""The model repository on disk (service/repository.py): policies, layout, and model.json as untrusted input."""

from __future__ import annotations

import os

import pytest

from service.repository import RepositoryError, VersionPolicy, scan


@pytest.mark.parametrize(
    ("text", "versions", "selected"),
    [
        ("all", {1, 2, 5}, {1, 2, 5}),
        ("latest:1", {1, 2, 5}, {5}),
        ("latest:2", {1, 2, 5}, {2, 5}),
        ("latest:9", {1, 2}, {1, 2}),
        ("specific:1,5,7", {1, 2, 5}, {1, 5}),
        ("latest:1", set(), set()),
    ],
)
def test_policies_select(text, versions, selected):
    policy = VersionPolicy.parse(text, "version_policy")
    assert policy.select(versions) == selected and str(VersionPolicy.parse(str(policy), "x")) == str(policy)


@pytest.mark.parametrize("text", ["", "latest", "latest:0", "latest:-1", "specific:", "specific:0", "specific:a",
                                  "all:2", "newest", "specific:4294967296"])  # fmt: skip
def test_bad_policies_are_refused_naming_where(text):
    with pytest.raises(RepositoryError, match=r"^here: expected all, latest:N or specific"):
        VersionPolicy.parse(text, "here")


def test_scan_reads_the_layout_and_skips_what_is_not_a_model(tmp_path):
    for rel in ("a/1/model.onnx", "a/2/model.onnx", "a/007/model.onnx", "a/.staging/model.onnx", "a/x3/model.onnx",
                "../escape/1/model.onnx", "bad name/1/model.onnx", ".hidden/1/model.onnx"):  # fmt: skip
        path = tmp_path / "repo" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"onnx")
    (tmp_path / "repo" / "a" / "3").mkdir()  # a version folder still empty
    (tmp_path / "repo" / "a" / "4" / "model.onnx").mkdir(parents=True)  # not a file
    models, skipped = scan(tmp_path / "repo")
    assert set(models) == {"a"} and sorted(models["a"].files) == [1, 2] and list(skipped) == ["bad name"]
    assert models["a"].policy is None and models["a"].error == ""


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ('{"version_policy": "all"}', ""),
        ('{"version_policy": "latest:0"}', "m/model.json: version_policy: expected"),
        ('{"policy": "all"}', "m/model.json: unknown key 'policy'"),
        ("[1, 2]", "m/model.json: expected a JSON object"),
        ("{", "m/model.json: not valid JSON"),
        ("[" * 60_000, "m/model.json: not valid JSON"),  # nesting deeper than the parser's recursion
        ('{"version_policy": ' + "1" * 5000 + "}", "m/model.json: not valid JSON"),  # past int's digit limit
        (b"\xff\xfe", "m/model.json: not valid JSON"),
        ("{}" + " " * (64 << 10), "m/model.json: larger than 65536 bytes"),
    ],
)
def test_model_json_is_validated_with_its_name_in_every_error(tmp_path, content, error):
    (tmp_path / "m" / "1").mkdir(parents=True)
    settings = tmp_path / "m" / "model.json"
    settings.write_bytes(content if isinstance(content, bytes) else content.encode())
    model = scan(tmp_path)[0]["m"]
    assert model.error.startswith(error) and (model.policy is None) == bool(error)


def test_a_fifo_for_model_json_does_not_block_the_scan(tmp_path):
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "model.json")
    assert scan(tmp_path)[0]["m"].error == "m/model.json: not a regular file"
