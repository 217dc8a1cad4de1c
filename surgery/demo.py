"""`surgery demo`: the main job on the embedded default model, offline, in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

from surgery.io.outdir import output_path
from surgery.errors import OutputError

PLANS = {
    "llama-pro.yaml": """\
# LLaMA Pro: after each group of 2 blocks, insert a copy of the group's top block whose
# attention and MLP output projections are zero. 4 -> 6 layers, and the same function.
models: {base: ./tiny-llama}
steps:
  - take: {model: base}
  - expand: {groups: 2, per_group: 1, init: identity}
output: {path: ./out-llama-pro}
""",
    "solar-dus.yaml": """\
# SOLAR depth up-scaling: two copies of the stack, m layers trimmed at the seam: s = 2 * (n - m).
models: {base: ./tiny-llama}
steps:
  - take: {model: base}
  - dus: {trim: 1}          # [0, 3) + [1, 4): 6 layers
output: {path: ./out-solar-dus}
""",
    "gstack.yaml": """\
# Gstack (G_direct): the whole stack repeated g = 4 times: 0..3, 0..3, 0..3, 0..3.
models: {base: ./tiny-llama}
steps:
  - take: {model: base}
  - stack: {times: 4}
output: {path: ./out-gstack, dtype: bfloat16}
""",
}


GROW_TRAIN = """\
# Gstack in one command: train the tiny model, stack it 4x (4 -> 16 layers) after 12K tokens,
# and keep training the grown model (optimizer and schedule reset, as in the paper).
model: ./tiny-llama
output: ./out-grow-trained
data: {files: [corpus/train.jsonl], eval_files: [corpus/eval.jsonl], seq_len: 64}
lr: 3e-3
micro_batch: 8
warmup: 4
tokens: 32768
grow:
  at_tokens: 12288
  plan:
    models: {small: TRAINED}
    steps:
      - take: {model: small}
      - stack: {times: 4}
"""


def _check_demo_folder(folder: Path) -> None:
    """--force replaces only an earlier demo folder (or an empty one): never a link, the current
    directory or one of its parents, or a folder holding anything else."""
    cwd = Path.cwd().resolve()
    if folder.is_symlink() or not folder.is_dir():
        raise OutputError(
            f"demo folder {folder} is a link or not a folder; --force replaces only an earlier demo folder", fix="choose another --dir"
        )
    real = folder.resolve()
    if real == cwd or real in cwd.parents:
        raise OutputError(f"--force would replace {folder}, which is (or contains) the current directory", fix="choose a new --dir")
    entries = {e.name for e in folder.iterdir()}
    known = set(PLANS) | {"tiny-llama", "corpus", "grow-train.yaml"}
    foreign = sorted(n for n in entries if not (n in known or n.startswith("out-") or (n.startswith(".") and ".surgery-" in n)))
    if entries and (foreign or "tiny-llama" not in entries):
        extra = foreign or sorted(entries)
        raise OutputError(
            f"--force replaces only an earlier demo folder; {folder} holds other things (e.g. {extra[0]!r})",
            fix="choose a new --dir, or remove that folder yourself",
        )


def run_demo(folder: Path, *, force: bool = False, echo=print, train: bool = True) -> dict:
    try:
        from surgery.tiny import build_tiny, logits
    except ImportError:  # pragma: no cover - the message is the point
        raise OutputError(
            "the demo builds its model with transformers, which is not installed", fix="pip install 'surgery[models]'"
        ) from None
    from surgery.api import apply, validate

    folder = Path(output_path(folder, option="--dir"))
    if folder.exists() or folder.is_symlink():
        if not force:
            raise OutputError(f"demo folder {folder} already exists", fix="pass --force to replace it, or --dir elsewhere")
        _check_demo_folder(folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    echo(f"building a tiny Llama (4 layers, hidden 32) in {folder / 'tiny-llama'}")
    build_tiny("llama", folder / "tiny-llama", seed=0)
    results = {}
    for name, text in PLANS.items():
        plan = folder / name
        plan.write_text(text)
        echo(f"\n$ surgery validate {plan}")
        report = validate(plan)
        echo(report.text())
        assert report.valid, report.text()
        res = apply(plan, progress=False)
        echo(f"$ surgery apply {plan}\nwrote {res.path} ({res.num_layers} layers, {res.bytes_written:,} bytes)")
        results[name] = res
    base = logits(folder / "tiny-llama")
    for name, res in results.items():
        out = logits(res.path)
        if name == "llama-pro.yaml":
            diff = float((out - base).abs().max())
            echo(
                f"\n{res.path.name}: loads with transformers; max |logit difference| vs the original = {diff:.3g}"
                f" ({'function preserved' if diff <= 1e-6 else 'NOT preserved'})"
            )
            if diff > 1e-6:
                raise AssertionError(f"identity expansion changed the logits by {diff}")
        else:
            echo(f"{res.path.name}: loads with transformers, logits {tuple(out.shape)}")
    if train:
        results["grow-train.yaml"] = _grow_train(folder, echo)
    echo(f"\ndone: plans, outputs (each with README.md and surgery.json) are in {folder}")
    return results


def _grow_train(folder: Path, echo):
    from importlib.util import find_spec

    if find_spec("accelerate") is None:
        echo("\n(skipped grow-then-train: `pip install 'surgery[train]'` adds `surgery train`)")
        return None
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    write_pydoc_corpus(folder / "corpus" / "train.jsonl", eval_path=folder / "corpus" / "eval.jsonl")
    cfg = folder / "grow-train.yaml"
    cfg.write_text(GROW_TRAIN)
    echo(f"\n$ surgery train {cfg}    # corpus: Python's own pydoc topics")
    res = train(cfg, progress=False, echo=echo)
    echo(
        f"wrote {res.path}: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.1f} s; held-out perplexity "
        f"{res.perplexity:.2f}; loss curve in {res.path / 'loss.png'}"
    )
    return res
