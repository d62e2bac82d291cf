"""Bearer tokens for tests of the tokens file: a reader's, an admin's, one that is in no file."""

from __future__ import annotations

from pathlib import Path

READER, ADMIN, WRONG = "r3ader-token-0123456789", "adm1n-token-0123456789ab", "not-a-token-0123456789"


def write_tokens(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    path.write_text("# name role token\n" + "".join(f"{n} {role} {tok}\n" for n, (role, tok) in entries.items()))
    return path
