"""Training data: read text sources, tokenize once into an on-disk cache, pack into sequences.

Sources are local `.txt` files (one document per file, or split at `separator`), JSON Lines
(one record per line, text in `text_field`), parquet (the `text_field` column, read in record
batches) and HF datasets already in the local cache. Nothing holds the corpus in memory: text is
read in bounded pieces, token ids are appended to a cache file (uint32) with the document start
offsets beside it, and training reads sequences back through `numpy.memmap`.

The cache key is the source's path, size and mtime, the reading options and a fingerprint of the
tokenizer files, so a grown model (same tokenizer) reuses the tokens of its parent.

Packing: the token stream of all sources is cut into `seq_len` windows. A document's first token
is never a training target of the document before it: its label is -100 (the attention still
sees the earlier text; the loss does not ask the model to guess across a boundary).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from surgery.errors import PlanError, SurgeryError
from surgery.jsonio import parse_json
from surgery.plan.yamlio import resolve_path

FORMAT = "surgery-tokens/2"  # 2: long documents cut into 64K-character pieces (was 1M)
PIECE_CHARS = 1 << 16  # text is tokenized in pieces of about this many characters (cut at line ends)
BATCH_PIECES = 64
BATCH_CHARS = 1 << 18  # and at most this many characters per tokenizer call: memory bounded whatever the records
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
)


def default_cache_dir() -> Path:
    root = os.environ.get("SURGERY_CACHE")
    return Path(root) / "tokens" if root else Path.home() / ".cache" / "surgery" / "tokens"


def tokenizer_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = model_dir / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


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


# ---- reading: (text, first piece of a document, last piece of a document) ----


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


# ---- tokenizing into the cache ----


@dataclass
class Tokens:
    """One source's tokens (memory-mapped) and the offsets where its documents start."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    source: Source

    def __len__(self) -> int:
        return len(self.tokens)


def special_ids(tokenizer) -> tuple[int | None, int | None]:
    """(bos added by this tokenizer's own convention, eos appended to every document)."""
    bos = None
    if tokenizer.bos_token_id is not None:
        with_special = tokenizer("a")["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        if with_special[:1] == [tokenizer.bos_token_id] and plain[:1] != [tokenizer.bos_token_id]:
            bos = tokenizer.bos_token_id
    return bos, tokenizer.eos_token_id


def tokenize(src: Source, tokenizer, fingerprint: str, cache_dir: Path, separator: str | None, progress=None) -> Tokens:
    key = hashlib.sha256(
        json.dumps({"format": FORMAT, "src": src.identity(), "sep": separator, "tok": fingerprint}, sort_keys=True).encode()
    ).hexdigest()[:24]
    stem = cache_dir / key
    meta_path = stem.with_suffix(".json")
    if not meta_path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _build(src, tokenizer, stem, separator, progress)
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(stem.with_suffix(".tok"), dtype=np.uint32, mode="r") if meta["tokens"] else np.zeros(0, np.uint32)
    starts = np.fromfile(stem.with_suffix(".doc"), dtype=np.int64)
    return Tokens(tokens, starts, src)


def _build(src: Source, tokenizer, stem: Path, separator: str | None, progress) -> None:
    bos, eos = special_ids(tokenizer)
    if tokenizer.vocab_size + len(tokenizer.get_added_vocab()) >= 2**32:
        raise SurgeryError("tokenizer vocabulary does not fit 32-bit token ids")  # pragma: no cover
    tmp_tok, tmp_doc = stem.with_suffix(f".tok.{os.getpid()}.tmp"), stem.with_suffix(f".doc.{os.getpid()}.tmp")
    n_tok = n_doc = 0
    with open(tmp_tok, "wb") as ft, open(tmp_doc, "wb") as fd:
        batch: list[tuple[str, bool, bool]] = []

        def flush():
            nonlocal n_tok, n_doc
            ids = tokenizer([t for t, _, _ in batch], add_special_tokens=False)["input_ids"]
            starts = []
            for (_, first, last), piece in zip(batch, ids, strict=True):
                seq = ([bos] if first and bos is not None else []) + piece + ([eos] if last and eos is not None else [])
                if first:
                    starts.append(n_tok)
                    n_doc += 1
                np.asarray(seq, dtype=np.uint32).tofile(ft)
                n_tok += len(seq)
            np.asarray(starts, dtype=np.int64).tofile(fd)
            if progress is not None:
                progress(sum(len(t) for t, _, _ in batch))
            batch.clear()

        chars = 0
        for piece in read_pieces(src, separator):
            batch.append(piece)
            chars += len(piece[0])
            if len(batch) >= BATCH_PIECES or chars >= BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()
    os.replace(tmp_tok, stem.with_suffix(".tok"))
    os.replace(tmp_doc, stem.with_suffix(".doc"))
    meta = {"format": FORMAT, "source": src.identity(), "tokens": n_tok, "documents": n_doc, "bos": bos, "eos": eos}
    tmp = stem.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, stem.with_suffix(".json"))  # the meta file last: its presence means the entry is whole


# ---- packing ----


class Stream:
    """Several sources' tokens as one stream, with global document starts."""

    def __init__(self, parts: list[Tokens]):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.doc_starts = (
            np.concatenate([p.doc_starts + o for p, o in zip(self.parts, self.offsets[:-1], strict=True)])
            if self.parts
            else np.zeros(0, np.int64)
        )
        self.doc_starts.sort()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, end: int) -> np.ndarray:
        out = np.empty(end - start, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while pos < end:
            lo = pos - int(self.offsets[i])
            take = min(end - pos, len(self.parts[i]) - lo)
            out[pos - start : pos - start + take] = self.parts[i].tokens[lo : lo + take]
            pos += take
            i += 1
        return out

    def boundaries(self, start: int, end: int) -> np.ndarray:
        """Document starts strictly inside (start, end), relative to start."""
        a = np.searchsorted(self.doc_starts, start + 1, side="left")
        b = np.searchsorted(self.doc_starts, end, side="left")
        return self.doc_starts[a:b] - start


class Packed:
    """`seq_len` windows [first, first + count) of a stream, as {input_ids, labels} for a causal LM."""

    def __init__(self, stream: Stream, seq_len: int, first: int, count: int):
        self.stream, self.seq_len, self.first, self.count = stream, seq_len, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        import torch

        if not 0 <= i < self.count:
            raise IndexError(i)
        s = (self.first + i) * self.seq_len
        ids = torch.from_numpy(self.stream.slice(s, s + self.seq_len))
        labels = ids.clone()
        labels[torch.from_numpy(self.stream.boundaries(s, s + self.seq_len))] = -100
        return {"input_ids": ids, "labels": labels}


class Ordered:
    """The training order of a single stream, owned by surgery (not by the Trainer's sampler): pass
    e over the n sequences is the permutation drawn from (seed, e), and item j of a stage is global
    position `start + j` of that endless order. A stage that starts after growth continues where
    the last one stopped (fresh data, as Gstack trains the grown model), and a run from scratch with
    the same seed sees the same sequences at the same steps, so the two compare fairly."""

    def __init__(self, packed: Packed, seed: int, start: int, length: int):
        self.packed, self.seed, self.start, self.length = packed, int(seed), int(start), int(length)
        self.n = len(packed)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def position(self, j: int) -> int:
        """The sequence index (in the packed stream) at item j."""
        if not 0 <= j < self.length:
            raise IndexError(j)
        epoch, pos = divmod(self.start + int(j), self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, 0x6F7264, epoch)).permutation(self.n))
        return int(self._perm[1][pos])

    def __getitem__(self, j: int) -> dict:
        return self.packed[self.position(j)]


@dataclass
class Corpus:
    train: object  # Ordered (one stream) or Mixture (data.sources): the stage's draws, in training order
    eval: Packed | dict | None  # a mixture: {domain: its held-out Packed}
    train_tokens: int
    eval_tokens: int
    documents: int
    sources: int
    mixture: dict | None = None  # the domains, their proportions, statistics and draws (train.json records it)
    notes: list = field(default_factory=list)  # what to tell the user (a domain reused, ...)


def token_stream(
    sources: list[Source], tokenizer, model_dir: Path, cache: Path, separator: str | None, *, progress: bool = False
) -> Stream:
    """The sources' tokens as one stream, tokenizing what the cache does not hold yet."""
    fp = tokenizer_fingerprint(model_dir)
    parts = []
    for s in sources:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"tokenizing {Path(s.path).name}", unit="char", unit_scale=True, leave=False)
        parts.append(tokenize(s, tokenizer, fp, cache, separator, bar.update if bar else None))
        if bar:
            bar.close()
    return Stream(parts)


def build_corpus(
    cfg,
    tokenizer,
    model_dir: Path,
    *,
    progress: bool = False,
    sequences: int | None = None,
    start: int = 0,
    all_stats: bool = False,
) -> Corpus:
    """Tokenize (or reuse the cache for) the config's data and pack it. The training set is the
    `sequences` draws (a stage's budget; default one pass) from global position `start` of the
    run's training order: an `Ordered` single stream, or with `data.sources` a `Mixture`, whose
    held-out sets are per domain."""
    d = cfg.body.data
    cache = cfg.path(d.cache_dir) if d.cache_dir else default_cache_dir()

    def streams(entries, where):
        srcs = expand_sources(entries, cfg.base_dir, d.text_field, where)
        return token_stream(srcs, tokenizer, model_dir, cache, d.separator, progress=progress)

    from surgery.train.config import eval_token_cap

    if d.sources:
        return _mixture_corpus(cfg, streams, sequences, start, all_stats, limit=eval_token_cap(d, model_dir))
    train = streams(d.files, lambda i: cfg.where("data", "files", i))
    ev = streams(d.eval_files, lambda i: cfg.where("data", "eval_files", i)) if d.eval_files else None
    limit = eval_token_cap(d, model_dir)
    tr, held, n_train, n_eval = _split(d, train, ev, cfg.where("data", "files"), cfg.where("data", "eval_files"), limit=limit)
    order = Ordered(tr, cfg.body.seed, start, sequences or n_train)
    return Corpus(order, held, n_train * d.seq_len, n_eval * d.seq_len, len(train.doc_starts), len(train.parts))


def _say_capped(what: str, kept: int, available: int, default: bool) -> None:
    """The held-out set was cut: said once, with the setting that decides it."""
    why = "the default on this machine; set data.eval_max_tokens to change it" if default else "data.eval_max_tokens"
    print(f"note: held-out text for {what}: {kept:,} of {available:,} tokens are evaluated ({why})", file=sys.stderr)


def _split(d, train: Stream, ev: Stream | None, where_files: str, where_eval: str, what: str = "the training data", limit: int = 0):
    """(training Packed, held-out Packed or None, their sequence counts): the eval files' text, or
    the last `eval_fraction` of the training sequences (capped at eval_max_tokens)."""
    from surgery.train.config import eval_token_cap

    L = d.seq_len
    n = len(train) // L
    limit = limit or eval_token_cap(d)
    cap = max(1, limit // L)
    if ev is not None:
        n_eval_seq = min(cap, len(ev) // L)
        if len(ev) // L > cap:
            _say_capped(what, n_eval_seq * L, len(ev), d.eval_max_tokens is None)
        if n_eval_seq == 0:
            raise PlanError(
                f"the eval files hold {len(ev):,} tokens, less than one sequence of {L}",
                where=where_eval,
                fix="add held-out text or lower data.seq_len",
            )
        held, n_train = Packed(ev, L, 0, n_eval_seq), n
    else:
        n_eval_seq = min(cap, max(1, round(n * d.eval_fraction))) if d.eval_fraction > 0 else 0
        if d.eval_fraction > 0 and round(n * d.eval_fraction) > cap:
            _say_capped(what, n_eval_seq * L, round(n * d.eval_fraction) * L, d.eval_max_tokens is None)
        n_train = n - n_eval_seq
        held = Packed(train, L, n_train, n_eval_seq) if n_eval_seq else None
    if n_train < 1:
        raise PlanError(
            f"{what} holds {len(train):,} tokens: not enough for one training sequence of {L} tokens"
            + (f" plus {n_eval_seq} held out" if n_eval_seq else ""),
            where=where_files,
            fix="add text, lower data.seq_len, or set data.eval_fraction: 0",
        )
    return Packed(train, L, 0, n_train), held, n_train, n_eval_seq


def _mixture_corpus(cfg, streams, sequences: int | None, start: int = 0, all_stats: bool = False, limit: int = 0) -> Corpus:
    from surgery.train.mixture import ENTROPY_RULES, Mixture, proportions, token_statistics

    d = cfg.body.data
    L = d.seq_len
    parts, helds, rows = [], {}, []
    documents = n_sources = eval_seq = 0
    for i, src in enumerate(d.sources):
        here = ("data", "sources", i)
        train = streams(src.files, lambda k, here=here: cfg.where(*here, "files", k))
        ev = streams(src.eval_files, lambda k, here=here: cfg.where(*here, "eval_files", k)) if src.eval_files else None
        tr, held, n_train, n_eval = _split(
            d, train, ev, cfg.where(*here, "files"), cfg.where(*here, "eval_files"), what=f"source {src.name!r}", limit=limit
        )
        parts.append(tr)
        if held is not None:
            helds[src.name] = held
        documents, n_sources, eval_seq = documents + len(train.doc_starts), n_sources + len(train.parts), eval_seq + n_eval
        row = {"name": src.name, "train_sequences": n_train, "eval_sequences": n_eval, "weight": src.weight}
        if all_stats or d.weights in ENTROPY_RULES:
            row["stats"] = token_statistics(train, n_train * L, d.entropy_max_tokens)
        rows.append(row)
    p = proportions(
        d.weights, [r["weight"] for r in rows], [r["train_sequences"] for r in rows], [r.get("stats") for r in rows], d.entropy_base
    )
    length = sequences or sum(r["train_sequences"] for r in rows)
    mix = Mixture(parts, [r["name"] for r in rows], p, length, cfg.body.seed, start=start)
    notes, problems = [], []
    for i, (r, q, k, total) in enumerate(zip(rows, p, mix.draws(), mix.drawn_by_end(), strict=True)):
        r.update(proportion=q, draws=k, passes=total / r["train_sequences"])
        if "stats" in r:
            r["stats"] = r["stats"].as_dict()
        if total > r["train_sequences"]:  # what the run has drawn by this stage's end, earlier stages included
            msg = (
                f"source {r['name']!r} holds {r['train_sequences']:,} training sequences, and its share "
                f"({q:.1%} of {start + length:,}) draws {total:,}: {total / r['train_sequences']:.2f} passes over it"
            )
            if d.exhausted == "stop":
                problems.append(PlanError(msg, where=cfg.where("data", "sources", i), fix=_EXHAUSTED_FIX).problems[0])
            else:
                notes.append(msg + " (data.exhausted: repeat)")
    if problems:
        raise PlanError(problems)
    info = {"weights": d.weights, "seed": cfg.body.seed, "start": start, "sequences": length, "domains": rows}
    return Corpus(
        mix, helds or None, sum(r["train_sequences"] for r in rows) * L, eval_seq * L, documents, n_sources, mixture=info, notes=notes
    )


_EXHAUSTED_FIX = "add text to it, lower its weight or the budget, or set data.exhausted: repeat to reuse its sequences"
