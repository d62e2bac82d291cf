"""Transport security and bearer tokens: TLS / mTLS credentials that follow their files, and per-call authorization.

Files are untrusted input: a tokens file or certificate that does not parse is refused at start with a message
naming the file and line (never a token), and on a change while serving it is logged and the previous one kept.
Tokens are compared by SHA-256 digest with hmac.compare_digest over every entry, so the time taken does not
depend on how much of a token matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

UNAUTHENTICATED, PERMISSION_DENIED = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
ROLES = ("infer", "admin")  # admin may call everything infer may, and the rest
MIN_TOKEN_CHARS = 16
MAX_HEADER_CHARS = 4096
RECHECK_SECONDS = 1.0  # how often the tokens file's stat is looked at, at most


class SecurityError(Exception):
    """A certificate, key or tokens file that cannot be used; the message names the file (never a secret)."""


@dataclass(frozen=True)
class Token:
    name: str
    role: str
    digest: bytes  # SHA-256 of the token


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    reason: str  # bounded: a metrics label
    message: str  # for the client: says what is wrong, never echoes the token
    token: str = ""  # the token's name, for the audit log


class FileWatch:
    """Tells whether any of some files changed (mtime, ctime, size, inode) since the last look."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [p for p in paths if p]
        self._seen = self._stat()

    def _stat(self) -> tuple:
        def one(path: str):
            try:
                s = os.stat(path)
            except OSError:
                return None
            # ctime too: an edit that keeps the size and then restores the mtime (os.utime, `touch -r`, rsync
            # --times) still moves the ctime, which no caller can set. Two same-size writes within one tick of the
            # file system's clock (a few ms) can still look alike: SIGHUP re-reads regardless.
            return s.st_mtime_ns, s.st_ctime_ns, s.st_size, s.st_ino

        return tuple(one(p) for p in self.paths)

    def changed(self) -> bool:
        now = self._stat()
        if now == self._seen:
            return False
        self._seen = now
        return True


def read_tokens(path: str) -> list[Token]:
    """Parse a tokens file: one `<name> <role> <token>` per line; blank lines and # comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SecurityError(f"auth_tokens_file: cannot read {path} ({type(e).__name__})") from None
    tokens: list[Token] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        # Messages name the line, never a field: with the columns swapped, any of them may be the secret.
        where = f"auth_tokens_file: {path} line {number}"
        if len(fields) != 3:
            raise SecurityError(f"{where}: expected '<name> <role> <token>', got {len(fields)} fields")
        name, role, secret = fields
        if role not in ROLES:
            raise SecurityError(f"{where}: the second field, the role, must be one of {', '.join(ROLES)}")
        if len(secret) < MIN_TOKEN_CHARS:
            raise SecurityError(f"{where}: the token is shorter than {MIN_TOKEN_CHARS} characters")
        digest = hashlib.sha256(secret.encode()).digest()
        if any(t.name == name for t in tokens) or any(hmac.compare_digest(t.digest, digest) for t in tokens):
            raise SecurityError(f"{where}: repeats the name or the token of a line above")
        tokens.append(Token(name, role, digest))
    if not tokens:
        raise SecurityError(f"auth_tokens_file: {path} holds no tokens")
    return tokens


class Authorizer:
    """Decides each call from its method and metadata. `roles` maps a service's full name to the role it needs
    (None: open to all); a service it does not name needs admin, so one added later is never open by accident.
    With `known_methods` (every /package.Service/Method path served), any other path needs admin as well."""

    def __init__(
        self,
        path: str,
        roles: dict[str, str | None],
        clock: Callable[[], float] = time.monotonic,
        on_reload_failure: Callable[[], None] = lambda: None,
        known_methods: frozenset[str] | None = None,
    ):
        self.path, self.roles, self.clock, self.on_reload_failure = path, roles, clock, on_reload_failure
        self.known_methods = known_methods
        self.tokens = read_tokens(path)
        self._watch = FileWatch([path])
        self._next_look = clock() + RECHECK_SECONDS
        self._lock = threading.Lock()

    def reload(self) -> bool:
        """Re-read the file; on a bad file keep the tokens in force and log why. True when they changed."""
        try:
            tokens = read_tokens(self.path)
        except SecurityError as e:
            log.error("%s; the tokens loaded before stay in force", e)
            self.on_reload_failure()
            return False
        changed = tokens != self.tokens
        self.tokens = tokens
        if changed:
            log.info("reloaded %d token(s) from %s", len(tokens), self.path)
        return changed

    def _follow_file(self) -> None:
        now = self.clock()
        if now < self._next_look:
            return
        with self._lock:
            self._next_look = now + RECHECK_SECONDS
            changed = self._watch.changed()
        if changed:
            self.reload()

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Refusal | None:
        """None when `method` (/package.Service/Method) may run with these credentials, else why not."""
        service = method[1:].split("/", 1)[0]
        needed = self.roles.get(service, "admin")
        if self.known_methods is not None and method not in self.known_methods:
            # Unserved methods of a known service too: an infer token then gets PERMISSION_DENIED, not UNIMPLEMENTED,
            # so that the answers do not tell which methods exist.
            needed = "admin"
        if needed is None:
            return None
        self._follow_file()
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return Refusal(
                UNAUTHENTICATED,
                "missing",
                "authorization: no token; send 'authorization: Bearer <token>'",
            )
        if len(values) > 1:
            return Refusal(UNAUTHENTICATED, "malformed", f"authorization: {len(values)} headers, send one")
        value = values[0]
        scheme, _, secret = value.partition(" ") if isinstance(value, str) else ("", "", "")
        if scheme.lower() != "bearer" or not secret.strip() or len(value) > MAX_HEADER_CHARS:
            return Refusal(UNAUTHENTICATED, "malformed", "authorization: expected 'Bearer <token>'")
        digest = hashlib.sha256(secret.strip().encode("utf-8", "surrogateescape")).digest()
        match = None
        for token in self.tokens:  # every entry, match or not: the time does not tell which matched
            if hmac.compare_digest(token.digest, digest):
                match = token
        if match is None:
            return Refusal(UNAUTHENTICATED, "unknown", "authorization: unknown token")
        if needed == "admin" and match.role != "admin":
            return Refusal(
                PERMISSION_DENIED, "role",
                f"authorization: token {match.name!r} has role {match.role}; {method} needs admin", match.name,
            )  # fmt: skip
        return None


def server_credentials(
    cert: str, key: str, client_ca: str = "", on_reload_failure: Callable[[], None] = lambda: None
) -> grpc.ServerCredentials:
    """TLS (mTLS with a client CA) that follows its files: a handshake after they change uses the new ones."""
    watch = FileWatch([cert, key, client_ca])
    lock = threading.Lock()

    def configuration() -> grpc.ServerCertificateConfiguration:
        cert_pem, key_pem, ca_pem = _read_pem(cert, key, client_ca)
        return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], root_certificates=ca_pem)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration when the files changed, else None."""
        with lock:
            if not watch.changed():
                return None
            try:
                fresh = configuration()
            except SecurityError as e:  # half-rotated or broken: keep serving with what works
                log.error("%s; the certificate loaded before stays in use", e)
                on_reload_failure()
                return None
        log.info("reloaded the TLS certificate from %s", cert)
        return fresh

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_authentication=bool(client_ca))


def _read_pem(cert: str, key: str, client_ca: str) -> tuple[bytes, bytes, bytes | None]:
    """Read the PEM files once and check those very bytes with the standard library (the key must match the
    certificate), so that a rotation halfway through cannot hand gRPC a certificate and someone else's key."""
    try:
        cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
        ca_pem = Path(client_ca).read_bytes() if client_ca else None
    except OSError as e:
        raise SecurityError(f"tls_cert / tls_key / tls_client_ca: cannot read {e.filename} ({e.strerror})") from None
    _ssl_context(cert, key, client_ca, cert_pem, key_pem, ca_pem)
    return cert_pem, key_pem, ca_pem


def _ssl_context(
    cert: str, key: str, client_ca: str, cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None
) -> ssl.SSLContext:
    """A server context from PEM bytes; SecurityError names the file that does not do."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as private:  # ssl checks a pair only from files: private copies, then gone
        pair = Path(private) / "pair.pem"
        pair.write_bytes(cert_pem + b"\n" + key_pem)
        try:
            context.load_cert_chain(pair)
        except ssl.SSLError as e:
            raise SecurityError(
                f"tls_cert / tls_key: {cert} and {key} are not a certificate and its key ({e})"
            ) from None
    if ca_pem is not None:
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as e:
            raise SecurityError(f"tls_client_ca: {client_ca} is not a PEM CA certificate ({e})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def http_ssl_context(
    cert: str, key: str, client_ca: str = "", on_reload_failure: Callable[[], None] = lambda: None
) -> ssl.SSLContext:
    """The HTTP port's TLS (mTLS with a client CA), from the gRPC port's files and following them the same way:
    each handshake after they change uses the new ones, and a broken change keeps the old."""
    watch = FileWatch([cert, key, client_ca])
    lock = threading.Lock()
    build = lambda: _ssl_context(cert, key, client_ca, *_read_pem(cert, key, client_ca))  # noqa: E731
    current = [build()]

    def choose(connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        """Called by ssl at each handshake's ClientHello: switch the connection to the files' current context."""
        with lock:
            if watch.changed():
                try:
                    current[0] = build()
                    log.info("reloaded the TLS certificate for HTTP from %s", cert)
                except SecurityError as e:
                    log.error("%s; the certificate loaded before stays in use for HTTP", e)
                    on_reload_failure()
        connection.context = current[0]

    front = build()
    front.sni_callback = choose
    return front
