#!/usr/bin/env python3
"""Gstack's operator comparison, run by surgery itself: a target model trained from scratch against
the same model grown from a smaller trained one by each growth operator, at the same token budget,
with held-out loss against training FLOPs.

    python bench/bench_growth.py --size small    # minutes on this 2-core CPU (the figures in RESULTS.md)
    python bench/bench_growth.py --size medium   # width 128, 3x the steps: about half an hour here
    python bench/bench_growth.py --size long     # small's shapes, 16x the tokens on the stdlib's sources: where
                                                 # depth pays (scratch beats the no-growth control); ~2 h here
    python bench/bench_growth.py --size gpu      # 24 layers, width 512, 33M tokens: for a GPU
    python bench/bench_growth.py --size tiny     # seconds (the tests run it)

Runs (each one `surgery train` on the pydoc corpus, the same seed, data order and token budget T;
the small model trains for d tokens, is grown, and the grown model trains on the next T - d tokens
with optimizer and schedule reset, as in the paper):
- scratch:             the target (L layers, width h) from random init;
- control-depth/-width: the small model (L/4 layers; half the width) trained on T tokens without
                       growth: a win over it is what growth adds, a win over scratch alone is not;
- depth, from an L/4-layer model, each by its name in the paper (`gstack: {operator, factor: 4}`,
  laid out as the paper's code tongxuluo/prts lays it):
    G_direct (stack):  `stack: {times: 4}`;
    G_zero:            each layer followed by 3 copies whose o_proj and down_proj are zero;
    G_random (+mask):  3L/4 new random layers on top, faded in by `mask_steps`; and ours beside it,
                       the same new layers interleaved (`expand: {init: random}`);
    G_learn (LiGO):    the stacking plan with `operator: learn` (LiGO's depth operator, learn steps
                       counted in FLOPs);
- width, from a model of half the width (stream, heads and MLP):
    G_direct (split):  `widen` by splitting (the same function), with even shares (Net2Net: the
                       copies stay copies) and with `shares: random` (LEMON-like: the paper's);
    G_zero:            `widen: {init: zero}`: the paper's [[W, A], [O, C]] (App. A.4);
    G_random (+mask):  `widen` with `init: random`, faded in by `mask_steps` (MSG's masked norms);
    G_learn (LiGO):    the split plan (random shares) with `operator: learn`.
FLOPs come from each run's metrics.jsonl (6N + 12 L d T per token, each stage at its own size).
Reported, against scratch's final loss (training loss as the paper measures it, smoothed over the
last 5 logged steps; and held-out loss): the paper's speed-up sp = FLOPs_scratch / FLOPs_G - 1
(Du et al. 2024, App. B.2, Eq. 48), and beside it the FLOPs saved, 1 - FLOPs_G / FLOPs_scratch;
"-" where the run never reaches scratch's loss. The paper's Fig. 3 figures (400M grown to 1.1B)
are printed beside ours.
Outputs: bench/results/growth-<size>-<time>.json/.md and growth-<size>.png (loss against FLOPs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# layers of the target, hidden, intermediate, heads, steps, growth step, micro batch, seq
SIZES = {
    "gpu": (24, 512, 2048, 8, 4000, 400, 16, 512),  # not run here: for a machine with a GPU
    "medium": (16, 128, 512, 4, 720, 120, 8, 64),
    "long": (16, 64, 256, 4, 4000, 400, 8, 64),  # small's shapes, 16x the tokens, on the stdlib corpus
    "small": (16, 64, 256, 4, 240, 40, 8, 64),
    "tiny": (8, 32, 64, 4, 12, 4, 4, 32),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")) / "growth")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--lr", default="1e-3", help="peak learning rate of every run")
    ap.add_argument("--only", default="", help="comma-separated run names (default: all)")
    ap.add_argument("--learn-lr", default="1e-2", help="grow.learn_lr of the LiGO runs (G_learn)")
    ap.add_argument("--reuse", action="store_true", help="take a run's result from its output when its config is unchanged")
    ap.add_argument("--steps", type=int, help="training steps of every run (default: the size's)")
    ap.add_argument("--grow-at", type=int, help="the step at which the small model is grown (default: the size's)")
    ap.add_argument(
        "--corpus",
        choices=("pydoc", "stdlib"),
        help="pydoc: the documentation topics (~480K characters); stdlib: this Python's standard-library sources "
        "(~13M characters), for budgets where a deep model overtakes a shallow one (default: the size's)",
    )
    args = ap.parse_args()
    deep, hidden, inter, heads, steps, at, mb, seq = SIZES[args.size]
    steps, at = args.steps or steps, args.grow_at or at
    corpus = args.corpus or ("stdlib" if args.size == "long" else "pydoc")
    small_layers = deep // 4

    from surgery.errors import SurgeryError
    from surgery.tiny import build_tiny
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus, write_stdlib_corpus
    from surgery.train.plot import compare_runs, read_metrics

    work = args.work / f"{args.size}-{corpus}-{steps}"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", str(work / "cache"))
    if not (work / "corpus" / "train.jsonl").exists():
        if corpus == "stdlib":
            out, ev = work / "corpus" / "train.jsonl", work / "corpus" / "eval.jsonl"
            write_stdlib_corpus(out, eval_path=ev, max_chars=1 << 62, every_file=True)
        else:
            write_pydoc_corpus(work / "corpus" / "train.jsonl", eval_path=work / "corpus" / "eval.jsonl")
    kv = max(1, heads // 2)
    half = dict(hidden_size=hidden // 2, num_attention_heads=heads // 2, num_key_value_heads=max(1, kv // 2), head_dim=hidden // heads)
    full = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv)
    shapes = {
        "target": dict(num_hidden_layers=deep, intermediate_size=inter, **full),
        "shallow": dict(num_hidden_layers=small_layers, intermediate_size=inter, **full),
        "narrow": dict(num_hidden_layers=deep, intermediate_size=inter // 2, **half),
    }
    models = {}
    for name, dims in shapes.items():
        path = work / f"{name}-init"
        if not (path / "config.json").exists():
            build_tiny("llama", path, seed=0, vocab_size=128, mlp_bias=False, attention_bias=False, **dims)
        models[name] = path
    tps = mb * seq
    every = max(1, steps // 12)
    common = (
        f"data: {{files: [corpus/train.jsonl], eval_files: [corpus/eval.jsonl], seq_len: {seq}, eval_max_tokens: 65536}}\n"
        f"lr: {args.lr}\nmicro_batch: {mb}\nwarmup: 4\nsteps: {steps}\neval_every: {every}\nseed: 0\n"
    )

    def grown(base: str, step: str, extra: str = "") -> str:
        return (
            f"model: {models[base]}\n" + common + f"grow:\n  at_tokens: {at * tps}\n{extra}  plan:\n    models: {{small: TRAINED}}\n"
            "    steps:\n      - take: {model: small}\n" + step
        )

    stack = "      - gstack: {operator: direct, factor: 4}\n"
    g_zero = "      - gstack: {operator: zero, factor: 4}\n"
    g_random = "      - gstack: {operator: random, factor: 4, std: 0.02}\n"
    interleaved = f"      - expand: {{groups: {small_layers}, per_group: 3, init: random, std: 0.02}}\n"
    mask = f"  mask_steps: {max(1, (steps - at) // 4)}\n"
    learn = f"  operator: learn\n  learn_steps: {max(2, at // 4)}\n  learn_lr: {args.learn_lr}\n"
    widen = f"      - widen: {{hidden: {hidden}, heads: {heads}, intermediate: {inter}}}\n"
    uneven = f"      - widen: {{hidden: {hidden}, heads: {heads}, intermediate: {inter}, shares: random}}\n"
    wide = f"      - widen: {{hidden: {hidden}, heads: {heads}, intermediate: {inter}, init: INIT}}\n"
    runs = {
        "scratch": ("-", "-", f"model: {models['target']}\n" + common),
        "control-depth": ("-", "no growth (L/4 layers)", f"model: {models['shallow']}\n" + common),
        "control-width": ("-", "no growth (half width)", f"model: {models['narrow']}\n" + common),
        "stack": ("depth", "G_direct", grown("shallow", stack)),
        "zero": ("depth", "G_zero", grown("shallow", g_zero)),
        "random+mask": ("depth", "G_random", grown("shallow", g_random, mask)),
        "random-interleaved+mask": ("depth", "G_random (interleaved, ours)", grown("shallow", interleaved, mask)),
        "learn": ("depth", "G_learn", grown("shallow", stack, learn)),
        "split-width": ("width", "G_direct (even, ours)", grown("narrow", widen)),
        "split-width+shares": ("width", "G_direct", grown("narrow", uneven)),
        "zero-width": ("width", "G_zero", grown("narrow", wide.replace("INIT", "zero"))),
        "random-width+mask": ("width", "G_random", grown("narrow", wide.replace("INIT", "random, std: 0.02"), mask)),
        "learn-width": ("width", "G_learn", grown("narrow", uneven, learn)),
    }
    only = [x for x in args.only.split(",") if x]
    rows, curves = [], {}
    for name, (axis, op, text) in runs.items():
        if only and name not in only and name != "scratch":
            continue
        tag = name.replace("+", "-")
        cfg = work / f"{tag}.yaml"
        text += f"output: {work / ('out-' + tag)}\n"
        done = work / f"out-{tag}" / "train.json"
        if args.reuse and cfg.exists() and cfg.read_text() == text and done.exists():
            res = _finished(done)  # the same config ran to the end before: its result, not a rerun
        else:
            cfg.write_text(text)
            res = None
        try:
            res = res or train(cfg, force=True, progress=False, echo=lambda *a: None)
        except SurgeryError as e:  # a diverged run is a result too
            rows.append({"run": name, "axis": axis, "operator": op, "diverged": str(e).split(";")[0]})
            print(f"  {name:<12} {rows[-1]['diverged']}", flush=True)
            continue
        recs = read_metrics(res.path / "metrics.jsonl")
        curve = sorted({r["flops"]: r["eval_loss"] for r in recs if "eval_loss" in r and "flops" in r}.items())
        train_curve = _smooth(sorted({r["flops"]: r["loss"] for r in recs if "loss" in r and "flops" in r}.items()))
        curves[name] = res.path
        rows.append(
            {
                "run": name,
                "axis": axis,
                "operator": op,
                "eval_loss": res.eval_loss,
                "perplexity": res.perplexity,
                "flops": res.flops,
                "curve": curve,
                "train_curve": train_curve,
                "train_loss": train_curve[-1][1] if train_curve else None,
                "paper": PAPER_FIG3.get((axis, op)),
                "seconds": round(res.seconds, 1),
            }
        )
        print(f"  {name:<12} held-out loss {res.eval_loss:.4f}  FLOPs {res.flops:.3e}  {res.seconds:6.1f} s", flush=True)
    if rows[0].get("diverged"):
        print("scratch diverged: nothing to compare against; lower --lr")
        return 1
    base = rows[0]["flops"]
    for metric, curve_key, final in (("held_out", "curve", rows[0]["eval_loss"]), ("train", "train_curve", rows[0]["train_loss"])):
        for r in rows:
            if r.get("diverged"):
                continue
            reach = _first_reach(r[curve_key], final)
            r[f"{metric}_flops_to_scratch"] = reach
            r[f"{metric}_speedup_paper"] = None if not reach else round(base / reach - 1, 3)  # Eq. 48
            r[f"{metric}_flops_saved"] = None if reach is None else round(1 - reach / base, 3)
        rows[0][f"{metric}_speedup_paper"], rows[0][f"{metric}_flops_saved"] = 0.0, 0.0
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "size": args.size,
        "corpus": corpus,
        "lr": args.lr,
        "learn_lr": args.learn_lr,
        "target": shapes["target"],
        "steps": steps,
        "grow_at_step": at,
        "tokens_per_step": tps,
        "rows": rows,
    }
    (args.results / f"growth-{args.size}-lr{args.lr}-{stamp}.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "| run | growth | operator | training loss | held-out loss | training FLOPs | speed-up (paper's Eq. 48), training loss "
        "| FLOPs saved, training loss | speed-up, held-out | FLOPs saved, held-out | paper, Fig. 3 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def pct(v):
        return "-" if v is None else f"{v:+.1%}" if v else "0%"

    for r in rows:
        if r.get("diverged"):
            lines.append(f"| {r['run']} | {r['axis']} | {r['operator']} | {r['diverged']} | | | | | | | |")
            continue
        paper = "" if r["paper"] is None else f"{r['paper']:+.1%}"
        lines.append(
            f"| {r['run']} | {r['axis']} | {r['operator']} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} | {r['flops']:.3e} "
            f"| {pct(r['train_speedup_paper'])} | {pct(r['train_flops_saved'])} | {pct(r['held_out_speedup_paper'])} "
            f"| {pct(r['held_out_flops_saved'])} | {paper} |"
        )
    (args.results / f"growth-{args.size}-lr{args.lr}-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        compare_runs(list(curves.values()), args.results / f"growth-{args.size}.png", x="flops", title=f"growth operators ({args.size})")
    except Exception as e:  # the figure is a convenience; the table is the result
        print(f"(no figure: {e})")
    return 0


# The paper's Fig. 3 (Du et al. 2024): 400M grown to 1.1B after d = 10B tokens (g = 4), speed-up
# FLOPs_scratch / FLOPs_G - 1 to reach the same training loss, per operator and direction.
PAPER_FIG3 = {
    ("depth", "G_direct"): 0.491,
    ("depth", "G_learn"): 0.486,
    ("depth", "G_zero"): 0.466,
    ("depth", "G_random"): -0.257,
    ("width", "G_direct"): -0.007,
    ("width", "G_learn"): -0.154,
    ("width", "G_zero"): -0.179,
    ("width", "G_random"): -0.138,
}


def _finished(summary: Path):
    """A finished run's result from its train.json (what `train` returned when it ran)."""
    from types import SimpleNamespace

    d = json.loads(summary.read_text())
    return SimpleNamespace(
        path=summary.parent, eval_loss=d["eval_loss"], perplexity=d["perplexity"], flops=d["flops"], seconds=d["seconds"]
    )


def _smooth(curve: list, k: int = 5) -> list:
    """A training-loss curve [(flops, loss)] as the mean of each point and the k - 1 before it."""
    out = []
    for i, (f, _) in enumerate(curve):
        window = [loss for _, loss in curve[max(0, i - k + 1) : i + 1]]
        out.append((f, sum(window) / len(window)))
    return out


def _first_reach(curve: list, target: float) -> float | None:
    """The FLOPs at which a held-out curve [(flops, loss)] first reaches `target` (linear between points)."""
    prev = None
    for f, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return f
            f0, l0 = prev
            return f0 + (f - f0) * (l0 - target) / (l0 - loss)
        prev = (f, loss)
    return None


if __name__ == "__main__":
    sys.exit(main())
