"""Data mixtures for continued pretraining: domains sampled by weight, BiMix's entropy proxies, and
its bivariate mixing law (Ge et al. 2024, "BiMix: A Bivariate Data Mixing Law for Language Model
Pretraining", arXiv 2405.14908). docs/mixtures.md has the equations and what was measured.

- `Mixture`: the training stream of a mixture, a pure function of (seed, position): positions come
  in blocks of 4,096 sequences, each block holds exactly round(p_d * 4096) sequences of domain d
  (largest remainders), in an order drawn from (seed, block); the k-th draw of domain d is
  sequence perm_{d,e}[k mod n_d] of that domain, e = k div n_d its pass over the domain. So the
  proportions hold to 1/4096 in every block, any position is found in O(1) without a table of the
  whole stream, and a resumed run sees the same sequences.
- `token_statistics`: unigram and bigram counts of a domain's tokens (evenly spaced windows, at most
  `max_tokens`), and the entropies the paper uses as training-free proxies.
- `proportions`: given weights, uniform, sizes, or a softmax of an entropy.
- `fit_law` / `optimal_proportions`: L_i(r_i, s) = A_i / r_i^alpha_i * (B_i / s^beta_i + C_i), fitted
  per domain, and the proportions minimising the weighted sum of the predicted losses at s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK = 4096


# ---- the stream ------------------------------------------------------------------------------------


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


# ---- entropy proxies -------------------------------------------------------------------------------


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


# ---- proportions -----------------------------------------------------------------------------------

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


def weighted_loss(by_domain: dict, weights: dict) -> float:
    """The mixture's held-out loss: the domains' losses weighted by their proportions (a plain
    mean when every weight is 0)."""
    w = {k: weights.get(k, 0.0) for k in by_domain}
    total = sum(w.values())
    if total <= 0:
        return sum(by_domain.values()) / len(by_domain)
    return sum(by_domain[k] * w[k] for k in by_domain) / total


# ---- BiMix's law -----------------------------------------------------------------------------------


@dataclass
class Law:
    """L(r, s) = A / r^alpha * (B / s^beta + C) for one domain. Only A*B and A*C are identifiable
    from losses, so A is fixed to 1 and B, C carry it."""

    alpha: float
    B: float
    beta: float
    C: float
    A: float = 1.0

    def __call__(self, r, s):
        r, s = np.asarray(r, dtype=np.float64), np.asarray(s, dtype=np.float64)
        return self.A / r**self.alpha * (self.B / s**self.beta + self.C)

    def as_dict(self) -> dict:
        return {"A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta, "C": self.C}


def fit_law(r, s, loss, *, iters: int = 300) -> Law:
    """Least squares on log L (relative errors) over points (r_k, s_k, L_k), from several starts."""
    import torch

    r_, s_, y = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (r, s, loss))
    if len(y) < 4:
        raise ValueError(f"{len(y)} points; the law has 4 free coefficients, so at least 4 are needed")
    if len(torch.unique(r_)) < 2:
        raise ValueError("every point has the same proportion, so the exponent of r cannot be fitted")
    ly, lr, ls = y.log(), r_.log(), s_.log()
    best = None
    floor = float(y.min())
    for beta0 in (0.1, 0.3, 0.6, 1.0):
        for c_frac in (0.5, 0.9):
            p = torch.tensor(
                [0.05, math.log(max(1e-6, floor * (1 - c_frac)) * float(s_.min()) ** beta0), math.log(beta0), math.log(floor * c_frac)],
                dtype=torch.float64,
                requires_grad=True,
            )
            opt = torch.optim.LBFGS([p], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)

            def closure(p=p, opt=opt):
                opt.zero_grad()
                pred = -p[0] * lr + torch.logaddexp(p[1] - p[2].exp() * ls, p[3])
                loss = ((pred - ly) ** 2).mean()
                loss.backward()
                return loss

            try:
                opt.step(closure)
            except RuntimeError:
                continue
            with torch.no_grad():
                err = float(((-p[0] * lr + torch.logaddexp(p[1] - p[2].exp() * ls, p[3]) - ly) ** 2).mean())
            if math.isfinite(err) and (best is None or err < best[0]):
                best = (err, p.detach().clone())
    if best is None:
        raise ValueError("the fit did not converge")
    a, lb, lbeta, lc = (float(x) for x in best[1])
    return Law(alpha=a, B=math.exp(lb), beta=math.exp(lbeta), C=math.exp(lc))


def fit_quality(law: Law, r, s, loss) -> dict:
    """How well `law` predicts the points: R^2 on a log scale (BiMix's per-domain measure, Tables 1-2),
    R^2 on the losses themselves, and the mean relative error."""
    y = np.asarray(loss, dtype=np.float64)
    pred = law(r, s)

    def r2(a, b) -> float:
        ss_tot = float(((a - a.mean()) ** 2).sum())
        return 1 - float(((a - b) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")

    return {
        "points": len(y),
        "r2_log": r2(np.log(y), np.log(pred)) if len(y) else float("nan"),
        "r2": r2(y, pred) if len(y) else float("nan"),
        "mean_relative_error": float((np.abs(pred - y) / y).mean()) if len(y) else float("nan"),
    }


def optimal_proportions(laws: list[Law], steps: float, importance: list[float] | None = None, min_share: float = 0.0) -> list[float]:
    """argmin over the simplex of sum_i w_i L_i(r_i, steps), each r_i >= min_share. With K_i = A_i
    (B_i / s^beta_i + C_i), stationarity gives alpha_i w_i K_i r_i^-(alpha_i + 1) = lambda, so r_i =
    max(min_share, (alpha_i w_i K_i / lambda)^(1 / (alpha_i + 1))); lambda is found by bisection so
    that the r_i sum to 1. A domain whose loss does not fall with its share (alpha_i <= 0) gets
    min_share."""
    if not 0 <= min_share * len(laws) <= 1:
        raise ValueError(f"min_share {min_share} x {len(laws)} domains exceeds 1")
    w = importance or [1.0] * len(laws)
    K = [wi * law.A * (law.B / steps**law.beta + law.C) for law, wi in zip(laws, w, strict=True)]

    def shares(log_lam: float) -> list[float]:
        return [
            max(min_share, math.exp((math.log(law.alpha * k) - log_lam) / (law.alpha + 1)) if law.alpha > 0 and k > 0 else 0.0)
            for law, k in zip(laws, K, strict=True)
        ]

    if not any(law.alpha > 0 for law in laws) or min_share * len(laws) == 1:
        return [1.0 / len(laws)] * len(laws)
    lo, hi = -200.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(shares(mid)) > 1:
            lo = mid
        else:
            hi = mid
    r = shares((lo + hi) / 2)
    total = sum(r)
    return [x / total for x in r]


# ---- `surgery mix CONFIG`: the proportions and the statistics behind them ------------------------


def describe(config, *, progress: bool = False) -> dict:
    """Every domain of a training config's `data.sources`: sizes, token statistics, and the
    proportions each rule gives (the configured one marked), without training."""
    import transformers

    from surgery.errors import PlanError
    from surgery.io.checkpoint import resolve_ref
    from surgery.train.config import WEIGHT_RULES, Config, default_seq_len, load_config, run_sequences
    from surgery.train.data import build_corpus
    from surgery.train.loadable import check_loadable

    cfg = config if isinstance(config, Config) else load_config(config)
    d = cfg.body.data
    if not d.sources:
        raise PlanError("this config has no `data.sources:` (a mixture of domains) to describe", where=cfg.where("data"))
    model_dir = resolve_ref(cfg.body.model, cfg.base_dir, where=cfg.where("model"))
    check_loadable(model_dir, cfg.where("model"))
    transformers.utils.logging.set_verbosity_error()
    if d.seq_len is None:  # as `train` resolves it
        ctx = getattr(transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "max_position_embeddings", None)
        cfg.body = cfg.body.model_copy(update={"data": d.model_copy(update={"seq_len": default_seq_len(ctx)})})
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    # the run's own budget, as `train` draws it: a domain short of its share is judged against that
    corpus = build_corpus(cfg, tok, model_dir, sequences=run_sequences(cfg.body), progress=progress, all_stats=True)
    rows = corpus.mixture["domains"]
    stats = [TokenStats(**r["stats"]) for r in rows]
    seqs = [r["train_sequences"] for r in rows]
    rules = {}
    for rule in WEIGHT_RULES:
        if rule == "given" and any(r["weight"] is None for r in rows):
            continue
        shares = proportions(rule, [r["weight"] for r in rows], seqs, stats, d.entropy_base)
        rules[rule] = dict(zip([r["name"] for r in rows], shares, strict=True))
    return {"config": str(cfg.source), "weights": d.weights, "seq_len": cfg.body.data.seq_len, "domains": rows, "proportions": rules}


def describe_text(doc: dict) -> str:
    rows = doc["domains"]
    lines = [
        f"{doc['config']}: {len(rows)} domains, sequences of {doc['seq_len']} tokens; data.weights: {doc['weights']}",
        "",
        "domain        train seqs  eval seqs  tokens read  distinct  H(X) nats  H(X,X') nats  H(X'|X) nats",
    ]
    for r in rows:
        s = r["stats"]
        lines.append(
            f"{r['name']:<12} {r['train_sequences']:>11,} {r['eval_sequences']:>10,} {s['tokens']:>12,} {s['distinct']:>9,}"
            f" {s['marginal_entropy']:>10.4f} {s['joint_entropy']:>13.4f} {s['conditional_entropy']:>13.4f}"
        )
    names = [r["name"] for r in rows]
    lines += ["", "proportions by rule (* = the config's):", f"{'rule':<20}" + "".join(f"{n:>12}" for n in names)]
    for rule, p in doc["proportions"].items():
        mark = "*" if rule == doc["weights"] else " "
        lines.append(f"{mark}{rule:<19}" + "".join(f"{p[n]:>12.4f}" for n in names))
    return "\n".join(lines)


# ---- `surgery mix fit RUN...`: BiMix fitted to proxy runs ----------------------------------------


def read_run(folder) -> dict:
    """A finished `surgery train` run of a mixture: its proportions, sources and per-domain held-out
    curves [(step, loss)]."""
    from pathlib import Path

    from surgery.errors import PlanError
    from surgery.jsonio import read_json

    folder = Path(folder)
    tj, mj = folder / "train.json", folder / "metrics.jsonl"
    if not tj.is_file() or not mj.is_file():
        raise PlanError(f"{folder} is not a finished `surgery train` run (no train.json and metrics.jsonl)", where=str(folder))
    summary = read_json(tj, error=PlanError)
    mix = summary.get("mixture") if isinstance(summary, dict) else None
    if not mix:
        raise PlanError(
            f"{folder} was not trained on a mixture (train.json has no `mixture`)", where=str(tj), fix="fit runs with data.sources"
        )
    c = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    data = c.get("data") if isinstance(c.get("data"), dict) else {}
    if "data" in c and not isinstance(c["data"], dict):
        raise PlanError("train.json's config.data is not a mapping", where=str(tj), fix="fit runs written by `surgery train`")
    sources = {s["name"]: s for s in data.get("sources") or [] if isinstance(s, dict) and isinstance(s.get("name"), str)}
    domains = mix.get("domains") if isinstance(mix, dict) else None
    if not isinstance(domains, list) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and _finite(r.get("proportion")) and 0 <= r["proportion"] <= 1
        for r in domains
    ):
        raise PlanError("train.json's mixture.domains is not a list of {name, proportion}", where=str(tj))
    curves: dict = {r["name"]: {} for r in domains}
    from surgery.train.plot import read_metrics

    for rec in read_metrics(mj):
        for name, loss in (rec.get("eval_loss_by_domain") or {}).items():
            if name in curves and rec.get("step", 0) > 0 and math.isfinite(loss) and loss > 0:
                curves[name][int(rec["step"])] = float(loss)
    return {
        "path": str(folder),
        "proportions": {r["name"]: r["proportion"] for r in domains},
        "sources": sources,
        "tokens_per_step": _tokens_per_step(c, data, summary) or 0,
        "curves": {k: sorted(v.items()) for k, v in curves.items()},
    }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tokens_per_step(c: dict, data: dict, summary: dict):
    from surgery.jsonio import bounded_number

    parts = (c.get("micro_batch"), c.get("grad_accum", 1), data.get("seq_len"), summary.get("world_size", 1))
    if not all(bounded_number(x, lo=1, hi=1 << 24, integer=True) for x in parts):
        return None  # unknown (or absurd): only runs that record a usable one are compared
    return parts[0] * parts[1] * parts[2] * parts[3]


def fit_runs(
    folders, *, steps: int | None = None, holdout: float | str = "final", importance: dict | None = None, min_share: float = 0.0
) -> dict:
    """Fit L_i(r_i, s) per domain to several proxy runs' held-out curves. Held out of the fit:
    each run's final evaluation (`holdout="final"`, as BiMix evaluates its law: fitted on the earlier
    steps, judged on the final one), or its last `holdout` fraction of evaluations. Reported per
    domain, on the points fitted and on those held out: R^2 on a log scale (the paper's measure),
    R^2 on the losses and the mean relative error (the held-out one is the extrapolation error in
    s). Then the proportions minimising the (importance-weighted) sum of the predicted losses at
    `steps` (default: the longest run's). `min_share` (default 0, as in the paper) keeps every
    domain at least that share."""
    from surgery.errors import PlanError

    runs = [read_run(f) for f in folders]
    names = list(runs[0]["proportions"])
    if min_share * len(names) > 1:
        raise PlanError(f"--min-share {min_share} for {len(names)} domains adds up to more than 1", fix=f"use at most {1 / len(names):.3f}")
    for run in runs[1:]:
        if list(run["proportions"]) != names:
            raise PlanError(
                f"{run['path']} mixes {list(run['proportions'])}, not {names}", where=run["path"], fix="fit runs over the same domains"
            )
        if run["tokens_per_step"] != runs[0]["tokens_per_step"]:
            raise PlanError(
                f"{run['path']} takes {run['tokens_per_step']:,} tokens a step, {runs[0]['path']} {runs[0]['tokens_per_step']:,}: "
                "the law's s is a step count, so the runs must share micro_batch x grad_accum x seq_len",
                where=run["path"],
            )
    if len({tuple(round(x, 9) for x in r["proportions"].values()) for r in runs}) < 2:
        raise PlanError(
            "the runs all use the same proportions; the law's exponent of r needs at least two mixtures", fix="add a run with other weights"
        )
    out = {"runs": [r["path"] for r in runs], "domains": {}}
    laws = []
    for name in names:
        fit_pts, held_pts = [], []
        for run in runs:
            r = run["proportions"][name]
            pts = run["curves"][name]
            if r <= 0 or not pts:
                continue
            if holdout == "final":
                cut = len(pts) - 1 if len(pts) > 2 else len(pts)
            else:
                cut = len(pts) - int(round(len(pts) * holdout)) if len(pts) > 2 else len(pts)
            fit_pts += [(r, s, y) for s, y in pts[:cut]]
            held_pts += [(r, s, y) for s, y in pts[cut:]]
        if len(fit_pts) < 4:
            raise PlanError(
                f"domain {name!r}: {len(fit_pts)} held-out points to fit (4 at least)", fix="evaluate more often (eval_every) or add runs"
            )
        try:
            law = fit_law(*zip(*fit_pts, strict=True))
        except ValueError as e:
            raise PlanError(f"domain {name!r}: {e}") from None
        laws.append(law)
        out["domains"][name] = {
            "law": law.as_dict(),
            "fit": fit_quality(law, *zip(*fit_pts, strict=True)),
            "held_out": fit_quality(law, *zip(*held_pts, strict=True)) if held_pts else None,
        }
    S = steps or max(s for run in runs for c in run["curves"].values() for s, _ in c[-1:])
    w = [float((importance or {}).get(n, 1.0)) for n in names]
    best = optimal_proportions(laws, S, w, min_share)
    out.update(
        holdout=holdout,
        min_share=min_share,
        steps=S,
        proportions=dict(zip(names, best, strict=True)),
        predicted={n: float(law(max(r, 1e-12), S)) for n, law, r in zip(names, laws, best, strict=True)},
        sources={n: runs[0]["sources"].get(n, {"name": n}) for n in names},
    )
    out["predicted_average"] = sum(w_ * out["predicted"][n] for n, w_ in zip(names, w, strict=True)) / sum(w)
    return out


def fit_text(doc: dict) -> str:
    import json

    held_what = "each run's final step" if doc.get("holdout", "final") == "final" else f"each run's last {doc['holdout']:.0%} of steps"
    lines = [
        f"BiMix fitted to {len(doc['runs'])} runs: L_i(r, s) = A_i / r^alpha_i * (B_i / s^beta_i + C_i), A_i = 1; held out: {held_what}",
        "",
        "domain        alpha      B         beta     C     R2 log fit  R2 fit  | held out: R2 log   R2   mean rel. err",
    ]
    for name, d in doc["domains"].items():
        law, f, h = d["law"], d["fit"], d["held_out"]
        held = f"{h['r2_log']:>10.4f} {h['r2']:>7.4f}  {h['mean_relative_error']:>10.3%}" if h else f"{'-':>10} {'-':>7}  {'-':>10}"
        lines.append(
            f"{name:<12} {law['alpha']:>7.4f} {law['B']:>9.4f} {law['beta']:>8.4f} {law['C']:>8.4f} {f['r2_log']:>10.4f} "
            f"{f['r2']:>7.4f}  | {held}"
        )
    lines += [
        "",
        f"proportions minimising the predicted average held-out loss at {doc['steps']:,} steps (predicted {doc['predicted_average']:.4f}):",
        "data:",
        "  sources:",
    ]
    for name, p in doc["proportions"].items():
        src = doc["sources"][name]
        entry = {"name": name, **{k: src[k] for k in ("files", "eval_files") if src.get(k)}, "weight": round(p, 4)}
        lines.append(f"    - {json.dumps(entry)}   # predicted loss {doc['predicted'][name]:.4f}")
    return "\n".join(lines)
