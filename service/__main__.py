"""`python -m service [--flags]`: parse the configuration and run the server (see service/config.py)."""

import asyncio
import logging
import sys

from service.config import parse
from service.security import SecurityError
from service.server import serve


def main() -> None:
    cfg = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(cfg))
    except SecurityError as e:  # a certificate, key or tokens file that cannot be used: one line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
