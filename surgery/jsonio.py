"""Reading JSON from files surgery did not write (configs, indexes, headers, surgery.json,
training JSONL): every failure is a located `SurgeryError`, never a traceback, and memory and
recursion stay bounded (huge files, numbers of thousands of digits, nesting 100,000 deep)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

MAX_JSON_BYTES = 64 << 20  # config.json, indexes and surgery.json are far smaller
MAX_DEPTH = 256
MAX_COUNT = 10**18  # steps, tokens, sizes: far beyond any real run, far below float64's exact range of trouble
MAX_FLOPS = 1e30  # a training run's FLOPs (today's largest are ~1e26)
MAX_LOSS = 1e4  # nats per token; a loss above this is a corrupt record, not a diverged run (that is NaN or inf)


def bounded_number(v: Any, *, lo: float, hi: float, integer: bool = False, nan: bool = False) -> bool:
    """Whether `v`, a number read from a file or a command line, is usable: a real number (not a
    bool, not a string), an integer where one is meant, finite unless `nan` allows NaN/inf, within
    [lo, hi]. The one test every reader of numbers in files applies, so nothing downstream (sums,
    proportions, fits, plots) can overflow."""
    import math

    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if integer and not isinstance(v, int):
        return False
    if isinstance(v, int) and not lo <= v <= hi:
        return False
    f = float(v)
    if not math.isfinite(f):
        return nan
    return lo <= f <= hi


def parse_json(text: str | bytes, where: str, *, error: type[SurgeryError] = SurgeryError, what: str = "JSON") -> Any:
    """json.loads with located errors and a nesting bound checked before parsing."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{what} is not UTF-8 ({e.reason} at byte {e.start})", where=where) from None
    depth = bracket_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{what} is nested more than {MAX_DEPTH} levels deep (corrupt or hostile file)", where=where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", where=where) from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of thousands of digits
        raise error(f"{what} cannot be read: {str(e)[:200]}", where=where) from None


def read_json(path: Path, *, error: type[SurgeryError] = SurgeryError, what: str | None = None, max_bytes: int = MAX_JSON_BYTES) -> Any:
    where = str(path)
    what = what or path.name
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror}", where=where) from None
    if len(raw) > max_bytes:
        raise error(f"{what} is over {max_bytes:,} bytes (corrupt or hostile file)", where=where)
    return parse_json(raw, where, error=error, what=what)


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def bracket_depth(text: str, skip: re.Pattern = _STRING, limit: int = MAX_DEPTH) -> int:
    """How deep [ and { nest in `text` outside what `skip` matches (strings; for YAML also quotes
    and comments), stopping early past `limit`: regular expressions in C, then a scan of the
    brackets only, so no recursion and linear time. Parsers recurse on nesting, so hostile
    documents are measured before they are parsed."""
    if "[" not in text and "{" not in text:
        return 0
    depth = best = 0
    for ch in _BRACKETS.findall(skip.sub("", text)):
        if ch in "[{":
            depth += 1
            if depth > best:
                best = depth
                if best > limit:
                    return best
        else:
            depth = max(0, depth - 1)
    return best
