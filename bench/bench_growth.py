#!/usr/bin/env python3
"""Gstack's central comparison, run by surgery itself: a deep model trained from scratch against the
same depth grown from a trained shallow model, at the same token budget, with held-out loss and
training FLOPs for each.

    python bench/bench_growth.py --size small    # minutes on this 2-core CPU (the figure in RESULTS.md)
    python bench/bench_growth.py --size tiny     # seconds (the tests run it)

Runs (every one `surgery train`, data: the pydoc corpus, the same seed and token budget T):
- scratch:        the L-layer model from random init, T tokens;
- stack (G_direct): an L/4-layer model for d tokens, `stack: {times: 4}`, then T - d tokens;
- random+mask (G_random): the L/4-layer model for d tokens, `expand` with random new layers
                  (init: random) and `mask_steps` fading them in, then T - d tokens;
- zero (G_zero):  the same with `init: zero` new layers (norms kept), then T - d tokens.
FLOPs: 6 N D per stage (N non-embedding parameters). Reported: final held-out loss and perplexity,
FLOPs, and the FLOPs saved against scratch. Results: bench/results/growth-<size>-<time>.json/.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# layers of the deep model, hidden, intermediate, steps, growth step, micro batch, seq
SIZES = {"small": (16, 64, 256, 240, 60, 8, 64), "tiny": (8, 32, 64, 16, 4, 4, 32)}

GROWTH = {
    "stack": "      - stack: {times: 4}\n",
    "random+mask": "      - expand: {groups: GROUPS, per_group: 3, init: random, std: 0.02}\n",
    "zero": "      - expand: {groups: GROUPS, per_group: 3, init: zero}\n",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")) / "growth")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--lr", default="3e-3", help="peak learning rate of every run")
    args = ap.parse_args()
    deep, hidden, inter, steps, at, mb, seq = SIZES[args.size]
    small_layers = deep // 4

    from surgery.tiny import build_tiny
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", str(work / "cache"))
    if not (work / "corpus" / "train.jsonl").exists():
        write_pydoc_corpus(work / "corpus" / "train.jsonl", eval_path=work / "corpus" / "eval.jsonl")
    dims = dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    models = {}
    for name, layers in (("deep", deep), ("small", small_layers)):
        path = work / f"{name}-init"
        if not (path / "config.json").exists():
            build_tiny("llama", path, seed=0, num_hidden_layers=layers, mlp_bias=False, attention_bias=False, **dims)
        models[name] = path
    tps = mb * seq
    common = (
        f"data: {{files: [corpus/train.jsonl], eval_files: [corpus/eval.jsonl], seq_len: {seq}}}\n"
        f"lr: {args.lr}\nmicro_batch: {mb}\nwarmup: 4\nsteps: {steps}\neval_every: {steps}\nseed: 0\n"
    )
    runs = {"scratch": f"model: {models['deep']}\n" + common}
    for name, step in GROWTH.items():
        text = (
            f"model: {models['small']}\n"
            + common
            + (
                f"grow:\n  at_tokens: {at * tps}\n"
                + (f"  mask_steps: {max(1, (steps - at) // 4)}\n" if "mask" in name else "")
                + "  plan:\n    models: {small: TRAINED}\n    steps:\n"
                + "      - take: {model: small}\n"
                + step.replace("GROUPS", str(small_layers))
            )
        )
        runs[name] = text
    rows = []
    n_params = {}  # non-embedding parameters per depth
    per_layer = 4 * hidden * hidden * 3 // 4 + 3 * hidden * inter + 2 * hidden  # q,o (h x h), k,v (h x h/2), MLP, norms
    for depth in (deep, small_layers):
        n_params[depth] = depth * per_layer
    for name, text in runs.items():
        cfg = work / f"{name.replace('+', '-')}.yaml"
        cfg.write_text(text + f"output: {work / ('out-' + name.replace('+', '-'))}\n")
        res = train(cfg, force=True, progress=False, echo=lambda *a: None)
        if name == "scratch":
            flops = 6 * n_params[deep] * steps * tps
        else:
            flops = 6 * n_params[small_layers] * at * tps + 6 * n_params[deep] * (steps - at) * tps
        rows.append(
            {
                "run": name,
                "eval_loss": res.eval_loss,
                "perplexity": res.perplexity,
                "tokens": res.tokens,
                "flops": flops,
                "seconds": round(res.seconds, 1),
            }
        )
        print(
            f"  {name:<12} held-out loss {res.eval_loss:.4f}  ppl {res.perplexity:7.2f}  FLOPs {flops:.3e}  {res.seconds:6.1f} s",
            flush=True,
        )
    base = rows[0]["flops"]
    for r in rows:
        r["flops_saved_vs_scratch"] = round(1 - r["flops"] / base, 3)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "size": args.size,
        "lr": args.lr,
        "deep_layers": deep,
        "small_layers": small_layers,
        "hidden": hidden,
        "steps": steps,
        "grow_at_step": at,
        "tokens_per_step": tps,
        "rows": rows,
    }
    (args.results / f"growth-{args.size}-lr{args.lr}-{stamp}.json").write_text(json.dumps(doc, indent=2))
    lines = ["| run | held-out loss | perplexity | training FLOPs | FLOPs saved vs scratch |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {r['run']} | {r['eval_loss']:.4f} | {r['perplexity']:.2f} | {r['flops']:.3e} | {r['flops_saved_vs_scratch']:.0%} |"
        for r in rows
    ]
    (args.results / f"growth-{args.size}-lr{args.lr}-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
