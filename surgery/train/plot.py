"""The loss curve (`loss.png`) from `metrics.jsonl`: training loss against tokens, held-out loss
as points (a mixture's weighted average, and each domain's as a dashed line), a line where the
model grew."""

from __future__ import annotations

from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a file surgery wrote, read back as any input: every
    record a JSON object, its counters finite numbers, its losses numbers (a diverged run's NaN
    allowed), a domain's losses a mapping of numbers), or a located error naming the line."""
    from surgery.errors import PlanError
    from surgery.jsonio import MAX_COUNT, MAX_FLOPS, MAX_JSON_BYTES, MAX_LOSS, bounded_number, parse_json

    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise PlanError(f"metrics.jsonl is over {MAX_JSON_BYTES:,} bytes (corrupt or hostile file)", where=str(path))
        text = path.read_bytes()
    except OSError as e:
        raise PlanError(f"cannot read metrics.jsonl: {e.strerror}", where=str(path)) from None
    recs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        rec = parse_json(line, where, error=PlanError, what="the record")
        if not isinstance(rec, dict):
            raise PlanError("a metrics record is a JSON object", where=where)
        for key, hi in (("step", MAX_COUNT), ("stage", 10**6), ("tokens", MAX_COUNT), ("flops", MAX_FLOPS)):
            if key in rec and not bounded_number(rec[key], lo=0, hi=hi):
                raise PlanError(f"{key!r} is {str(rec[key])[:40]!r}, not a finite number in [0, {hi:.0e}]", where=where)
        for key in ("loss", "eval_loss"):
            if key in rec and not bounded_number(rec[key], lo=-MAX_LOSS, hi=MAX_LOSS, nan=True):
                raise PlanError(
                    f"{key!r} is {str(rec[key])[:40]!r}, not a number (a loss, at most {MAX_LOSS:.0e} in size, or NaN)", where=where
                )
        by = rec.get("eval_loss_by_domain")
        if by is not None and not (
            isinstance(by, dict)
            and all(isinstance(k, str) and bounded_number(v, lo=-MAX_LOSS, hi=MAX_LOSS, nan=True) for k, v in by.items())
        ):
            raise PlanError("'eval_loss_by_domain' is not a mapping of domain names to losses", where=where)
        load = rec.get("expert_load")
        if load is not None and not (isinstance(load, list) and len(load) <= 4096 and all(bounded_number(v, lo=0, hi=1) for v in load)):
            raise PlanError("'expert_load' is not a list of shares (numbers in [0, 1]), one per expert", where=where)
        if "router_balance" in rec and not bounded_number(rec["router_balance"], lo=0, hi=MAX_COUNT):
            raise PlanError(f"'router_balance' is {str(rec['router_balance'])[:40]!r}, not a finite number", where=where)
        recs.append(rec)
    return recs


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    load, balance = expert_series(recs)
    if load:  # a mixture of experts: each expert's share of the routed slots, and the balance term, below
        fig, (ax, lax) = plt.subplots(2, 1, figsize=(7, 6.2), dpi=110, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        _expert_panel(lax, load, balance)
    else:
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
    (lax if load else ax).set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.set_title(title or "surgery train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def expert_series(recs: list[dict]) -> tuple[list[list[tuple]], list[tuple]]:
    """From metrics records: per expert, its (tokens, share of the routed slots); and the router's
    (tokens, balance term). Empty for a dense model."""
    rows = [r for r in recs if isinstance(r.get("expert_load"), list) and r["expert_load"]]
    n = max((len(r["expert_load"]) for r in rows), default=0)
    load = [[(r["tokens"], r["expert_load"][e]) for r in rows if len(r["expert_load"]) == n] for e in range(n)]
    balance = [(r["tokens"], r["router_balance"]) for r in rows if _number(r.get("router_balance"))]
    return load, balance


def _expert_panel(ax, load: list, balance: list) -> None:
    for e, pts in enumerate(load):
        ax.plot(*zip(*pts, strict=True), lw=1, label=f"expert {e}" if len(load) <= 8 else None)
    ax.axhline(1 / len(load), color="grey", ls=":", lw=1)  # a balanced router: 1/E each
    ax.set_ylabel("share of routed slots")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if balance:
        tw = ax.twinx()
        tw.plot(*zip(*balance, strict=True), "k--", lw=1, label="balance term E sum f P (1 = balanced)")
        tw.set_ylabel("balance term")
        more = tw.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:  # under the panel, where it hides no line
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=5, fontsize=7, frameon=False)


def compare_runs(runs: list, png: Path, *, x: str = "tokens", title: str = "", train_loss: bool = True) -> Path:
    """Overlay several runs' held-out curves (and, faintly, their training loss) on one figure against
    tokens, training FLOPs or steps; each run's growth step is marked in its colour."""
    from surgery.errors import PlanError

    if x not in ("tokens", "flops", "steps"):
        raise PlanError(f"--x {x}: use tokens, flops or steps")
    key = "step" if x == "steps" else x
    series = []
    for run in runs:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise PlanError(f"{run} holds no metrics.jsonl", where=str(run), fix="give `surgery train` output folders")
        recs = read_metrics(path)
        if not any("loss" in r or "eval_loss" in r for r in recs):
            raise PlanError("no losses recorded yet", where=str(path), fix="plot runs that have logged a step")
        if any(key not in r for r in recs if "loss" in r or "eval_loss" in r):
            raise PlanError(
                f"records without {key!r}" + (" (trained before surgery recorded FLOPs)" if key == "flops" else ""),
                where=str(path),
                fix="plot against tokens or steps",
            )
        series.append((Path(run).name, recs))
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("surgery plot needs matplotlib, which is not installed", fix="pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for i, (name, recs) in enumerate(series):
        color = f"C{i % 10}"
        evals = sorted({r[key]: r["eval_loss"] for r in recs if "eval_loss" in r}.items())
        if train_loss:
            tr = [(r[key], r["loss"]) for r in recs if "loss" in r]
            if tr:
                ax.plot(*zip(*tr, strict=True), color=color, lw=0.8, alpha=0.35)
        if evals:
            ax.plot(*zip(*evals, strict=True), color=color, marker="o", ms=3, lw=1.5, label=f"{name} (held-out)")
        for r in recs:
            if r.get("event") == "grow":
                ax.axvline(r.get(key, r["step"]), color=color, ls=":", lw=1)
    ax.set_xlabel({"tokens": "tokens", "flops": "training FLOPs", "steps": "step"}[x])
    ax.set_ylabel("loss (held-out: lines with points; training: faint)")
    ax.set_title(title or "surgery plot")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(png)
    part = png.with_name(f".{png.name}.partial")
    fig.savefig(part, format=png.suffix.lstrip(".").lower() or "png")  # complete, then in place
    plt.close(fig)
    part.replace(png)
    return png
