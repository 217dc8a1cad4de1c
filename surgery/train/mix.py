"""`surgery mix describe` (a config's domains: sizes, entropies, the proportions each rule gives) and
`surgery mix fit` (BiMix's law fitted to finished runs, and the proportions it recommends)."""

from __future__ import annotations

import math

from surgery.data.mixing import TokenStats, proportions
from surgery.train.mixture import fit_law, fit_quality, optimal_proportions


def describe(config, *, progress: bool = False) -> dict:
    """Every domain of a training config's `data.sources`: sizes, token statistics, and the
    proportions each rule gives (the configured one marked), without training."""
    import transformers

    from surgery.errors import PlanError
    from surgery.io.checkpoint import resolve_ref
    from surgery.train.config import WEIGHT_RULES, Config, load_config, run_sequences, with_seq_len
    from surgery.train.data import build_corpus
    from surgery.io.loadable import check_loadable

    cfg = config if isinstance(config, Config) else load_config(config)
    d = cfg.body.data
    if not d.sources:
        raise PlanError("this config has no `data.sources:` (a mixture of domains) to describe", where=cfg.where("data"))
    model_dir = resolve_ref(cfg.body.model, cfg.base_dir, where=cfg.where("model"))
    check_loadable(model_dir, cfg.where("model"))
    transformers.utils.logging.set_verbosity_error()
    cfg = with_seq_len(cfg, model_dir)  # as `train` resolves it
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
