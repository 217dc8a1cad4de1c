#!/usr/bin/env python3
"""Training throughput of `surgery train` against a plain HF Trainer loop, in one run.

    python bench/bench_train.py --size 1.1b            # on a GPU machine (the issue's target)
    python bench/bench_train.py --size 1.1b --compile  # also the torch.compile variants
    python bench/bench_train.py --size tiny            # a CPU smoke run of the same code (seconds)

Model: a Llama of 2048 hidden, 16 layers, 8192 intermediate, 32 heads (8 KV), 32000 vocab (1.10B,
untied embeddings), random init, seq
2048, bf16 autocast over fp32 master weights (precision: auto on a GPU). Data: random words of
a 32000-word WordLevel tokenizer, tokenized once by surgery's data pipeline (so surgery's and
the baseline's batches come from the same packed token cache).

Reported per variant: tokens/s (median over the logged intervals after the first quarter of the
run, so compilation and warm-up are excluded), MFU = tokens/s * (6N + 12 L d seq) / peak, peak
GPU memory. Peak is 989 TFLOP/s (H100 SXM dense bf16) unless --peak-tflops.
Results: bench/results/train-<size>-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # hidden, layers, intermediate, vocab, heads, kv heads, seq, micro batch, steps
    "1.1b": (2048, 16, 8192, 32000, 32, 8, 2048, 8, 60),
    "tiny": (64, 2, 128, 512, 4, 2, 64, 4, 12),
}


def build(root: Path, size: str) -> tuple[Path, Path]:
    import random

    import transformers

    h, L, inter, vocab, heads, kv, seq, mb, steps = SIZES[size]
    model_dir = root / f"llama-{size}"
    if not (model_dir / "config.json").exists():
        cfg = transformers.LlamaConfig(
            hidden_size=h,
            num_hidden_layers=L,
            intermediate_size=inter,
            vocab_size=vocab,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=seq,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
        words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
        tok = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "normalizer": None,
            "post_processor": None,
            "decoder": None,
            "added_tokens": [
                {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
                for c, i in list(words.items())[:3]
            ],
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "model": {"type": "WordLevel", "vocab": words, "unk_token": "<pad>"},
        }
        (model_dir / "tokenizer.json").write_text(json.dumps(tok))
        (model_dir / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
        )
    data = root / f"words-{size}.jsonl"
    if not data.exists():
        rng = random.Random(0)
        n_docs = 2000 if size != "tiny" else 200
        with open(data, "w") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(rng.randrange(500, 3000)))}) + "\n")
    return model_dir, data


def flops_per_token(size: str) -> float:
    h, L, inter, vocab, heads, kv, seq, *_ = SIZES[size]
    head = h // heads
    n = 2 * vocab * h + L * (h * h * 2 + 2 * h * kv * head + 3 * h * inter + 2 * h) + h  # embeddings + lm_head included
    return 6 * n + 12 * L * h * seq, n


def run_surgery(root: Path, size: str, model_dir: Path, data: Path, compile_: bool) -> dict:
    h, L, inter, vocab, heads, kv, seq, mb, steps = SIZES[size]
    cfg = root / f"train-{size}{'-compile' if compile_ else ''}.yaml"
    out = root / f"out-{size}{'-compile' if compile_ else ''}"
    cfg.write_text(
        f"model: {model_dir}\noutput: {out}\ndata: {{files: [{data}], seq_len: {seq}, eval_fraction: 0}}\n"
        f"steps: {steps}\nmicro_batch: {mb}\nlr: 3e-4\nwarmup: 2\nlog_every: 2\nsave_every: 100000\n"
        f"compile: {str(compile_).lower()}\n"
    )
    env = {**os.environ, "SURGERY_CACHE": str(root / "cache")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "surgery", "train", str(cfg), "--force", "-q"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"surgery train failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in recs if x.get("tokens_per_s")]
    return {"wall_s": round(wall, 1), "tokens_per_s": statistics.median(rates[len(rates) // 4 :] or rates)}


BASELINE = r"""
import json, statistics, sys, time, torch, transformers
from pathlib import Path
from surgery.train.config import config_from_text
from surgery.train.data import build_corpus
model_dir, data, seq, mb, steps, compile_, cache = sys.argv[1:8]
seq, mb, steps = int(seq), int(mb), int(steps)
import os; os.environ["SURGERY_CACHE"] = cache
cfg = config_from_text(f"model: {model_dir}\ndata: {{files: [{data}], seq_len: {seq}, eval_fraction: 0}}\nsteps: {steps}\n")
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
corpus = build_corpus(cfg, tok, Path(model_dir))
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
bf16 = torch.cuda.is_available()
args = transformers.TrainingArguments(output_dir=cache + "/baseline", per_device_train_batch_size=mb, max_steps=steps,
    learning_rate=3e-4, logging_steps=2, save_strategy="no", report_to=[], bf16=bf16, torch_compile=compile_ == "1",
    disable_tqdm=True, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
times = []
class T(transformers.TrainerCallback):
    def on_step_end(self, a, s, c, **k):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        times.append(time.perf_counter())
tr = transformers.Trainer(model=model, args=args, train_dataset=corpus.train,
                              data_collator=transformers.default_data_collator, callbacks=[T()])
tr.train()
dts = [b - a for a, b in zip(times, times[1:])][steps // 4:]
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
print(json.dumps({"tokens_per_s": mb * seq / statistics.median(dts), "peak_gpu_gib": peak}))
"""


def run_baseline(root: Path, size: str, model_dir: Path, data: Path, compile_: bool) -> dict:
    h, L, inter, vocab, heads, kv, seq, mb, steps = SIZES[size]
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            BASELINE,
            str(model_dir),
            str(data),
            str(seq),
            str(mb),
            str(steps),
            "1" if compile_ else "0",
            str(root / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(f"baseline failed:\n{r.stderr[-4000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), **json.loads(r.stdout.strip().splitlines()[-1])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="1.1b")
    ap.add_argument("--compile", action="store_true", help="also run both with torch.compile")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "surgery-bench-train")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON and Markdown tables go")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model_dir, data = build(a.work, a.size)
    fpt, n = flops_per_token(a.size)
    rows = []
    for compile_ in [False, True] if a.compile else [False]:
        for name, fn in (("HF Trainer (plain)", run_baseline), ("surgery train", run_surgery)):
            res = fn(a.work, a.size, model_dir, data, compile_)
            res.update(variant=name + (" + compile" if compile_ else ""), mfu=res["tokens_per_s"] * fpt / (a.peak_tflops * 1e12))
            rows.append(res)
            print(f"{res['variant']:32s} {res['tokens_per_s']:>12,.0f} tokens/s  MFU {res['mfu']:.3f}", flush=True)
    import torch

    meta = {
        "size": a.size,
        "params": n,
        "flops_per_token": fpt,
        "peak_tflops": a.peak_tflops,
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "time": dt.datetime.now().isoformat(timespec="seconds"),
    }
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.results
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-{a.size}-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = [
        f"# surgery train throughput ({a.size}, {meta['device']}, {meta['time']})",
        "",
        f"{n / 1e9:.3f}B parameters, {fpt / 1e9:.2f} GFLOP per token, peak {a.peak_tflops} TFLOP/s",
        "",
        "| variant | tokens/s | MFU | wall s |",
        "| --- | ---: | ---: | ---: |",
    ]
    md += [f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | {r['wall_s']} |" for r in rows]
    (out / f"train-{a.size}-{stamp}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
