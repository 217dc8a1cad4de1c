"""Sampling a mixture of domains and measuring them (BiMix, Ge et al. 2024, arXiv 2405.14908;
docs/mixtures.md): `Mixture`, the training stream of a mixture, a pure function of (seed, position):
positions come in blocks of 4,096 sequences, each block holds exactly round(p_d * 4096) sequences of
domain d (largest remainders), in an order drawn from (seed, block); the k-th draw of domain d is
sequence perm_{d,e}[k mod n_d] of that domain, e = k div n_d its pass over it, so the proportions
hold to 1/4096 in every block and a resumed run sees the same sequences. `token_statistics`:
unigram and bigram entropies of a domain (the paper's training-free proxies); `proportions`: given
weights, uniform, sizes, or a softmax of an entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


BLOCK = 4096


def block_counts(p: list[float], block: int = BLOCK) -> np.ndarray:
    """Sequences of each domain in a block of `block`: round(p * block) by largest remainders (they sum to `block`)."""
    x = np.asarray(p, dtype=np.float64) * block
    n = np.floor(x).astype(np.int64)
    short = block - int(n.sum())
    if short:
        order = np.argsort(-(x - n), kind="stable")
        n[order[:short]] += 1
    return n


class Mixture:
    """`length` sequences drawn from `parts` (one dataset of packed sequences per domain) in
    proportions `p`; item j is a pure function of (seed, j)."""

    def __init__(self, parts: list, names: list[str], p: list[float], length: int, seed: int, start: int = 0):
        self.parts, self.names, self.p, self.length, self.seed = parts, names, list(p), int(length), int(seed)
        self.start = int(start)  # item j is position start + j of the run's stream (a stage after growth continues it)
        self.sizes = [len(x) for x in parts]
        for name, n, q in zip(names, self.sizes, p, strict=True):
            if q > 0 and n == 0:
                raise ValueError(f"domain {name} has no training sequence")
        self.counts = block_counts(p)
        self._blocks: dict = {}  # small caches (plain dicts: the dataset pickles into dataloader workers)
        self._perms: dict = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[b] = self._make_block(b)
        return self._blocks[b]

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        if (d, epoch) not in self._perms:
            if len(self._perms) >= 16:
                self._perms.pop(next(iter(self._perms)))
            self._perms[(d, epoch)] = self._make_perm(d, epoch)
        return self._perms[(d, epoch)]

    def __len__(self) -> int:
        return self.length

    def _make_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.repeat(np.arange(len(self.parts)), self.counts)
        np.random.default_rng((self.seed, 0x6D6978, b)).shuffle(order)
        rank = np.empty(BLOCK, dtype=np.int64)  # how many of its domain came earlier in the block
        for d in range(len(self.parts)):
            at = np.flatnonzero(order == d)
            rank[at] = np.arange(len(at))
        return order, rank

    def _make_perm(self, d: int, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, 0x706572, d, epoch)).permutation(self.sizes[d])

    def locate(self, j: int) -> tuple[int, int]:
        """(domain, sequence index in it) of stream position j."""
        if not 0 <= j < self.length:
            raise IndexError(j)
        b, r = divmod(self.start + int(j), BLOCK)
        order, rank = self._block(b)
        d = int(order[r])
        k = b * int(self.counts[d]) + int(rank[r])
        epoch, pos = divmod(k, self.sizes[d])
        return d, int(self._perm(d, epoch)[pos])

    def __getitem__(self, j: int) -> dict:
        d, i = self.locate(j)
        return self.parts[d][i]

    def _upto(self, g: int) -> np.ndarray:
        """Draws of each domain in the run's positions [0, g)."""
        full, rest = divmod(g, BLOCK)
        out = self.counts * full
        if rest:
            order, _ = self._block(full)
            out = out + np.bincount(order[:rest], minlength=len(self.parts))
        return out

    def draws(self) -> list[int]:
        """How many sequences of each domain this stage takes (positions start .. start + length)."""
        return [int(x) for x in self._upto(self.start + self.length) - self._upto(self.start)]

    def drawn_by_end(self) -> list[int]:
        """Draws of each domain over the whole run up to this stage's end (what exhausts a domain)."""
        return [int(x) for x in self._upto(self.start + self.length)]


@dataclass
class TokenStats:
    tokens: int  # tokens read
    distinct: int  # distinct tokens among them
    marginal_entropy: float  # H(X) = -sum_x p(x) ln p(x), nats
    joint_entropy: float  # H(X_t, X_t+1) over adjacent pairs inside documents
    conditional_entropy: float  # H(X_t+1 | X_t) = H(X_t, X_t+1) - H(X_t)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _entropy(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


class ArrayStream:
    """A token array and its document starts, read like a training Stream."""

    def __init__(self, tokens, doc_starts=()):
        self.tokens, self.doc_starts = np.asarray(tokens), np.asarray(doc_starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.tokens[a:b]


def token_statistics(stream, n_tokens: int | None = None, max_tokens: int = 10_000_000, window: int = 65536) -> TokenStats:
    """Entropies of the first `n_tokens` of a token stream (the training split), read in at most
    `max_tokens` tokens: evenly spaced windows of `window`. Pairs whose second token starts a
    document are not counted (they cross a document boundary)."""
    n = len(stream) if n_tokens is None else min(n_tokens, len(stream))
    if n == 0:
        return TokenStats(0, 0, 0.0, 0.0, 0.0)
    w = min(window, n, max_tokens)
    k = max(1, min(n, max_tokens) // w)
    starts = sorted({int(x) for x in np.linspace(0, n - w, k)})
    doc_starts = np.asarray(stream.doc_starts, dtype=np.int64)
    uni, first, second = [], [], []
    for s in starts:
        x = np.asarray(stream.slice(s, s + w), dtype=np.int64)
        keep = np.ones(len(x) - 1, dtype=bool)  # the pair (x[i], x[i+1]) unless x[i+1] starts a document
        inside = doc_starts[(doc_starts > s) & (doc_starts < s + len(x))] - s
        keep[inside - 1] = False
        uni.append(x)
        first.append(x[:-1][keep])
        second.append(x[1:][keep])
    allx, a, b = np.concatenate(uni), np.concatenate(first), np.concatenate(second)
    _, ucount = np.unique(allx, return_counts=True)
    marginal = _entropy(ucount)
    if len(a) == 0:
        return TokenStats(len(allx), len(ucount), marginal, 0.0, 0.0)
    _, pcount = np.unique(a * (int(allx.max()) + 1) + b, return_counts=True)
    _, acount = np.unique(a, return_counts=True)
    joint = _entropy(pcount)
    return TokenStats(len(allx), len(ucount), marginal, joint, joint - _entropy(acount))


ENTROPY_RULES = {"entropy": "conditional_entropy", "conditional-entropy": "conditional_entropy"}
ENTROPY_RULES.update({"joint-entropy": "joint_entropy", "marginal-entropy": "marginal_entropy"})


def proportions(
    rule: str, weights: list[float | None], tokens: list[int], stats: list[TokenStats] | None = None, base: str = "e"
) -> list[float]:
    """The domains' sampling proportions (they sum to 1) under `rule` (data.weights). Entropies are
    in nats (`base` "e", the default) or bits (`base` "2", data.entropy_base): the softmax differs."""
    if rule == "given":
        w = np.asarray(weights, dtype=np.float64)
    elif rule == "uniform":
        w = np.ones(len(tokens))
    elif rule == "tokens":
        w = np.asarray(tokens, dtype=np.float64)
    elif rule in ENTROPY_RULES:
        h = np.asarray([getattr(s, ENTROPY_RULES[rule]) for s in stats], dtype=np.float64)
        if base == "2":
            h = h / math.log(2)  # entropies in bits: the same softmax at temperature ln 2 (sharper)
        w = np.exp(h - h.max())  # softmax of the entropies (nats unless base 2)
    else:
        raise ValueError(f"unknown weights rule {rule!r}")
    return [float(x) for x in w / w.sum()]
