"""Paths written in plans and configs."""

from __future__ import annotations

from pathlib import Path

from surgery.errors import PlanError


def resolve_path(p: str | Path, base: Path, where: str | None = None) -> Path:
    """A path written in a plan or config: `~` expanded; a relative one is taken from `base` (the file's folder).
    A path no file system can hold (a NUL byte, a name over 255 bytes, over 4096 bytes in all) is a located error."""
    if "\0" in str(p):
        raise PlanError(f"path {str(p)[:80]!r} contains a NUL byte", where=where, fix="write a plain path")
    longest = max((len(part.encode(errors="replace")) for part in Path(str(p)).parts), default=0)
    if longest > 255 or len(str(p).encode(errors="replace")) > 4096:
        raise PlanError(
            f"path {str(p)[:60]!r}... is {len(str(p))} characters (a name of {longest} bytes): longer than a file system allows",
            where=where,
            fix="give the real path (names up to 255 bytes, 4096 in all)",
        )
    try:
        q = Path(p).expanduser()
    except RuntimeError:  # ~nouser/...
        raise PlanError(f"cannot expand {str(p)[:80]!r}: no such user", where=where, fix="write the path out in full") from None
    return q if q.is_absolute() else base / q
