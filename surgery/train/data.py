"""A run's corpus: its training order and held-out text, assembled from the config's data entries
(surgery.data reads, tokenizes and packs them; this module applies the run's budget, held-out caps
and mixture)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


from surgery.errors import PlanError
from surgery.data.mixing import Mixture
from surgery.data.packing import Ordered, Packed, Stream, token_stream
from surgery.data.sources import expand_sources
from surgery.data.tokens import default_cache_dir


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
    from surgery.data.mixing import ENTROPY_RULES, proportions, token_statistics

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


# the names this module had before the data readers moved to surgery.data (issue 24), for callers
from surgery.data.sources import (  # noqa: E402, F401
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    PIECE_CHARS,
    TEXT_SUFFIXES,
    Source,
    data_paths,
    read_pieces,
    split_document,
)
from surgery.data.tokens import FORMAT, TOKENIZER_FILES, Tokens, special_ids, tokenize, tokenizer_fingerprint  # noqa: E402, F401
