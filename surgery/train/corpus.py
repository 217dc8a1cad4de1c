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


def write_stdlib_corpus(
    path: str | Path, *, eval_path: str | Path | None = None, eval_every: int = 10, max_chars: int = 600_000, every_file: bool = False
) -> Path:
    """A second domain: the sources of the standard library's pure-Python modules (this Python's own
    files, in sorted order), one JSON Lines record per module, up to `max_chars` characters in all;
    with `eval_path`, every `eval_every`-th module goes there instead. `every_file`: the packages'
    modules too, not only the top level (~13M characters; tests and site-packages left out)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev = open(eval_path, "w") if eval_path else None
    total = 0
    with open(path, "w") as f:
        files = root.rglob("*.py") if every_file else root.glob("*.py")
        files = [p for p in files if not {"site-packages", "test", "tests", "idlelib"} & set(p.relative_to(root).parts)]
        for i, src in enumerate(sorted(files)):
            text = src.read_text(errors="replace")
            if total + len(text) > max_chars:
                continue
            total += len(text)
            rec = json.dumps({"id": src.name, "text": text}) + "\n"
            (ev if ev and i % eval_every == eval_every - 1 else f).write(rec)
    if ev:
        ev.close()
    return path


API_MODULES = (
    "abc argparse array base64 bisect calendar collections contextlib copy csv dataclasses datetime decimal difflib "
    "enum fractions functools glob gzip hashlib heapq hmac html itertools json logging math operator os pathlib pickle "
    "pprint queue random re secrets shlex shutil socket statistics string struct subprocess tempfile textwrap threading "
    "time timeit typing unittest urllib uuid warnings weakref zipfile zlib"
).split()


def write_api_corpus(path: str | Path, *, eval_path: str | Path | None = None, eval_every: int = 10) -> Path:
    """A third domain: `help()` pages (pydoc's plain-text API reference) of common standard-library
    modules, one JSON Lines record per module; with `eval_path`, every `eval_every`-th goes there."""
    import importlib
    import pydoc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev = open(eval_path, "w") if eval_path else None
    with open(path, "w") as f:
        for i, name in enumerate(API_MODULES):
            try:
                text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
            except Exception:  # a module this Python lacks
                continue
            rec = json.dumps({"id": name, "text": text}) + "\n"
            (ev if ev and i % eval_every == eval_every - 1 else f).write(rec)
    if ev:
        ev.close()
    return path
