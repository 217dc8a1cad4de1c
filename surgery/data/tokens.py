"""Tokenize once into an on-disk cache: token ids appended to a file (uint32) with the document start
offsets beside it, read back through `numpy.memmap`. The cache key is the source's path, size and
mtime, the reading options and a fingerprint of the tokenizer files, so a grown model (same
tokenizer) reuses the tokens of its parent."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.data.sources import Source, read_pieces


FORMAT = "surgery-tokens/2"  # 2: long documents cut into 64K-character pieces (was 1M)


BATCH_PIECES = 64


BATCH_CHARS = 1 << 18  # and at most this many characters per tokenizer call: memory bounded whatever the records


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
