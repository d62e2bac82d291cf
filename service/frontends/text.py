"""Seeds, labels, versions and numbers as people write them: `0-15`, `1,5,9`, `7`, `three`, `0.7`.

Shared by the PNG routes, the Open Inference Protocol's parameters and the client CLI. Text is bounded before it
is expanded, and integers before they are converted: a few megabytes of `1,1,1,...` or a 5,000-digit version
are refused in microseconds, with a message naming the field, instead of holding the event loop for seconds.
"""

from __future__ import annotations

import math
import re

from service.domain import Label, SeedRange, Seeds
from service.errors import InvalidArgument, short

MAX_DIGITS = 20  # 2**64 - 1, the largest seed, has 20 digits
MAX_TEXT = 64 << 10  # characters of one seeds or labels text
MAX_SEEDS = 1 << 16  # seeds one text may list; a single range a-b is never expanded
SEED_ITEM = re.compile(r"\s*(\d{1,20})\s*(?:-\s*(\d{1,20})\s*)?")
STRENGTHS = "-3,-2,-1,0,1,2,3"  # an edit's strengths when a query or OIP's parameters give none
INTEGER = re.compile(rf"\s*[+-]?\d{{1,{MAX_DIGITS}}}\s*")


def integer(text: str, field: str) -> int:
    """A decimal integer (a sign allowed), refused by its length before it is converted."""
    if not INTEGER.fullmatch(text):
        raise InvalidArgument(f"{field}: an integer of at most {MAX_DIGITS} digits (got {short(text)})")
    return int(text)


def boolean(text: str, field: str) -> bool:
    """0, 1, true or false."""
    if text not in ("0", "1", "true", "false"):
        raise InvalidArgument(f"{field}: 0, 1, true or false (got {short(text, 16)})")
    return text in ("1", "true")


def number(text: str, field: str) -> float:
    """A finite decimal number."""
    try:
        value = float(text) if len(text) <= 64 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidArgument(f"{field}: a number (got {short(text)})")
    return value


def numbers(value: object, field: str, limit: int = 4096) -> list[float]:
    """Comma-separated finite numbers ("-3,-1.5,0"), at most `limit` of them, or one number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [number(str(value), field)]
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{field}: comma-separated numbers, such as '-3,0,3'")
    if value.count(",") >= limit:
        raise InvalidArgument(f"{field}: more than {limit:,} numbers")
    return [number(item.strip(), field) for item in value.split(",")]


def version(text: str, field: str) -> int:
    """ "" → 0 (the latest ready version); otherwise a positive decimal number."""
    if text == "":
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_DIGITS or int(text) < 1:
        raise InvalidArgument(f"{field}: {short(text)} is not a version number")
    return int(text)


def seeds(value: object, field: str) -> Seeds | SeedRange:
    """Seeds as people write them: 7, "0-15", "1,5,9" or "0-3,10" (ranges inclusive)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return Seeds([value])
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: seeds as text, such as '0-15' or '1,5,9' (got {type(value).__name__})")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(f"{field}: {len(value):,} characters, more than {MAX_TEXT:,}; use a range such as 0-99")
    items = [SEED_ITEM.fullmatch(item) for item in value.split(",")]
    if not all(items):
        raise InvalidArgument(f"{field}: {short(value)} is not seeds, such as '0-15' or '1,5,9'")
    if len(items) == 1 and items[0][2] is not None:  # one range: never expanded, the data plane checks its count
        start, stop = int(items[0][1]), int(items[0][2])
        return SeedRange(start, stop - start + 1 if stop >= start else 0)
    out: list[int] = []
    for item in items:
        start = int(item[1])
        stop = start if item[2] is None else int(item[2])
        if stop - start + 1 + len(out) > MAX_SEEDS:
            raise InvalidArgument(f"{field}: more than {MAX_SEEDS:,} seeds")
        out.extend(range(start, stop + 1))
    return Seeds(out)


def label(text: str) -> Label:
    """ "7" → class 7, anything else → the class of that name (the data plane checks either)."""
    if text.isascii() and text.isdigit():
        return Label(index=int(text)) if len(text) <= MAX_DIGITS else Label(name=text)
    return Label(name=text)


def labels(value: object, field: str) -> list[Label]:
    """A class index, a name, or a comma-separated list of them (one per sample)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [Label(index=value)]
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{field}: class indices or names, such as '7' or '3,5,7'")
    if len(value) > MAX_TEXT:
        raise InvalidArgument(f"{field}: {len(value):,} characters, more than {MAX_TEXT:,}")
    return [label(item.strip()) for item in value.split(",")]


def soft(text: str, field: str) -> Label:
    """Soft weights over the classes: "0.5,0.5,0,..."."""
    if len(text) > MAX_TEXT:
        raise InvalidArgument(f"{field}: {len(text):,} characters, more than {MAX_TEXT:,}")
    return Label(soft=tuple(number(w, field) for w in text.split(",")))


def ints(text: str) -> list[int]:
    """ "0-3,7" → [0, 1, 2, 3, 7]: the client CLI's seeds and label indices (ValueError says what is wrong)."""
    try:
        spec = seeds(text, "seeds")
    except InvalidArgument as e:
        raise ValueError(str(e).removeprefix("seeds: ")) from None
    return list(range(spec.start, spec.start + spec.count)) if isinstance(spec, SeedRange) else list(spec.values)
