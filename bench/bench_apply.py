#!/usr/bin/env python3
"""Benchmark `surgery apply` against the disk (`cp -r`) and against mergekit, in one run.

    python bench/bench_apply.py --size small                 # every case at 1/16 size: minutes on 2 cores
    python bench/bench_apply.py --size full                  # 8B and 1.7B shapes (the targets)
    python bench/bench_apply.py --size full --device cuda    # on a GPU machine; mergekit gets --cuda
    python bench/bench_apply.py --size 8b --only solar       # one case

Cases: SOLAR DUS 32 -> 48, LLaMA Pro 32 -> 40 and an upcycle into 8 experts (top-2) of the 8B shape; Gstack 4x of the 1.7B shape's
first 6 layers; gradient slerp and linear of two 1.7B-shaped models. mergekit runs the
equivalent config (for LLaMA Pro and Gstack, the one `surgery export --mergekit` writes).

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
    # 24 layers and tied embeddings like the 1.7B model, at about 1/16 of the bytes
    "small-1.7b": (512, 24, 2048, 32000, 8, 4, True),
    # the same shapes in miniature: the harness checked in the test suite in seconds
    "tiny": (64, 32, 128, 512, 4, 2, False),
    "tiny-1.7b": (64, 24, 128, 512, 4, 2, True),
}
# --size picks the two shapes the suite needs: (8B-like, 1.7B-like)
SUITES = {
    "full": ("8b", "1.7b"),
    "small": ("small", "small-1.7b"),
    "tiny": ("tiny", "tiny-1.7b"),
    "8b": ("8b", None),
    "1.7b": (None, "1.7b"),
}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


class Reaper:
    """With --reap: while surgery writes OUT, free the disk blocks of each output shard once the
    engine has recorded it as done (written, fsynced, hashed: `.surgery-shards.json` in the side
    folder), keeping its size as a hole. Every byte still goes to the disk and is made durable
    before it is freed, so the rate is the real one; only the space is given back, which lets an
    output larger than the free disk (the 8B shape into 8 experts: 95 GB) be timed."""

    def __init__(self, out: Path | None):
        import threading

        self.side = out.parent / f".{out.name}.surgery-partial" if out is not None else None
        self.stop = threading.Event()
        self.freed = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.side is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.side is not None:
            self.thread.join()

    def _loop(self):
        seen: set[str] = set()
        while not self.stop.wait(0.2):
            try:
                done = json.loads((self.side / ".surgery-shards.json").read_text()).get("done", {})
            except (OSError, ValueError):
                continue
            for name in set(done) - seen:
                f = self.side / name
                try:
                    size = f.stat().st_size
                    os.truncate(f, 0)
                    os.truncate(f, size)
                except OSError:
                    continue
                seen.add(name)
                self.freed += size


REAP_ENTRY = "import sys, surgery.engine.write as w; w._check_space = lambda *a: None; from surgery.cli import main; main()"


def timed(cmd: list[str], env=None, reap: Path | None = None) -> dict:
    stats = Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp")) / f".stats-{os.getpid()}.json"
    stats.unlink(missing_ok=True)
    env = {**os.environ, **(env or {})}
    if "apply" in cmd:  # surgery writes what a process cannot see from outside (peak GPU memory)
        cmd = cmd + ["--stats-json", str(stats)]
    with Reaper(reap):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    rc = os.waitstatus_to_exitcode(status)
    gpu = json.loads(stats.read_text()).get("peak_gpu_mb") if stats.exists() else None
    return {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss / 1024, "peak_gpu_mb": gpu, "rc": rc, "stderr_tail": err[-800:] if rc else ""}


def cases(big: Path | None, mid: Path | None, mid_b: Path | None, big_layers: int, device: str):
    """(name, surgery input (plan or mergekit config), mergekit config or None, mergekit extra args)."""
    out = []
    if big is not None:
        n, m = big_layers, big_layers // 4
        out.append(
            (
                f"solar-dus {n}->{2 * (n - m)}",
                "solar",
                f"models: {{base: {big}}}\nsteps:\n  - take: {{model: base}}\n  - dus: {{trim: {m}}}\n",
                f"slices:\n  - sources: [{{model: {big}, layer_range: [0, {n - m}]}}]\n"
                f"  - sources: [{{model: {big}, layer_range: [{m}, {n}]}}]\nmerge_method: passthrough\ndtype: bfloat16\n",
            )
        )
        out.append(
            (
                f"llama-pro {n}->{n + n // 4}",
                "llamapro",
                f"models: {{base: {big}}}\nsteps:\n  - take: {{model: base}}\n  - expand: {{groups: {n // 4}, init: identity}}\n"
                "post_from: last\n",
                "export",
            )
        )
        out.append(
            (
                f"upcycle {n} MLPs -> 8 experts",
                "upcycle",
                f"models: {{base: {big}}}\nsteps:\n  - take: {{model: base}}\n  - upcycle: {{experts: 8, top_k: 2}}\n",
                None,  # mergekit-moe takes a config of its own (not compared here)
            )
        )
    if mid is not None:
        out.append(
            (
                "gstack 4x first 6 layers",
                "gstack",
                f"models: {{small: {mid}}}\nsteps:\n  - take: {{model: small, layers: [0, 6]}}\n  - stack: {{times: 4}}\npost_from: last\n",
                "export",
            )
        )
        slerp = (
            f"slices:\n  - sources:\n      - {{model: {mid}, layer_range: [0, 24]}}\n"
            f"      - {{model: {mid_b}, layer_range: [0, 24]}}\nmerge_method: slerp\nbase_model: {mid}\n"
            "parameters:\n  t:\n    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}\n"
            "    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}\n    - {value: 0.5}\ndtype: bfloat16\n"
        )
        out.append((f"gradient-slerp ({device})", "slerp", slerp, slerp))
        linear = (
            f"models:\n  - {{model: {mid}, parameters: {{weight: 0.5}}}}\n  - {{model: {mid_b}, parameters: {{weight: 0.5}}}}\n"
            "merge_method: linear\ndtype: bfloat16\n"
        )
        out.append((f"linear ({device})", "linear", linear, linear))
    return out


def build(folder: Path, shape: tuple, seed: int):
    if not (folder / "model.safetensors.index.json").exists():
        print(f"building synthetic checkpoint {shape} in {folder} ...", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; from surgery.synthetic import write_synthetic_llama as w; w(sys.argv[1], {shape!r}, seed={seed})",
                str(folder),
            ],
            check=True,
            cwd=HERE.parent,
        )
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size", choices=sorted(SUITES), default="small", help="full: 8B and 1.7B shapes (the targets); small: the same cases at 1/16 size"
    )
    ap.add_argument("--pipeline", choices=["off", "on"], default="off", help="surgery's device staging (apply --pipeline)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")))
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per command (the best is reported)")
    ap.add_argument("--cold", action="store_true", help="do not warm the page cache first")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated case keys: solar, llamapro, gstack, slerp, linear")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON and Markdown tables go")
    ap.add_argument("--device", default="cpu", help="device for surgery's computed recipes (cpu, cuda); mergekit gets --cuda")
    ap.add_argument(
        "--reap",
        action="store_true",
        help="free each surgery output shard's blocks once it is written, fsynced and hashed (outputs larger than the free disk)",
    )
    args = ap.parse_args()

    big_size, mid_size = SUITES[args.size]
    only = set(args.only.split(",")) if args.only else None
    want = lambda *keys: only is None or any(k in only for k in keys)  # noqa: E731
    work = args.work
    big = build(work / big_size / "src", SIZES_BENCH[big_size], 0) if big_size and want("solar", "llamapro", "upcycle") else None
    mid = build(work / mid_size / "src", SIZES_BENCH[mid_size], 0) if mid_size and want("gstack", "slerp", "linear") else None
    mid_b = build(work / mid_size / "src-b", SIZES_BENCH[mid_size], 1) if mid_size and want("slerp", "linear") else None
    mergekit = shutil.which("mergekit-yaml") if not args.no_mergekit else None
    results = []

    def run(label: str, kind: str, cmd: list[str], out: Path | None, baseline_bytes: int | None = None):
        best = None
        for k in range(args.repeat + (0 if args.cold else 1)):
            if out is not None and out.exists():
                shutil.rmtree(out)
            r = timed(cmd, reap=out if args.reap and kind == "surgery" else None)
            if r["rc"]:
                print(f"  {label}: FAILED rc={r['rc']}\n{r['stderr_tail']}", flush=True)
                best = r
                break
            if k == 0 and not args.cold:
                continue  # warm-up run
            if best is None or r["wall_s"] < best["wall_s"]:
                best = r
        nbytes = baseline_bytes if baseline_bytes is not None else (folder_bytes(out) if out and out.exists() else 0)
        row = {
            "case": label,
            "tool": kind,
            "bytes": nbytes,
            **best,
            "gb_per_s": nbytes / best["wall_s"] / 1e9 if best and not best["rc"] else None,
        }
        results.append(row)
        print(
            f"  {label:<28} {kind:<10} {row['wall_s']:8.2f} s  {row['peak_rss_mb']:8.0f} MB RSS  {(row['gb_per_s'] or 0):6.2f} GB/s",
            flush=True,
        )
        return row

    if big is not None:
        in_bytes = folder_bytes(big)
        print(f"8B-like input: {in_bytes / 1e9:.2f} GB", flush=True)
        run("read inputs", "cat", ["sh", "-c", f"cat {big}/*.safetensors > /dev/null"], None, in_bytes)
        run("copy source", "cp -r", ["cp", "-r", str(big), str(work / "cp-out")], work / "cp-out")
        shutil.rmtree(work / "cp-out", ignore_errors=True)
    scratch = work / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    n_big = SIZES_BENCH[big_size][1] if big_size else 0
    for name, key, text, mk_text in cases(big, mid, mid_b, n_big, args.device):
        if not want(key):
            continue
        plan = scratch / f"{key}.yaml"  # surgery reads plans and mergekit configs alike
        plan.write_text(text)
        out = scratch / f"{key}-surgery"
        # with --reap the output may be larger than the free disk: the up-front free-space check is skipped
        entry = ["-c", REAP_ENTRY] if args.reap else ["-m", "surgery.cli"]
        s = run(
            name,
            "surgery",
            [
                sys.executable,
                *entry,
                "apply",
                str(plan),
                "-o",
                str(out),
                "-q",
                "--force",
                "--device",
                args.device,
                "--pipeline",
                args.pipeline,
            ],
            out,
        )
        shutil.rmtree(out, ignore_errors=True)
        if mk_text == "export":  # the equivalent mergekit config, written by surgery itself
            p = subprocess.run(
                [sys.executable, "-m", "surgery.cli", "export", "--mergekit", str(plan)], capture_output=True, text=True, check=True
            )
            mk_text = p.stdout
        if mergekit and mk_text:
            cfg = scratch / f"{key}-mergekit.yml"
            cfg.write_text(mk_text)
            mout = scratch / f"{key}-mergekit"
            m = run(name, "mergekit", [mergekit, str(cfg), str(mout)] + (["--cuda"] if args.device != "cpu" else []), mout)
            shutil.rmtree(mout, ignore_errors=True)
            if not m["rc"] and not s["rc"]:
                s["speedup_vs_mergekit"] = m["wall_s"] / s["wall_s"]
    cp = next((r for r in results if r["tool"] == "cp -r"), None)
    for r in results:
        if cp and r["tool"] == "surgery" and r.get("gb_per_s"):
            r["gb_per_s_vs_cp"] = r["gb_per_s"] / cp["gb_per_s"]
    meta = {
        "size": args.size,
        "device": args.device,
        "when": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "page_cache": "cold (first run)" if args.cold else "warm (one untimed run first)",
        "reap": args.reap,
        "results": results,
    }
    out_dir = args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out_dir / f"{args.size}-{stamp}.json").write_text(json.dumps(meta, indent=2))
    lines = [
        f"# surgery apply benchmark ({args.size}, device {args.device}, {meta['page_cache']})",
        "",
        "| case | tool | wall s | GB/s out | peak RSS MB | peak GPU MB | vs cp (GB/s) | speed-up vs mergekit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-"
        vs_cp = f"{r['gb_per_s_vs_cp']:.2f}" if r.get("gb_per_s_vs_cp") is not None else "-"
        vs_mk = f"{r['speedup_vs_mergekit']:.2f}" if r.get("speedup_vs_mergekit") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['tool']} | {r['wall_s']:.2f} | {(r['gb_per_s'] or 0):.2f} | {r['peak_rss_mb']:.0f} | {gpu} | "
            f"{vs_cp} | {vs_mk} |"
        )
    md = "\n".join(lines) + "\n"
    (out_dir / f"{args.size}-{stamp}.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
