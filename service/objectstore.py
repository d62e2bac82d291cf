"""A model repository in an S3-compatible object store: `--model-repository s3://BUCKET/PREFIX` (README, "Models in
object storage").

The keys follow the local layout: PREFIX/<name>/<version>/model.onnx and PREFIX/<name>/model.json. A listing is a
scan; a version exists once its model.onnx object does (an upload appears whole or not at all). When a version loads,
its object is downloaded into a local directory, asked for by the ETag it was listed with (If-Match: an object
replaced meanwhile is never mixed with the old one), checked against the listed size, the MD5 that a single-part
unencrypted upload's ETag names and any checksum the store keeps, and only then renamed into place: a partial or
failed download is never opened. A file already downloaded is checked against its size and the MD5 recorded when it
arrived before it is used again, and deleted once its version stops serving (`forget`).

The client is boto3: it is the reference implementation of AWS's credential chain (AWS_ACCESS_KEY_ID and friends,
AWS_PROFILE and the shared files, web identity as on EKS, container and instance roles) and of AWS_ENDPOINT_URL, and
it is released weekly. It is large (about 25 MB), so it is the `s3` extra, installed in the serving image only.
Credentials are never taken from flags (command lines are readable by every process) and never logged.

Keys, sizes and ETags are untrusted input: odd keys are skipped with a warning, an object over --max-model-bytes is
refused, and nothing from the store becomes a local path except through a hash. A store that cannot be reached or
refuses the credentials raises StoreUnavailable: the registry keeps serving what it has and retries.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlsplit

from service.errors import Unavailable
from service.repository import (
    ENCODER_FILE,
    MAX_SETTINGS_BYTES,
    MAX_VERSION,
    MODEL_FILE,
    NAME,
    NOT_A_NAME,
    SETTINGS_FILE,
    ModelDir,
    RepositoryError,
    parse_settings,
)

log = logging.getLogger(__name__)

BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules
SAFE_KEY = re.compile(r"[A-Za-z0-9._/-]{1,1024}")
MAX_OBJECTS = 100_000  # listed per scan; a prefix with more is refused (each poll would list them all)
CHUNK = 1 << 20
LOCK_FILE = ".lock"
DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
CREDENTIALS = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the pod's role"


class StoreUnavailable(Unavailable):
    """The store cannot answer now (unreachable, credentials refused, the object changed), or the download directory
    cannot take a version (full): try again later."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind  # a bounded metric label: unreachable, denied, no_bucket, changed, disk, error


def parse_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] → (bucket, prefix ending in "/" or empty); RepositoryError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or parts.query or parts.fragment or "@" in parts.netloc:
        raise RepositoryError(f"{url[:200]}: expected s3://BUCKET/PREFIX")
    if not BUCKET.fullmatch(parts.netloc):
        raise RepositoryError(f"{url[:200]}: {parts.netloc[:64]!r} is not a bucket name (3-63 of a-z 0-9 . -)")
    prefix = parts.path.strip("/")
    if prefix and (not SAFE_KEY.fullmatch(prefix) or {"", ".", ".."} & set(prefix.split("/"))):
        raise RepositoryError(f"{url[:200]}: the prefix may hold A-Z a-z 0-9 . _ - and / only, with no . or .. parts")
    return parts.netloc, prefix + "/" if prefix else ""


def connect(url: str, endpoint: str = "", region: str = ""):
    """A boto3 S3 client as the standard chain configures it, and the endpoint it talks to (without any userinfo)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RepositoryError(f"{url}: s3:// repositories need boto3: pip install 'gan-serve[s3]'") from None
    # A custom endpoint (SeaweedFS, MinIO, Ceph) is addressed by path: bucket.host names rarely resolve there.
    custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        connect_timeout=3, read_timeout=30, retries={"mode": "standard", "max_attempts": 3},
        s3={"addressing_style": "path"} if custom else None,
    )  # fmt: skip
    try:
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region or None, config=config
        )
    except Exception as e:  # a profile that does not exist, an endpoint that is not a URL: the settings, at start
        raise RepositoryError(f"{url}: the S3 settings cannot be used ({type(e).__name__}: {str(e)[:200]})") from None
    host = urlsplit(client.meta.endpoint_url)
    return client, f"{host.scheme}://{host.hostname}" + (f":{host.port}" if host.port else "")


def failure(e: Exception, store: str, bucket: str) -> StoreUnavailable:
    """What went wrong with `store`, in one line that never holds a credential."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(e, StoreUnavailable):
        return e
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return StoreUnavailable(f"{store}: no credentials found (set {CREDENTIALS})", "denied")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))[:64]
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in DENIED or status == 403:
            return StoreUnavailable(f"{store}: access denied ({code or status}): check {CREDENTIALS}", "denied")
        if code == "NoSuchBucket" or (code == "404" and e.operation_name == "HeadBucket"):
            return StoreUnavailable(f"{store}: no bucket named {bucket!r}", "no_bucket")
        if code in ("PreconditionFailed", "NoSuchKey", "412", "ConditionalRequestConflict"):
            return StoreUnavailable(f"{store}: the object changed while it was used ({code})", "changed")
        return StoreUnavailable(f"{store}: the store answered {status} {code}", "error")
    if isinstance(e, ConnectionError | HTTPClientError | IncompleteReadError):  # timeouts and cut transfers too
        return StoreUnavailable(f"{store}: cannot reach the store ({type(e).__name__})", "unreachable")
    return StoreUnavailable(f"{store}: {type(e).__name__}: {str(e)[:200]}", "error")


def publish(url: str, name: str, model_file: Path) -> str:
    """Upload `model_file` as the next version of `name` under s3://BUCKET/PREFIX; returns the new object's URL.

    The write is conditional (If-None-Match: *), so two publishers racing for a number never overwrite each other: the
    one that loses takes the next number. Content-MD5 has the store refuse bytes that did not arrive whole.
    """
    bucket, prefix = parse_url(url)
    if not NAME.fullmatch(name):
        raise RepositoryError(f"{name[:64]!r} is not a model name (letters, digits, '.', '_', '-')")
    client, endpoint = connect(url)
    body = Path(model_file).read_bytes()
    digest = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
    store = f"{url} at {endpoint}"
    for _ in range(100):
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}{name}/", Delimiter="/"
            )
            folders = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", ())]
            taken = [folder[len(prefix) + len(name) + 1 :].rstrip("/") for folder in folders]
            version = max((int(v) for v in taken if v.isdecimal()), default=0) + 1
            key = f"{prefix}{name}/{version}/{MODEL_FILE}"
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=digest, IfNoneMatch="*")
            return f"s3://{bucket}/{key}"
        except Exception as e:
            why = failure(e, store, bucket)
            if why.kind != "changed":  # "changed": another publisher took the number first
                raise why from None
    raise StoreUnavailable(f"{store}: could not take a version number for {name!r}", "changed")


class S3Repository:
    """The s3:// kind of repository (see service/repository.py, Repository)."""

    def __init__(self, url: str, downloads: Path, max_bytes: int, endpoint: str = "", region: str = ""):
        self.url, (self.bucket, self.prefix) = url, parse_url(url)
        self.max_bytes = max_bytes
        self.client, self.endpoint = connect(url, endpoint, region)
        where = hashlib.sha256(f"{self.endpoint}\0{self.bucket}\0{self.prefix}".encode()).hexdigest()[:16]
        self.downloads = Path(downloads) / where
        self._settings: dict[tuple[str, str], object] = {}  # (key, ETag) → its policy, or the error it raised
        self._lock = threading.Lock()  # one download of a file at a time

    def __str__(self) -> str:
        return self.url

    # ---- the Repository interface ------------------------------------------------------------------

    def check(self) -> None:
        """RepositoryError when the bucket is missing or the credentials are refused; StoreUnavailable when the
        store cannot be reached (the server starts, and retries)."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as e:
            failure = self.failure(e)
            if failure.kind in ("denied", "no_bucket"):
                raise RepositoryError(str(failure)) from None
            raise failure from None

    def scan(self) -> tuple[dict[str, ModelDir], dict[str, str]]:
        versions: dict[str, dict[int, tuple[str, int, str]]] = {}  # name → version → (key, size, ETag)
        encoders: dict[str, dict[int, tuple[str, int, str]]] = {}  # the same for encoder.onnx beside a model.onnx
        settings: dict[str, tuple[str, int, str]] = {}
        skipped: dict[str, str] = {}
        for count, (key, size, etag) in enumerate(self._list()):
            if count == MAX_OBJECTS:  # a partial listing would read as versions deleted
                raise StoreUnavailable(f"{self}: more than {MAX_OBJECTS} objects under the prefix; narrow it", "error")
            rel = key[len(self.prefix) :]
            if rel.endswith("/") and not size:  # a "folder" marker that consoles create
                continue
            parts = rel.split("/")
            if not SAFE_KEY.fullmatch(rel) or {"", ".", ".."} & set(parts):
                skipped[rel[:64]] = "odd object key (only A-Z a-z 0-9 . _ - /, no empty, . or .. parts)"
                continue
            in_version = parts[-1] in (MODEL_FILE, ENCODER_FILE)
            if parts[-1] not in (MODEL_FILE, ENCODER_FILE, SETTINGS_FILE) or len(parts) != (3 if in_version else 2):
                continue  # anything else beside the models
            if not NAME.fullmatch(parts[0]):
                skipped[parts[0][:64]] = NOT_A_NAME
            elif len(parts) == 2:
                settings[parts[0]] = (key, size, etag)
            elif parts[1].isdecimal() and parts[1] == str(int(parts[1])) and 1 <= int(parts[1]) <= MAX_VERSION:
                found = versions if parts[-1] == MODEL_FILE else encoders
                found.setdefault(parts[0], {})[int(parts[1])] = (key, size, etag)
            else:
                skipped[f"{parts[0]}/{parts[1][:32]}"] = "not a version number (1, 2, …; no leading zeros)"
        self._settings = {k: v for k, v in self._settings.items() if k in {(key, e) for key, _, e in settings.values()}}
        models = {}
        for name in sorted(set(versions) | set(settings)):
            policy, error = None, ""
            try:
                policy = self._read_settings(name, *settings[name]) if name in settings else None
            except RepositoryError as e:
                error = str(e)
            found = versions.get(name, {})
            files = {v: key for v, (key, _, _) in found.items()}
            stamps = {v: (size, etag) for v, (_, size, etag) in found.items()}
            beside = {v: e for v, e in encoders.get(name, {}).items() if v in found}
            models[name] = ModelDir(name, files, stamps, policy, error, encoders=beside)
        self._prune({(name, str(v)) for name, found in versions.items() for v in found})
        return models, skipped

    def fetch(self, model: ModelDir, version: int) -> Path:
        key, (size, etag) = str(model.files[version]), model.stamps[version]
        where = f"{model.name}/{version}/{MODEL_FILE}"
        if size > self.max_bytes:
            raise RepositoryError(f"{where}: {size} bytes, over the limit of {self.max_bytes} (--max-model-bytes)")
        folder = self.downloads / model.name / str(version)
        path = folder / (hashlib.sha256(etag.encode()).hexdigest()[:32] + ".onnx")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # One download of a version at a time, across processes too (--workers, replicas sharing a cache):
            # the one that waited finds the file in place and checks it.
            with self._lock, open(folder / LOCK_FILE, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not _intact(path, size):
                    self._download(key, etag, size, path)
                kept = {path.stem}
                encoder = self.encoder(model, version, path, present=False)
                if encoder is not None:  # an encoder too big is left in the store: the version serves without one
                    e_key, e_size, e_etag = model.encoders[version]
                    try:
                        if not _intact(encoder, e_size):
                            self._download(e_key, e_etag, e_size, encoder)
                        kept.add(encoder.stem)
                    except RepositoryError as e:  # its own bytes are wrong: the generator serves without it
                        log.warning("%s: %s; serving version %d without inversion", self.url, e, version)
                for old in folder.iterdir():  # earlier uploads of this version; an open session keeps its own
                    if old.suffix in (".onnx", ".md5") and old.stem not in kept:
                        old.unlink(missing_ok=True)
        except OSError as e:  # the download directory (full, say), not the version: tried again later
            raise StoreUnavailable(f"download directory {folder}: {os.strerror(e.errno or 0)}", "disk") from None
        return path

    def encoder(self, model: ModelDir, version: int, path: Path, present: bool = True) -> Path | None:
        """Where the version's encoder.onnx is downloaded beside `path` (named by its ETag, as the model is), if the
        store lists one within --max-model-bytes; with `present`, only once it is there."""
        if version not in model.encoders or model.encoders[version][1] > self.max_bytes:
            return None
        found = path.parent / (hashlib.sha256(model.encoders[version][2].encode()).hexdigest()[:32] + ".encoder.onnx")
        return found if not present or found.is_file() else None

    def forget(self, name: str, version: int) -> None:
        """Drop the download of a version that no longer serves, unless another process is using it right now."""
        self._remove(self.downloads / name / str(version))

    # ---- the store ---------------------------------------------------------------------------------

    def failure(self, e: Exception) -> StoreUnavailable:
        return failure(e, f"{self.url} at {self.endpoint}", self.bucket)

    def _list(self):
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield str(obj["Key"]), int(obj.get("Size", 0)), str(obj.get("ETag", ""))
        except Exception as e:
            raise self.failure(e) from None

    def _prune(self, listed: set[tuple[str, str]]) -> None:
        """Downloads of versions the store no longer lists: a session that opened one keeps it open."""
        for folder in self.downloads.glob("*/*") if self.downloads.is_dir() else ():
            if (folder.parent.name, folder.name) not in listed:
                self._remove(folder)

    def _remove(self, folder: Path) -> None:
        """Delete a version's download folder, unless a download into it holds its lock (in any process)."""
        with self._lock, contextlib.suppress(OSError), open(folder / LOCK_FILE, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            shutil.rmtree(folder, ignore_errors=True)

    def _read_settings(self, name: str, key: str, size: int, etag: str) -> object:
        where = f"{name}/{SETTINGS_FILE}"
        if size > MAX_SETTINGS_BYTES:
            raise RepositoryError(f"{where}: larger than {MAX_SETTINGS_BYTES} bytes")
        if (key, etag) not in self._settings:
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag)["Body"]
                raw = body.read(MAX_SETTINGS_BYTES + 1)
            except Exception as e:
                raise self.failure(e) from None
            try:
                self._settings[(key, etag)] = parse_settings(raw, where)
            except RepositoryError as e:
                self._settings[(key, etag)] = e
        found = self._settings[(key, etag)]
        if isinstance(found, RepositoryError):
            raise found
        return found

    def _download(self, key: str, etag: str, size: int, path: Path) -> None:
        """The object as listed into `path`, with its MD5 beside it (path.md5, for the check before each reuse), or
        nothing there at all."""
        partial = path.with_name(f".{path.name}.{os.getpid()}.part")
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key, IfMatch=etag, ChecksumMode="ENABLED")
            got = 0
            with open(partial, "wb") as f:
                for chunk in answer["Body"].iter_chunks(CHUNK):
                    got += len(chunk)
                    if got > size:
                        break
                    md5.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except Exception as e:
            partial.unlink(missing_ok=True)
            raise e if isinstance(e, OSError) else self.failure(e) from None
        where = f"{self.url}: {key[:200]}"
        if got != size:  # cut short: the transfer, not the object
            partial.unlink(missing_ok=True)
            raise StoreUnavailable(f"{where}: {got} bytes arrived of the {size} listed", "changed")
        if _md5_etag(etag, answer) not in (None, md5.hexdigest()):  # the object itself: no retry makes it right
            partial.unlink(missing_ok=True)
            raise RepositoryError(f"{key[len(self.prefix) :][:200]}: its bytes do not match the MD5 its ETag names")
        path.with_suffix(".md5").write_text(md5.hexdigest())
        os.replace(partial, path)


def _md5_etag(etag: str, answer: dict) -> str | None:
    """The MD5 an ETag names, or None where it names none: a multipart upload ("…-N"), or an object encrypted with
    KMS or a customer's key, whose ETag is not the MD5 of its bytes (those are held by size, If-Match and the
    store's checksum)."""
    etag = etag.strip('"').lower()
    if answer.get("SSECustomerAlgorithm") or answer.get("ServerSideEncryption", "AES256") != "AES256":
        return None
    return etag if re.fullmatch(r"[0-9a-f]{32}", etag) else None


def _intact(path: Path, size: int) -> bool:
    """A download as it was checked: its size, and the MD5 recorded when it arrived."""
    try:
        if path.stat().st_size != size:
            return False
        recorded = path.with_suffix(".md5").read_text().strip()
    except OSError:
        return False
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
    return md5.hexdigest() == recorded
