#!/usr/bin/env python3
"""Peak memory of `surgery analyze` on a large checkpoint, against one layer's bytes.

    python bench/bench_analyze.py --size 8b      # 8B-shaped synthetic Llama (16 GB): minutes on 2 cores
    python bench/bench_analyze.py --size tiny    # a smoke run of the same code (seconds; the tests run it)

The checkpoint is synthetic (random bf16 values, surgery.synthetic), with a small byte-level
tokenizer; the data is the pydoc corpus. Reported: wall time, peak RSS of the `surgery analyze`
process (wait4), one decoder layer's bytes on disk, the activations held (samples x seq x hidden x
4 bytes x 2 depths), and the ratio (peak - the imports' own RSS) / (layer + activations), whose
target is <= 2.5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"8b": ((4096, 32, 14336, 128256, 32, 8, False), 8, 64), "tiny": ((64, 4, 128, 512, 4, 2, False), 8, 32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtype", default="bfloat16", help="what the layers compute in (surgery analyze --dtype)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")))
    args = ap.parse_args()
    shape, samples, seq = SIZES[args.size]
    from surgery.synthetic import write_synthetic_llama
    from surgery.tiny import _write_tokenizer
    from surgery.train.corpus import write_pydoc_corpus

    src = args.work / f"analyze-{args.size}" / "model"
    if not (src / "config.json").exists():
        print(f"building synthetic checkpoint {shape} in {src} ...", flush=True)
        write_synthetic_llama(src, shape, dtype="bfloat16")
    if not (src / "tokenizer.json").exists():
        _write_tokenizer(src, 128)
    data = args.work / f"analyze-{args.size}" / "data.jsonl"
    if not data.exists():
        write_pydoc_corpus(data)
    hidden, layers, inter, vocab, heads, kv, _ = shape
    head_dim = hidden // heads
    layer_params = hidden * (heads * head_dim) * 2 + hidden * (kv * head_dim) * 2 + 3 * hidden * inter + 2 * hidden
    layer_bytes = layer_params * (4 if args.dtype == "float32" else 2)  # the layer as it is computed
    acts = samples * seq * hidden * 4 * 2
    cmd = [
        sys.executable,
        "-m",
        "surgery.cli",
        "analyze",
        str(src),
        "--data",
        str(data),
        "--samples",
        str(samples),
        "--seq-len",
        str(seq),
        "--micro-batch",
        "4",
        "--format",
        "json",
        "--device",
        "cpu",
        "--dtype",
        args.dtype,
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status):
        print(err.decode()[-3000:])
        return 1
    doc = json.loads(out)
    peak = ru.ru_maxrss * 1024
    # the process's own floor (Python, torch, transformers imported): a one-layer run of a tiny model
    floor_cmd = [sys.executable, "-c", "import surgery.analyze, transformers, accelerate, surgery.train.data"]
    q = subprocess.Popen(floor_cmd)
    _, _, ru0 = os.wait4(q.pid, 0)
    floor = ru0.ru_maxrss * 1024
    row = {
        "size": args.size,
        "dtype": args.dtype,
        "layers": layers,
        "samples": samples,
        "seq_len": seq,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak / 2**20),
        "layer_mb": round(layer_bytes / 2**20),
        "activations_mb": round(acts / 2**20),
        "import_floor_mb": round(floor / 2**20),
        "ratio": round((peak - floor) / (layer_bytes + acts), 2),
        "best_block_1": doc["best_block"].get("1"),
    }
    print(json.dumps(row))
    # the checkpoint's own size, for scale
    print(
        f"checkpoint {sum(f.stat().st_size for f in src.glob('*.safetensors')) / 2**30:.2f} GiB; "
        f"peak RSS {row['peak_rss_mb']} MB, of which {row['peak_rss_mb'] - row['import_floor_mb']} MB above the "
        f"imports' {row['import_floor_mb']} MB = {row['ratio']} x (one layer {row['layer_mb']} MB + activations "
        f"{row['activations_mb']} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
