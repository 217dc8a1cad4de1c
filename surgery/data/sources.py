"""Text sources for training and analysis: local `.txt` files (one document per file, or split at
`separator`), JSON Lines (text in `text_field`), parquet (that column, in record batches) and HF
datasets saved or cached locally, each read in bounded pieces (long documents cut at line ends), and
the paths a data entry touches on disk."""

from __future__ import annotations

import glob as globlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from surgery.errors import PlanError, SurgeryError
from surgery.jsonio import parse_json
from surgery.plan.yamlio import resolve_path


PIECE_CHARS = 1 << 16  # text is tokenized in pieces of about this many characters (cut at line ends)


TEXT_SUFFIXES = (".txt", ".md", ".text")


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Source:
    """One input: a file (`kind` txt, jsonl, parquet) or an HF dataset (`kind` hf)."""

    kind: str
    path: str
    where: str
    config: str | None = None
    split: str | None = None
    text_field: str = "text"

    def identity(self) -> dict:
        d = {"kind": self.kind, "path": self.path, "config": self.config, "split": self.split, "field": self.text_field}
        if self.kind != "hf" or Path(self.path).exists():
            st = os.stat(self.path)
            d.update(size=st.st_size, mtime=st.st_mtime_ns)
        return d


def expand_sources(entries, base_dir: Path, text_field: str, where) -> list[Source]:
    """Files, globs and HF dataset entries -> sources, in a stable order. `where(i)` locates entry i."""
    out: list[Source] = []
    problems = []
    for i, e in enumerate(entries):
        loc = where(i)
        if not isinstance(e, str):
            out.append(
                Source(
                    "hf",
                    e.dataset if not _is_local(e.dataset, base_dir) else str(resolve_path(e.dataset, base_dir)),
                    loc,
                    e.config,
                    e.split,
                    e.text_field or text_field,
                )
            )
            continue
        pattern = str(resolve_path(e, base_dir))
        paths = sorted(globlib.glob(pattern, recursive=True)) if globlib.has_magic(e) else [pattern]
        paths = [p for p in paths if Path(p).is_file()] if globlib.has_magic(e) else paths
        if not paths:
            problems.append(
                SurgeryError(
                    f"no files match {e!r} (looked for {pattern})",
                    where=loc,
                    fix="check the pattern; paths are relative to the config file's folder",
                ).problems[0]
            )
            continue
        for p in paths:
            if not Path(p).is_file():
                problems.append(SurgeryError(f"data file not found: {p}", where=loc).problems[0])
                continue
            suffix = Path(p).suffix.lower()
            kind = (
                "txt"
                if suffix in TEXT_SUFFIXES
                else "jsonl"
                if suffix in JSONL_SUFFIXES
                else "parquet"
                if suffix in PARQUET_SUFFIXES
                else None
            )
            if kind is None:
                problems.append(
                    SurgeryError(
                        f"{p}: unknown data format {suffix or '(no suffix)'!r}",
                        where=loc,
                        fix="use .txt/.md, .jsonl/.json (one JSON object per line) or .parquet",
                    ).problems[0]
                )
                continue
            out.append(Source(kind, p, loc, text_field=text_field))
    if problems:
        raise PlanError(problems)
    return out


def data_paths(entries, base_dir: Path) -> list[Path]:
    """What data entries (files, globs, HF datasets) read on disk, for the output-folder protocol:
    each file; for a glob, every match and the folder it starts from; a dataset saved on disk. Read
    as `expand_sources` reads them (relative to `base_dir`); entries no file system can hold are
    left to it to refuse."""
    out: list[Path] = []
    for e in entries:
        text = e if isinstance(e, str) else e.dataset
        if not text or "\0" in text or len(text) > 4096:
            continue
        p = resolve_path(text, base_dir)
        if globlib.has_magic(text):
            first = next(i for i, q in enumerate(p.parts) if globlib.has_magic(q))
            out += [Path(*p.parts[:first]), *map(Path, globlib.glob(str(p), recursive=True))]
        elif isinstance(e, str) or p.exists():
            out.append(p)
    return out


def _is_local(name: str, base: Path) -> bool:
    return name.startswith((".", "/", "~")) or resolve_path(name, base).exists()


def read_pieces(src: Source, separator: str | None) -> Iterator[tuple[str, bool, bool]]:
    if src.kind == "txt":
        yield from _txt(src.path, separator)
    elif src.kind == "jsonl":
        yield from _jsonl(src)
    elif src.kind == "parquet":
        yield from _parquet(src)
    else:
        yield from _hf(src)


def _txt(path: str, separator: str | None):
    buf, first = "", True
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            block = f.read(PIECE_CHARS)
            buf += block
            if separator:
                while separator in buf:
                    doc, buf = buf.split(separator, 1)
                    if doc.strip() or not first:
                        yield doc, first, True
                    first = True
            while block and len(buf) > PIECE_CHARS:  # a long document goes on in pieces cut at line ends
                cut = buf.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
                yield buf[:cut], first, False
                buf, first = buf[cut:], False
            if not block:
                break
    if buf.strip() or not first:
        yield buf, first, True


def _jsonl(src: Source):
    yield from _texts(src, "line", _jsonl_values(src))


def _jsonl_values(src: Source):
    with open(src.path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = parse_json(line, f"{src.path}:{n}", what="the line")
            except SurgeryError as e:
                raise SurgeryError(
                    f"{e.problems[0].where}: {e.problems[0].what}", where=src.where, fix="JSON Lines files hold one JSON object per line"
                ) from None
            if not isinstance(rec, dict) or src.text_field not in rec:
                keys = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
                raise SurgeryError(
                    f"{src.path}:{n}: no field {src.text_field!r} (has: {keys})",
                    where=src.where,
                    fix="set data.text_field to the field that holds the text",
                )
            yield n, rec[src.text_field]


def _texts(src: Source, unit: str, values):
    """(text, True, True) for each value that is text; the others (a number, a list, null) are
    counted and reported, never silently dropped."""
    skipped = _Skipped(src, unit)
    for at, text in values:
        if isinstance(text, str):
            if text:
                yield from split_document(text)
        else:
            skipped.add(at, text)
    skipped.report()


def split_document(text: str) -> Iterator[tuple[str, bool, bool]]:
    """One document as (piece, first, last) pieces of at most PIECE_CHARS characters, cut at a line
    end (else a space) when there is one, so a record of megabytes is tokenized piece by piece in
    bounded memory, as .txt files are, whatever file it came from (JSONL, parquet, HF datasets)."""
    if len(text) <= PIECE_CHARS:
        yield text, True, True
        return
    start, n = 0, len(text)
    while start < n:
        end = min(n, start + PIECE_CHARS)
        if end < n:
            cut = text.rfind("\n", start, end) + 1 or text.rfind(" ", start, end) + 1
            end = cut if cut > start else end
        yield text[start:end], start == 0, end >= n
        start = end


class _Skipped:
    """Records whose text field holds no text (a number, a list, null): skipped, and said so."""

    def __init__(self, src: Source, unit: str):
        self.src, self.unit, self.count, self.first = src, unit, 0, None

    def add(self, at, value) -> None:
        self.count += 1
        if self.first is None:
            self.first = (at, type(value).__name__)

    def report(self) -> None:
        if self.count:
            at, kind = self.first
            print(
                f"note: {self.src.path}: skipped {self.count:,} record(s) whose {self.src.text_field!r} is not text "
                f"(first at {self.unit} {at}: {kind})",
                file=sys.stderr,
            )


def _parquet(src: Source):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
        cols = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: the file is not readable parquet
        raise SurgeryError(
            f"{src.path}: not a readable parquet file ({type(e).__name__}: {str(e)[:200]})",
            where=src.where,
            fix="check the file (a partial download?), or convert it to .jsonl",
        ) from None
    if src.text_field not in cols:
        raise SurgeryError(
            f"{src.path}: no column {src.text_field!r} (columns: {', '.join(cols)})",
            where=src.where,
            fix="set data.text_field to the column that holds the text",
        )
    yield from _texts(src, "row", _parquet_values(src, pf))


def _parquet_values(src: Source, pf):
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[src.text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield row, text
    except Exception as e:  # pyarrow's errors: a damaged file
        raise SurgeryError(
            f"{src.path}: reading parquet failed near row {row:,} ({type(e).__name__}: {str(e)[:200]})",
            where=src.where,
            fix="check the file (a partial download?), or convert it to .jsonl",
        ) from None


def _hf(src: Source):
    import datasets

    saved = {k: getattr(datasets.config, k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, k)}
    for k in saved:  # only what is already in the local cache
        setattr(datasets.config, k, True)
    try:
        p = Path(src.path)
        if p.is_dir() and any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(src.path)
            ds = ds[src.split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(src.path, src.config, split=src.split)
    except Exception as e:  # datasets raises many types; all mean "not available offline"
        raise SurgeryError(
            f"cannot load dataset {src.path!r} ({src.config or 'default'}/{src.split}) from the local cache: "
            f"{type(e).__name__}: {e}".splitlines()[0],
            where=src.where,
            fix="download it once with datasets.load_dataset(...) on a machine with network, or give files",
        ) from None
    finally:
        for k, v in saved.items():
            setattr(datasets.config, k, v)
    if src.text_field not in ds.column_names:
        raise SurgeryError(
            f"dataset {src.path!r} has no column {src.text_field!r} (columns: {', '.join(ds.column_names)})",
            where=src.where,
            fix="set text_field on the dataset entry or data.text_field",
        )
    yield from _texts(src, "row", ((i, rec[src.text_field]) for i, rec in enumerate(ds.select_columns([src.text_field]), 1)))
