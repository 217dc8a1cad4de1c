"""Packing: the token stream of all sources cut into `seq_len` windows. A document's first token is
never a training target of the document before it: its label is -100 (the attention still sees
the earlier text; the loss does not ask the model to guess across a boundary). `Ordered` is one
seeded order of the windows, read from any position."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgery.data.sources import Source
from surgery.data.tokens import Tokens, tokenize, tokenizer_fingerprint


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
