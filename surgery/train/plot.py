"""The loss curve (`loss.png`) from `metrics.jsonl`: training loss against tokens, held-out loss
as points (a mixture's weighted average, and each domain's as a dashed line), a line where the
model grew."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def loss_curve(metrics: Path, png: Path, *, title: str = "") -> bool:
    """Write the plot; False (and no file) when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = read_metrics(metrics)
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    evals = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if not train and not evals:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), lw=1.2, label="training loss")
    if evals:
        mixed = any("eval_loss_by_domain" in r for r in recs)
        ax.plot(*zip(*evals, strict=True), "o", ms=4, label="held-out loss" + (" (weighted average)" if mixed else ""))
    domains: dict = {}  # a mixture: each domain's held-out loss
    for r in recs:
        for name, v in (r.get("eval_loss_by_domain") or {}).items():
            domains.setdefault(name, {})[r["tokens"]] = v
    for name, pts in domains.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "--", marker=".", ms=3, lw=0.9, label=f"held-out: {name}")
    stages = {}
    for r in recs:
        stages.setdefault(r["stage"], r["tokens"])
    for st, tok in sorted(stages.items())[1:]:
        ax.axvline(tok, color="grey", ls="--", lw=1)
        ax.text(tok, ax.get_ylim()[1], f" grown (stage {st})", va="top", fontsize=8, color="grey")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title or "surgery train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
