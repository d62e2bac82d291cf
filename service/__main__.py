"""`python -m service [--flags]`: parse the configuration and run the server (see service/config.py)."""

import asyncio
import logging

from service.config import parse
from service.server import serve


def main() -> None:
    cfg = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
