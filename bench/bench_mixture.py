#!/usr/bin/env python3
"""BiMix on this machine: proxy runs, the fitted law, and mixtures compared at a fixed token budget.

    python bench/bench_mixture.py --size small   # minutes on this 2-core CPU (the figures in RESULTS.md)
    python bench/bench_mixture.py --size tiny    # seconds (the tests run it)

Domains (all local, all shipped with Python): `docs` (the language reference topics, pydoc_data),
`code` (standard-library sources), `api` (help() pages of 60 standard modules; `small` only). A tiny
Llama (character-level tokenizer) is trained with `surgery train` and `data.sources`, a constant
learning rate after warmup (so a run's curve does not depend on its length):

1. proxy runs at a few proportions, P steps each, evaluated every P/15 steps;
2. `surgery mix fit` on them: BiMix's law per domain, fitted on each run's first 75% of points,
   R^2 and mean relative error on the last 25% (extrapolation in s), and the proportions that
   minimise the predicted average held-out loss at T = 2P steps (each domain at least 5%);
3. T-step runs with uniform, token-count, entropy (conditional, BiMix's training-free proxy) and the
   fitted proportions: the average of the domains' held-out losses (equal weight: the objective the
   fit minimises) at T, and the law's prediction of each domain's loss against the measured one
   (the fit's extrapolation error to a longer run and unseen mixtures).

Outputs: bench/results/mixture-<size>-<time>.json/.md and mixture-<size>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# domains, proxy steps, micro batch, seq, hidden, layers, proxy mixtures
SIZES = {
    "small": (("docs", "code", "api"), 500, 8, 64, 64, 4),
    "tiny": (("docs", "code"), 12, 4, 32, 32, 2),
}


def proxies(names):
    if len(names) == 2:
        return [(0.3, 0.7), (0.7, 0.3)]
    return [(1 / 3, 1 / 3, 1 / 3), (0.6, 0.2, 0.2), (0.2, 0.6, 0.2), (0.2, 0.2, 0.6), (0.45, 0.45, 0.1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")) / "mixture")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--lr", default="3e-3")
    args = ap.parse_args()
    names, P, mb, seq, hidden, layers = SIZES[args.size]
    T = 2 * P

    from surgery.tiny import build_tiny
    from surgery.train import train
    from surgery.train.corpus import write_api_corpus, write_pydoc_corpus, write_stdlib_corpus
    from surgery.train.mixture import Law
    from surgery.train.mix import fit_runs

    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", str(work / "cache"))
    writers = {"docs": write_pydoc_corpus, "code": write_stdlib_corpus, "api": write_api_corpus}
    for n in names:
        if not (work / n / "train.jsonl").exists():
            writers[n](work / n / "train.jsonl", eval_path=work / n / "eval.jsonl")
    model = work / "init"
    if not (model / "config.json").exists():
        dims = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
        build_tiny("llama", model, seed=0, num_hidden_layers=layers, **dims)

    def config(tag: str, steps: int, weights: list[float] | None, rule: str = "given") -> Path:
        srcs = "".join(
            f"    - {{name: {n}, files: [{n}/train.jsonl], eval_files: [{n}/eval.jsonl]" + (f", weight: {w:.6f}" if weights else "") + "}\n"
            for n, w in zip(names, weights or [None] * len(names), strict=True)
        )
        p = work / f"{tag}.yaml"
        p.write_text(
            f"model: ./init\noutput: ./runs/{tag}\ndata:\n  seq_len: {seq}\n  weights: {rule}\n  eval_max_tokens: 48K\n"
            f"  sources:\n{srcs}lr: {args.lr}\nschedule: constant\nwarmup: {max(2, P // 20)}\nmicro_batch: {mb}\n"
            f"steps: {steps}\neval_every: {max(1, P // 15)}\nseed: 0\n"
        )
        return p

    def run(tag, steps, weights, rule="given"):
        res = train(config(tag, steps, weights, rule), force=True, progress=False, echo=lambda *a: None)
        recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in recs if r.get("final")][-1]["eval_loss_by_domain"]
        mix = json.loads((res.path / "train.json").read_text())["mixture"]
        share = {d["name"]: d["proportion"] for d in mix["domains"]}
        print(f"  {tag:<14} " + "  ".join(f"{n} {share[n]:.3f}: {final[n]:.4f}" for n in names) + f"  ({res.seconds:.1f} s)", flush=True)
        return res.path, share, final, recs

    print(f"proxy runs: {P} steps x {mb * seq} tokens", flush=True)
    proxy_paths = []
    for k, w in enumerate(proxies(names)):
        path, *_ = run(f"proxy-{k}", P, list(w))
        proxy_paths.append(path)
    fit = fit_runs(proxy_paths, steps=T, holdout=0.25, min_share=0.05)
    print(f"fitted; optimal at {T} steps: " + ", ".join(f"{n} {p:.3f}" for n, p in fit["proportions"].items()), flush=True)
    laws = {n: Law(**d["law"]) for n, d in fit["domains"].items()}

    print(f"compared runs: {T} steps", flush=True)
    rows = []
    curves = {}
    compared = [("uniform", None, "uniform"), ("tokens", None, "tokens"), ("entropy", None, "entropy")]
    compared.append(("fitted", [fit["proportions"][n] for n in names], "given"))
    for tag, weights, rule in compared[1:] if args.size == "tiny" else compared:
        path, share, final, recs = run(tag, T, weights, rule)
        avg = sum(final.values()) / len(final)
        predicted = {n: float(laws[n](max(share[n], 1e-9), T)) for n in names}
        err = {n: abs(predicted[n] - final[n]) / final[n] for n in names}
        rows.append(
            {
                "mixture": tag,
                "proportions": share,
                "final": final,
                "average": avg,
                "predicted": predicted,
                "relative_error": err,
            }
        )
        curves[tag] = [(r["step"], sum(r["eval_loss_by_domain"].values()) / len(names)) for r in recs if "eval_loss_by_domain" in r]
        steps_seen = sorted({s for s, _ in curves[tag]})
        rows[-1]["average_last3"] = sum(v for s, v in dict(curves[tag]).items() if s in steps_seen[-3:]) / len(steps_seen[-3:])

    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "size": args.size,
        "domains": list(names),
        "proxy_steps": P,
        "target_steps": T,
        "tokens_per_step": mb * seq,
        "proxies": [list(p) for p in proxies(names)],
        "fit": {n: {k: fit["domains"][n][k] for k in ("law", "fit", "held_out")} for n in names},
        "rows": rows,
    }
    (args.results / f"mixture-{args.size}-{stamp}.json").write_text(json.dumps(doc, indent=2))
    lines = [
        f"Fit on {len(proxy_paths)} proxy runs of {P} steps (first 75% of each run's points), held-out = the last 25%:",
        "",
        "| domain | alpha | beta | R² fit | R² held-out | mean rel. error held-out |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in names:
        f = fit["domains"][n]
        h = f["held_out"] or {"r2": float("nan"), "mean_relative_error": float("nan")}
        lines.append(
            f"| {n} | {f['law']['alpha']:.4f} | {f['law']['beta']:.3f} | {f['fit']['r2']:.4f} | {h['r2']:.4f} "
            f"| {h['mean_relative_error']:.3%} |"
        )
    lines += [
        "",
        f"Mixtures at {T} steps ({T * mb * seq:,} tokens); average = the domains' held-out losses, equally weighted;"
        " error = |law's prediction - measured| / measured, mean over domains:",
        "",
        "| mixture | "
        + " | ".join(f"{n} share" for n in names)
        + " | "
        + " | ".join(f"{n} loss" for n in names)
        + " | average | average of the last 3 evaluations | law's error |",
        "| --- | " + " | ".join("---:" for _ in range(2 * len(names))) + " | ---: | ---: | ---: |",
    ]
    for r in rows:
        mre = sum(r["relative_error"].values()) / len(names)
        lines.append(
            f"| {r['mixture']} | "
            + " | ".join(f"{r['proportions'][n]:.3f}" for n in names)
            + " | "
            + " | ".join(f"{r['final'][n]:.4f}" for n in names)
            + f" | {r['average']:.4f} | {r['average_last3']:.4f} | {mre:.2%} |"
        )
    md = "\n".join(lines) + "\n"
    (args.results / f"mixture-{args.size}-{stamp}.md").write_text(md)
    print(md)
    _plot(curves, rows, names, args.results / f"mixture-{args.size}.png")
    return 0


def _plot(curves, rows, names, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no figure; pip install matplotlib)")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for tag, pts in curves.items():
        a.plot(*zip(*pts, strict=True), marker=".", lw=1.2, label=tag)
    a.set_xlabel("step")
    a.set_ylabel("held-out loss, domains averaged")
    a.set_title("mixtures at the same budget")
    a.grid(alpha=0.3)
    a.legend()
    for r in rows:
        xs = [r["predicted"][n] for n in names]
        ys = [r["final"][n] for n in names]
        b.scatter(xs, ys, label=r["mixture"], s=18)
    lo = min(min(r["final"].values()) for r in rows) * 0.98
    hi = max(max(r["final"].values()) for r in rows) * 1.02
    b.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    b.set_xlabel("BiMix's prediction (fitted on the proxy runs)")
    b.set_ylabel("measured held-out loss")
    b.set_title("the law extrapolated to a 2x longer run")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
