"""BiMix's bivariate mixing law (Ge et al. 2024, arXiv 2405.14908; docs/mixtures.md):
L_i(r_i, s) = A_i / r_i^alpha_i * (B_i / s^beta_i + C_i), fitted per domain (`fit_law`, `fit_quality`),
and the proportions minimising the weighted sum of the predicted losses at s (`optimal_proportions`);
`weighted_loss`, a mixture's held-out loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def weighted_loss(by_domain: dict, weights: dict) -> float:
    """The mixture's held-out loss: the domains' losses weighted by their proportions (a plain
    mean when every weight is 0)."""
    w = {k: weights.get(k, 0.0) for k in by_domain}
    total = sum(w.values())
    if total <= 0:
        return sum(by_domain.values()) / len(by_domain)
    return sum(by_domain[k] * w[k] for k in by_domain) / total


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


# the names this module had before the mix commands and the mixture sampler moved out (issue 24)
from surgery.data.mixing import (  # noqa: E402, F401
    BLOCK,
    ENTROPY_RULES,
    ArrayStream,
    Mixture,
    TokenStats,
    block_counts,
    proportions,
    token_statistics,
)

_MOVED_TO_MIX = {"describe", "describe_text", "read_run", "fit_runs", "fit_text"}


def __getattr__(name: str):
    """`surgery mix`'s functions, now in surgery.train.mix (which imports this module), found lazily."""
    if name in _MOVED_TO_MIX:
        import importlib

        return getattr(importlib.import_module("surgery.train.mix"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
