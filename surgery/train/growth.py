"""Growth inside a run: the grow plan applied to the trained small model (atomically, resumable), and
G_learn's operator learned on the data that follows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from surgery.io.provenance import read_provenance
from surgery.train.config import Config
from surgery.train.dist import barrier, is_main, world_size
from surgery.train.metrics import write_record
from surgery.train.stages import Stage, load_grow_plan


def grow_model(cfg: Config, prev: Stage, work: Path, tps: int, echo) -> Path:
    """Apply the grow plan to the previous stage's final model (rank 0), everyone waits for it.

    `work/grown` exists only once the grown model is final: the plan's output is published by
    `apply` atomically, and a learned operator (G_learn) works on a copy that is renamed into place
    when its weights are written. A kill anywhere is repaired by the next --resume: a published
    plan output is reused, a half-learned copy discarded and the (deterministic) learning redone.
    Metrics records are appended once, whatever the kills."""
    from surgery.api import apply

    g = cfg.body.grow
    grown = work / "grown"
    if is_main() and not (grown / "config.json").exists():
        target = work / "grown-plan" if g.learns else grown
        done = read_provenance(target) if (target / "config.json").exists() else None
        if done is not None:  # the plan's output, whole (apply publishes it atomically)
            info = done.output or {}
            layers, params = info.get("num_layers"), info.get("parameters")
        else:
            res = apply(load_grow_plan(cfg, work / f"stage-{prev.index}" / "final"), target, force=True, progress=False)
            layers, params = res.num_layers, res.num_params
        echo(
            f"grew the model at step {prev.steps} ({prev.steps * tps:,} tokens): {layers} layers, {params:,} parameters; "
            f"optimizer and schedule {'continue' if g.schedule == 'continue' else 'reset'}"
        )
        record = {
            "step": prev.steps,
            "stage": prev.index + 1,
            "tokens": prev.steps * tps,
            "flops": prev.flops_at(prev.step_offset + prev.steps, tps),
            "event": "grow",
            "layers": layers,
            "params": params,
        }
        if g.learns:
            learning = work / "grown.learning"
            shutil.rmtree(learning, ignore_errors=True)  # an interrupted attempt: start it over
            shutil.copytree(target, learning)
            learned = _learn_operator(cfg, prev, learning, tps, echo)
            learning.rename(grown)
            append_events(work / "metrics.jsonl", [record, learned])
        else:
            append_events(work / "metrics.jsonl", [record])
    barrier()
    return grown


def append_events(path: Path, records: list[dict]) -> None:
    """Append event records to metrics.jsonl unless a resumed run wrote them already."""
    have = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "event" in r:
                have.add((r.get("event"), r.get("stage"), r.get("step")))
    for r in records:
        if (r["event"], r["stage"], r["step"]) not in have:
            write_record(path, r)


def _learn_operator(cfg: Config, prev: Stage, grown: Path, tps: int, echo) -> dict:
    """G_learn: train LiGO's operator (depth, and width when the plan widens) on the data that follows stage `prev` (its own steps,
    before the grown model's), write the grown weights into `grown`; the metrics record of it."""
    import torch
    import transformers

    from surgery.train.data import build_corpus
    from surgery.train.flops import flops_per_token
    from surgery.train.ligo import learn_growth

    b, g = cfg.body, cfg.body.grow
    per_step = b.micro_batch * b.grad_accum * world_size()
    tok = transformers.AutoTokenizer.from_pretrained(grown, trust_remote_code=False)
    corpus = build_corpus(cfg, tok, grown, sequences=g.learn_steps * per_step, start=(prev.step_offset + prev.steps) * per_step)
    loader = torch.utils.data.DataLoader(
        corpus.train, batch_size=b.micro_batch * b.grad_accum, shuffle=False, collate_fn=transformers.default_data_collator
    )
    torch.manual_seed(b.seed)
    rec = learn_growth(
        grown.parent / f"stage-{prev.index}" / "final",
        grown,
        loader,
        steps=g.learn_steps,
        lr=g.learn_lr,
        where=cfg.where("grow", "operator"),
        echo=echo,
        variant="paper" if g.operator == "learn" else "split",
        seed=b.seed,
    )
    return {
        "step": prev.step_offset + prev.steps,
        "stage": prev.index + 1,
        "tokens": (prev.step_offset + prev.steps) * tps,
        "event": "learn-operator",
        "learn_steps": g.learn_steps,
        "learn_tokens": g.learn_steps * tps,
        "learn_flops": g.learn_steps * tps * flops_per_token(grown, b.data.seq_len)["flops_per_token"],
        "loss_before": rec["loss_before"],
        "loss_after": rec["loss_after"],
    }
