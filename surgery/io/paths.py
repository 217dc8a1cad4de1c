"""Paths written in plans and configs."""

from __future__ import annotations

from pathlib import Path

from surgery.errors import PlanError


def resolve_path(p: str | Path, base: Path) -> Path:
    """A path written in a plan or config: `~` expanded; a relative one is taken from `base` (the file's folder)."""
    if "\0" in str(p):
        raise PlanError(f"path {str(p)[:80]!r} contains a NUL byte", fix="write a plain path")
    try:
        q = Path(p).expanduser()
    except RuntimeError:  # ~nouser/...
        raise PlanError(f"cannot expand {str(p)[:80]!r}: no such user", fix="write the path out in full") from None
    return q if q.is_absolute() else base / q
