"""A small offline corpus for demos and tests: the Python documentation topics that ship with
every CPython (`pydoc_data.topics`), one JSON Lines record per topic (~79 documents, ~465K characters)."""

from __future__ import annotations

import json
from pathlib import Path


def write_pydoc_corpus(path: str | Path, *, eval_path: str | Path | None = None, eval_every: int = 10) -> Path:
    """Write the topics to `path`; with `eval_path`, every `eval_every`-th topic goes there instead."""
    from pydoc_data.topics import topics

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev = open(eval_path, "w") if eval_path else None
    with open(path, "w") as f:
        for i, (name, text) in enumerate(sorted(topics.items())):
            rec = json.dumps({"id": name, "text": text}) + "\n"
            (ev if ev and i % eval_every == eval_every - 1 else f).write(rec)
    if ev:
        ev.close()
    return path
