#!/usr/bin/env python3
"""Benchmark `surgery apply` against the disk (`cp -r`) and against mergekit, in one run.

    python bench/bench_apply.py --size small          # fits a 2-core laptop-class machine in minutes
    python bench/bench_apply.py --size 8b             # the real thing: a Llama-3-8B-shaped bf16 checkpoint

Builds a synthetic Llama-shaped bf16 checkpoint (names, shapes and dtypes of the real model;
random values), then times, each in a fresh process with its peak RSS taken from wait4():

- `cat` of every input file (a read baseline),
- `cp -r` of the source folder (the disk's copy limit),
- `surgery apply` of each case's plan,
- `mergekit-yaml` of the equivalent mergekit config, when mergekit is installed.

Results go to bench/results/<size>-<time>.json and .md, and to stdout as a table with each
case's output GB/s and its ratios to cp and to mergekit. The page cache is not dropped (that
needs root); every command is run once to warm it first unless --cold is given, so all
figures are warm-cache figures, which favours no one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Sizes: hidden, layers, intermediate, vocab, heads, kv heads, tied (see surgery/synthetic.py).
# This process never imports torch: children's peak RSS (from wait4) would include a forked
# parent's pages, so the synthetic checkpoint is built in a subprocess too.
SIZES_BENCH = {
    "8b": (4096, 32, 14336, 128256, 32, 8, False),
    "1.7b": (2048, 24, 8192, 128256, 16, 8, True),
    # 32 layers like the 8B model, so the same plans apply, at about 1/16 of the bytes
    "small": (1024, 32, 3584, 32000, 8, 2, False),
}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def timed(cmd: list[str], env=None) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "rc": rc, "stderr_tail": err[-800:] if rc else ""}


def cases(src: Path, n_layers: int, other: Path | None = None) -> dict[str, tuple[str, str | None]]:
    """name -> (surgery plan or mergekit config, the mergekit config to compare against or None)."""
    m = n_layers // 4  # SOLAR: 32 -> 48 trims 8
    solar = (f"models: {{base: {src}}}\nsteps:\n  - take: {{model: base}}\n  - dus: {{trim: {m}}}\n",
             f"slices:\n  - sources: [{{model: {src}, layer_range: [0, {n_layers - m}]}}]\n"
             f"  - sources: [{{model: {src}, layer_range: [{m}, {n_layers}]}}]\nmerge_method: passthrough\ndtype: bfloat16\n")
    out = {f"solar-dus {n_layers}->{2 * (n_layers - m)}": solar}
    if other is not None:
        # mergekit's gradient-slerp example, run unchanged by both tools
        slerp = (f"slices:\n  - sources:\n      - {{model: {src}, layer_range: [0, {n_layers}]}}\n"
                 f"      - {{model: {other}, layer_range: [0, {n_layers}]}}\nmerge_method: slerp\nbase_model: {src}\n"
                 "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
                 "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\ndtype: bfloat16\n")
        out["gradient-slerp (mergekit config)"] = (slerp, slerp)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES_BENCH), default="small")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")))
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per command (the best is reported)")
    ap.add_argument("--cold", action="store_true", help="do not warm the page cache first")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--only", choices=["solar", "slerp"], default=None, help="run one case (default: all)")
    args = ap.parse_args()

    work = args.work / args.size
    src, other = work / "src", work / "src-b"
    for folder, seed in ((src, 0), (other, 1)):
        if args.only == "solar" and folder == other:
            continue
        if not (folder / "model.safetensors.index.json").exists():
            print(f"building synthetic {args.size} checkpoint in {folder} ...", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([sys.executable, "-c", "import sys; from surgery.synthetic import write_synthetic_llama as w; "
                            f"w(sys.argv[1], {SIZES_BENCH[args.size]!r}, seed={seed})", str(folder)], check=True, cwd=HERE.parent)
    in_bytes = folder_bytes(src)
    n_layers = SIZES_BENCH[args.size][1]
    mergekit = shutil.which("mergekit-yaml") if not args.no_mergekit else None
    results = []

    def run(label: str, kind: str, cmd: list[str], out: Path | None, baseline_bytes: int | None = None):
        best = None
        for k in range(args.repeat + (0 if args.cold else 1)):
            if out is not None and out.exists():
                shutil.rmtree(out)
            r = timed(cmd)
            if r["rc"]:
                print(f"  {label}: FAILED rc={r['rc']}\n{r['stderr_tail']}", flush=True)
                best = r
                break
            if k == 0 and not args.cold:
                continue  # warm-up run
            if best is None or r["wall_s"] < best["wall_s"]:
                best = r
        nbytes = baseline_bytes if baseline_bytes is not None else (folder_bytes(out) if out and out.exists() else 0)
        row = {"case": label, "tool": kind, "bytes": nbytes, **best,
               "gb_per_s": nbytes / best["wall_s"] / 1e9 if best and not best["rc"] else None}
        results.append(row)
        print(f"  {label:<28} {kind:<10} {row['wall_s']:8.2f} s  {row['peak_rss_mb']:8.0f} MB RSS  "
              f"{(row['gb_per_s'] or 0):6.2f} GB/s", flush=True)
        return row

    print(f"input: {in_bytes / 1e9:.2f} GB, {n_layers} layers ({args.size})", flush=True)
    if args.only != "slerp":
        run("read inputs", "cat", ["sh", "-c", f"cat {src}/*.safetensors > /dev/null"], None, in_bytes)
        run("copy source", "cp -r", ["cp", "-r", str(src), str(work / "cp-out")], work / "cp-out")
    for name, (plan_text, mk_text) in cases(src, n_layers, None if args.only == "solar" else other).items():
        slug = name.split()[0]
        if args.only and not slug.startswith({"solar": "solar", "slerp": "gradient"}[args.only]):
            continue
        plan = work / f"{slug}.yaml"  # surgery reads plans and mergekit configs alike
        plan.write_text(plan_text)
        out = work / f"{slug}-surgery"
        s = run(name, "surgery", [sys.executable, "-m", "surgery.cli", "apply", str(plan), "-o", str(out), "-q", "--force"], out)
        shutil.rmtree(out, ignore_errors=True)
        if mergekit and mk_text:
            cfg = work / f"{slug}-mergekit.yml"
            cfg.write_text(mk_text)
            mout = work / f"{slug}-mergekit"
            m = run(name, "mergekit", [mergekit, str(cfg), str(mout), "--allow-crimes"], mout)
            shutil.rmtree(mout, ignore_errors=True)
            if not m["rc"] and not s["rc"]:
                s["speedup_vs_mergekit"] = m["wall_s"] / s["wall_s"]
    shutil.rmtree(work / "cp-out", ignore_errors=True)

    cp = next((r for r in results if r["tool"] == "cp -r"), None)
    for r in results:
        if cp and r["tool"] == "surgery" and r.get("gb_per_s"):
            r["gb_per_s_vs_cp"] = r["gb_per_s"] / cp["gb_per_s"]
    meta = {"size": args.size, "input_bytes": in_bytes, "when": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "page_cache": "cold (first run)" if args.cold else "warm (one untimed run first)", "results": results}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{args.size}-{stamp}.json").write_text(json.dumps(meta, indent=2))
    lines = [f"# surgery apply benchmark ({args.size}, {in_bytes / 1e9:.2f} GB input, {meta['page_cache']})", "",
             "| case | tool | wall s | GB/s out | peak RSS MB | vs cp (GB/s) | speed-up vs mergekit |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['case']} | {r['tool']} | {r['wall_s']:.2f} | {(r['gb_per_s'] or 0):.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r.get('gb_per_s_vs_cp', float('nan')):.2f} | {r.get('speedup_vs_mergekit', float('nan')):.2f} |")
    md = "\n".join(lines) + "\n"
    (out_dir / f"{args.size}-{stamp}.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
