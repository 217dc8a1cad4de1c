#!/usr/bin/env python3
"""Peak memory of `surgery analyze` on a large checkpoint, against one layer's bytes.

    python bench/bench_analyze.py --size 8b      # 8B-shaped synthetic Llama (16 GB): minutes on 2 cores
    python bench/bench_analyze.py --size tiny    # a smoke run of the same code (seconds; the tests run it)
    python bench/bench_analyze.py --size 8b --drop 4   # + the held-out loss of every 4-layer block removed
    python bench/bench_analyze.py --size demo    # on the demo's trained model: is the suggested block the
                                                 # cheapest to drop on held-out text it was not chosen on?

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

SIZES = {"8b": ((4096, 32, 14336, 128256, 32, 8, False), 8, 64), "tiny": ((64, 4, 128, 512, 4, 2, False), 8, 32), "demo": None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtype", default="bfloat16", help="what the layers compute in (surgery analyze --dtype)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("SURGERY_BENCH_DIR", "/tmp/surgery-bench")))
    ap.add_argument("--drop", type=int, default=0, help="also --suggest drop:N (measures every N-block's held-out loss)")
    ap.add_argument("--png", type=Path, default=None, help="--size demo: where to draw layers.png")
    args = ap.parse_args()
    if args.size == "demo":
        return demo(args)
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
    ] + (["--suggest", f"drop:{args.drop}", "--loss-samples", str(samples)] if args.drop else [])
    if args.drop:  # the loss pass keeps one set of the samples' states per candidate block
        acts += (layers - args.drop + 2) * samples * seq * hidden * (4 if args.dtype == "float32" else 2)
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
        "drop": args.drop,
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


def demo(args) -> int:
    """Choose blocks to drop on the first half of the demo's held-out documents (by measured loss, and
    by angular distance alone), then score every block of the same size on the other half with
    transformers: where does each choice rank?"""
    import math

    import torch
    import transformers

    from surgery.analyze import analyze, plot
    from surgery.demo import run_demo

    folder = args.work / "analyze-demo"
    if not (folder / "out-grow-trained" / "train.json").exists():
        os.environ.setdefault("SURGERY_CACHE", str(args.work / "cache"))
        run_demo(folder, force=folder.exists(), echo=lambda *a: None)
    model_dir = folder / "out-grow-trained"
    docs = [json.loads(line)["text"] for line in (folder / "corpus" / "eval.jsonl").read_text().splitlines()]
    half = len(docs) // 2
    chosen_on = folder / "choose.jsonl"
    chosen_on.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:half]))
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 30
    stream = torch.tensor([i for t in docs[half:] for i in tok(t)["input_ids"]])
    seq = 64
    ids = stream[: len(stream) // seq * seq].view(-1, seq)
    t0 = time.perf_counter()
    L = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    a = analyze(model_dir, [str(chosen_on)], samples=64, seq_len=seq, drop_sizes=tuple(range(1, L)), loss_samples=64)
    wall = time.perf_counter() - t0
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = list(model.model.layers)

    def loss(start, n):
        model.model.layers = torch.nn.ModuleList(layers[:start] + layers[start + n :])
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids, use_cache=False).loss)

    full = loss(0, 0)
    print(f"analyze with every block size measured: {wall:.1f} s; chosen on {a.loss_samples} x {seq} tokens, scored on {ids.numel():,}")
    print(f"undropped perplexity on the scoring half: {math.exp(full):.3f}")
    print("| n | chosen by loss | rank | ppl | chosen by d(l, n) | rank | ppl | best on the scoring half | ppl |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | --- | ---: |")
    for n in (1, 2, 4, 8):
        scores = [loss(s, n) for s in range(L - n + 1)]
        order = sorted(range(len(scores)), key=scores.__getitem__)
        by_loss, by_d = a.best_block_by_loss()[n], a.best_block[n]
        print(
            f"| {n} | [{by_loss}, {by_loss + n}) | {order.index(by_loss) + 1} | {math.exp(scores[by_loss]):.3f} "
            f"| [{by_d}, {by_d + n}) | {order.index(by_d) + 1} | {math.exp(scores[by_d]):.3f} "
            f"| [{order[0]}, {order[0] + n}) | {math.exp(scores[order[0]]):.3f} |"
        )
    if args.png:
        plot(a, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
