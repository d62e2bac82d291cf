"""The model repository: its layout, version policies and per-model settings, and the kind in a local directory
(service/objectstore.py is the s3:// kind). Stdlib only; no loading.

Layout: <repository>/<name>/<version>/model.onnx, the version a positive integer written without leading zeros,
and optionally <repository>/<name>/model.json, {"version_policy": "latest:2"}, which overrides the server's policy
for that model. Everything here is untrusted input: names are checked before they reach a log line or a metric
label, model.json is read with a size limit and validated, and every problem names its file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

MODEL_FILE = "model.onnx"
ENCODER_FILE = "encoder.onnx"  # beside model.onnx: what inversion needs (service/contract.py, EncoderSpec)
SETTINGS_FILE = "model.json"
MAX_SETTINGS_BYTES = 64 << 10
MAX_VERSION = 2**32 - 1  # versions travel as uint32
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
POLICIES = "all, latest:N or specific:V[,V...]"


class RepositoryError(ValueError):
    """A setting that cannot be used; the message names where it came from."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions on disk are served: all of them, the newest N, or the ones listed."""

    kind: str  # "all" | "latest" | "specific"
    count: int = 0  # latest
    versions: frozenset[int] = frozenset()  # specific

    @classmethod
    def parse(cls, text: str, where: str) -> VersionPolicy:
        kind, _, arg = str(text).strip().partition(":")
        try:
            if kind == "all" and not arg:
                return cls("all")
            if kind == "latest" and int(arg) >= 1:
                return cls("latest", count=int(arg))
            if kind == "specific":
                versions = frozenset(int(v) for v in arg.split(","))
                if versions and all(1 <= v <= MAX_VERSION for v in versions):
                    return cls("specific", versions=versions)
        except ValueError:
            pass
        raise RepositoryError(f"{where}: expected {POLICIES} (got {str(text)[:64]!r})")

    def select(self, versions: Iterable[int]) -> set[int]:
        versions = set(versions)
        if self.kind == "latest":
            return set(sorted(versions)[-self.count :])
        if self.kind == "specific":
            return versions & self.versions
        return versions

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, sorted(self.versions)))
        return "all"


# A version's identity as listed: (size, mtime_ns, inode) on disk, (size, ETag) in an object store. A file that
# changes gets a new stamp, and a version that failed to load is tried again once its stamp changes.
Stamp = tuple
NOT_A_NAME = "not a model name (letters, digits, '.', '_', '-')"


@dataclass(frozen=True)
class ModelDir:
    """One model as found on disk."""

    name: str
    files: dict[int, Path | str] = field(default_factory=dict)  # version → its model.onnx (a path, or an object key)
    stamps: dict[int, Stamp] = field(default_factory=dict)
    policy: VersionPolicy | None = None  # from model.json; None: the server's
    error: str = ""  # why model.json cannot be used, or the folder read ("" when all is well)
    readable: bool = True  # False: the folder could not be listed, so `files` says nothing about what is there
    encoders: dict[int, tuple[str, int, str]] = field(default_factory=dict)  # in a store: version → (key, size, ETag)


def check_root(root: Path) -> None:
    """RepositoryError naming `root` when it does not exist, is not a directory, or cannot be listed."""
    try:
        st = root.stat()
    except FileNotFoundError:
        raise RepositoryError(f"{root}: no such directory") from None
    except OSError as e:
        raise RepositoryError(f"{root}: cannot be read ({os.strerror(e.errno or 0) or type(e).__name__})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RepositoryError(f"{root}: not a directory")
    if not os.access(root, os.R_OK | os.X_OK):  # listing its models needs both
        raise RepositoryError(f"{root}: cannot be read ({os.strerror(errno.EACCES)})")


class Repository(Protocol):
    """Where versions come from. The registry calls these off the event loop."""

    def check(self) -> None:
        """RepositoryError when it can never serve (a missing directory or bucket, credentials refused)."""

    def scan(self) -> tuple[dict[str, ModelDir], dict[str, str]]:
        """Every model by name, and what was skipped (→ why, for a warning)."""

    def fetch(self, model: ModelDir, version: int) -> Path:
        """A local file holding the version's model.onnx exactly as listed (and its encoder.onnx, where listed)."""

    def encoder(self, model: ModelDir, version: int, path: Path) -> Path | None:
        """The local file of the version's encoder.onnx once fetch() returned `path`, or None without one."""

    def forget(self, name: str, version: int) -> None:
        """The version no longer serves: any local copy made for it may go."""


class LocalRepository:
    """A model repository in a directory of this machine: files are opened where they lie."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def check(self) -> None:
        check_root(self.root)

    def scan(self) -> tuple[dict[str, ModelDir], dict[str, str]]:
        return scan(self.root)

    def fetch(self, model: ModelDir, version: int) -> Path:
        return Path(model.files[version])

    def encoder(self, model: ModelDir, version: int, path: Path) -> Path | None:
        found = path.parent / ENCODER_FILE
        return found if found.is_file() else None

    def forget(self, name: str, version: int) -> None:
        """Files are opened where they lie: there is no copy to drop."""


def scan(root: Path) -> tuple[dict[str, ModelDir], dict[str, str]]:
    """Every model under `root` by name, and what was skipped (a directory name → why)."""
    models: dict[str, ModelDir] = {}
    skipped: dict[str, str] = {}
    if not root.is_dir():
        return models, skipped
    for model_dir in sorted(root.iterdir()):
        if model_dir.name.startswith(".") or not model_dir.is_dir():
            continue
        if not NAME.fullmatch(model_dir.name):
            skipped[model_dir.name] = NOT_A_NAME
            continue
        try:
            files, stamps = _versions(model_dir)
        except OSError as e:  # deleted meanwhile, or not ours to read: the registry keeps what it knew
            error = f"{model_dir.name}: cannot be read ({os.strerror(e.errno or 0) or type(e).__name__})"
            models[model_dir.name] = ModelDir(model_dir.name, error=error, readable=False)
            continue
        policy, error = None, ""
        try:
            policy = read_settings(model_dir / SETTINGS_FILE)
        except RepositoryError as e:
            error = str(e)
        models[model_dir.name] = ModelDir(model_dir.name, files, stamps, policy, error)
    return models, skipped


def _versions(model_dir: Path) -> tuple[dict[int, Path], dict[int, Stamp]]:
    files, stamps = {}, {}
    for version_dir in model_dir.iterdir():
        name = version_dir.name
        if not (name.isdecimal() and name.isascii() and name == str(int(name)) and 1 <= int(name) <= MAX_VERSION):
            continue  # staging folders, model.json, "007"
        path = version_dir / MODEL_FILE
        try:
            st = path.stat()
        except OSError:
            continue  # no model file (yet)
        if stat.S_ISREG(st.st_mode):
            files[int(name)] = path
            stamps[int(name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return files, stamps


def read_settings(path: Path) -> VersionPolicy | None:
    """A model's model.json: its version policy, or None when there is no file or it sets none."""
    where = f"{path.parent.name}/{path.name}"
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the scan for good
            raise RepositoryError(f"{where}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_SETTINGS_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RepositoryError(f"{where}: cannot be read ({os.strerror(e.errno or 0) or type(e).__name__})") from None
    return parse_settings(raw, where)


def parse_settings(raw: bytes, where: str) -> VersionPolicy | None:
    """model.json's bytes (at most MAX_SETTINGS_BYTES + 1 of them read) as read_settings reads them."""
    if len(raw) > MAX_SETTINGS_BYTES:
        raise RepositoryError(f"{where}: larger than {MAX_SETTINGS_BYTES} bytes")
    try:
        settings = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, nesting too deep, an integer too long
        raise RepositoryError(f"{where}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(settings, dict):
        raise RepositoryError(f"{where}: expected a JSON object")
    unknown = sorted(set(settings) - {"version_policy"})
    if unknown:
        raise RepositoryError(f"{where}: unknown key {unknown[0][:64]!r} (known: version_policy)")
    if "version_policy" not in settings:
        return None
    return VersionPolicy.parse(settings["version_policy"], f"{where}: version_policy")
