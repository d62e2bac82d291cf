"""`python -m service [--flags]`: parse the configuration and run the server (see service/config.py)."""

import asyncio
import contextlib
import ctypes
import logging
import os
import sys

from service.config import parse
from service.security import SecurityError
from service.server import StartupError, serve
from service.workers import Group, tie_to_parent

M_ARENA_MAX = -8  # glibc's mallopt parameter


def bound_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, as MALLOC_ARENA_MAX would (which, when set, wins).

    glibc gives new threads new arenas, up to 8 per core, and every version that joins starts batcher threads:
    over a 10-minute soak with a reload a minute, RSS stepped up 9%. With two arenas it stayed flat (-0.1%) at the
    same throughput (bench/README.md, "Soak").
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to cap
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)


def main() -> None:
    cfg = parse()
    bound_malloc_arenas()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if cfg.workers > 1:  # the parent of several workers serves nothing itself
            sys.exit(Group(cfg, sys.argv[1:]).run())
        tie_to_parent()  # a worker of --workers: end with the parent
        asyncio.run(serve(cfg))
    except (SecurityError, StartupError) as e:
        # A file, directory or port the operator must fix: one line and status 2, as for a bad flag, no traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
