"""Sparse upcycling against dense continued pretraining at the same training FLOPs, run by surgery.

    python bench/bench_upcycle.py            # minutes on this 2-core CPU (the figures in RESULTS.md)
    python bench/bench_upcycle.py --size tiny  # seconds (a smoke run)
    python bench/bench_upcycle.py --size long --routers random   # 4x the continued training: ~1 h here

A dense Llama (8 layers, width 128, byte vocabulary) is trained from scratch on the stdlib corpus
for `base` steps; from that checkpoint, with the same data order after it:
- dense:      the dense model trains on;
- upcycled:   `upcycle: {experts: 4, top_k: 2, router: random}` (the dense function at step 0),
              trained with the router loss on, for the steps that spend the same training FLOPs
              (its MLPs cost k = 2 experts per token);
- upcycled-zero: the same with the zero router (validate warns: the same 2 experts for every token).
Reported: each run's held-out loss at the end and against FLOPs (loss.png-style figure), and the
upcycled runs' expert load at the end. Outputs: bench/results/upcycle-<time>.json/.md and upcycle.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # layers, hidden, intermediate, heads, base steps, more dense steps, micro batch, seq
    "small": (8, 128, 512, 4, 600, 600, 8, 128),
    # small's model and base, 4x the continued training (2.5M tokens dense): does upcycling pay later?
    "long": (8, 128, 512, 4, 600, 2400, 8, 128),
    "tiny": (2, 32, 64, 4, 8, 8, 4, 32),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")) / "upcycle")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--routers", default="random,zero", help="which upcycled runs: random, zero or both (comma-separated)")
    args = ap.parse_args()
    routers = [r for r in args.routers.split(",") if r]
    if not routers or set(routers) - {"random", "zero"}:
        ap.error("--routers: random, zero or random,zero")
    layers, hidden, inter, heads, base_steps, more, mb, seq = SIZES[args.size]

    import surgery
    from surgery.tiny import build_tiny
    from surgery.train import train
    from surgery.train.corpus import write_stdlib_corpus
    from surgery.train.flops import flops_per_token
    from surgery.train.plot import compare_runs, read_metrics

    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", str(work / "cache"))
    corpus = work / "corpus"
    if not (corpus / "train.jsonl").exists():
        write_stdlib_corpus(corpus / "train.jsonl", eval_path=corpus / "eval.jsonl", max_chars=1 << 62, every_file=True)
    init = work / "dense-init"
    if not (init / "config.json").exists():
        build_tiny(
            "llama", init, seed=0, vocab_size=128, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
            num_attention_heads=heads, num_key_value_heads=heads, attention_bias=False, mlp_bias=False,
        )  # fmt: skip
    cap = 65536 if args.size != "tiny" else 2048
    common = (
        f"data: {{files: [{corpus / 'train.jsonl'}], eval_files: [{corpus / 'eval.jsonl'}], seq_len: {seq}, eval_max_tokens: {cap}}}\n"
        f"lr: 1e-3\nmicro_batch: {mb}\nwarmup: 10\nseed: 0\n"
    )

    def run(name: str, model: Path, steps: int, extra: str = ""):
        cfg = work / f"{name}.yaml"
        cfg.write_text(
            f"model: {model}\noutput: {work / ('out-' + name)}\n{common}steps: {steps}\neval_every: {max(1, steps // 8)}\n{extra}"
        )
        res = train(cfg, force=True, progress=False, echo=lambda *a: None)
        print(f"  {name:<14} held-out {res.eval_loss:.4f}  FLOPs {res.flops:.3e}  {res.seconds:6.1f} s", flush=True)
        return res

    base = run("base", init, base_steps)
    up_plan = work / "upcycle.yaml"
    rows = []
    dense = run("dense", base.path, more)
    rows.append(("dense", dense, None))
    for router in routers:
        up_plan.write_text(
            f"models: {{d: {base.path}}}\nsteps: [{{take: {{model: d}}}}, {{upcycle: {{experts: 4, top_k: 2, router: {router}}}}}]\n"
        )
        moe = surgery.apply(up_plan, work / f"moe-{router}", force=True, progress=False).path
        ratio = flops_per_token(moe, seq)["flops_per_token"] / flops_per_token(base.path, seq)["flops_per_token"]
        steps = max(1, round(more / ratio))  # the same training FLOPs as `dense`
        name = "upcycled" if router == "random" else "upcycled-zero"
        res = run(name, moe, steps)
        recs = read_metrics(res.path / "metrics.jsonl")
        load = next((r["expert_load"] for r in reversed(recs) if "expert_load" in r), None)
        rows.append((name, res, {"flops_ratio": round(ratio, 3), "steps": steps, "final_expert_load": load}))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc = {
        "size": args.size,
        "base": {"steps": base_steps, "eval_loss": base.eval_loss, "flops": base.flops},
        "runs": [{"run": n, "eval_loss": r.eval_loss, "flops": r.flops, "seconds": r.seconds, **(x or {})} for n, r, x in rows],
    }
    (args.results / f"upcycle-{args.size}-{stamp}.json").write_text(json.dumps(doc, indent=2))
    lines = [
        "| run | steps after the dense base | training FLOPs after it | held-out loss | final expert load |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for n, r, x in rows:
        steps = x["steps"] if x else more
        lines.append(f"| {n} | {steps} | {r.flops:.3e} | {r.eval_loss:.4f} | {x['final_expert_load'] if x else '-'} |")
    (args.results / f"upcycle-{args.size}-{stamp}.md").write_text("\n".join(lines) + "\n")
    print(f"dense base: {base_steps} steps, held-out {base.eval_loss:.4f}")
    print("\n".join(lines))
    try:
        compare_runs(
            [r.path for _, r, _ in rows], args.results / f"upcycle-{args.size}.png", x="flops", title="upcycled vs dense, same FLOPs"
        )
    except Exception as e:  # the figure is a convenience; the table is the result
        print(f"(no figure: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
