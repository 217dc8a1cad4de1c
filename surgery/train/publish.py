"""The run's output: the model in the input's dtype, metrics.jsonl, loss.png, train.json, TensorBoard
logs and a model card, written into the staging folder and published only when whole."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from surgery.io.outdir import OutputFolder
from surgery.io.provenance import read_provenance
from surgery.train.config import Config
from surgery.train.dist import barrier, is_main, world_size
from surgery.train.stages import Stage


@dataclass
class TrainResult:
    path: Path | None  # None when stopped early (--stop-after) with a checkpoint to resume from
    steps: int
    tokens: int
    eval_loss: float | None
    perplexity: float | None
    seconds: float
    trainable_params: int
    total_params: int
    stages: list[dict] = field(default_factory=list)
    flops: float = 0.0  # training FLOPs of the whole run (each stage at its own size)


def stage_model(stage: Stage, work: Path) -> dict:
    """What train.json says a stage trained: the input model's path, or for a grown stage (whose
    folder is deleted with the run's work folder) what stays true: where it came from, and the
    grown checkpoint's shards as surgery.json recorded them (names, sizes, header sha256, CRC-32)."""
    if stage.index == 1 or stage.model_dir is None or work not in Path(stage.model_dir).parents:
        return {"model": str(stage.model_dir)}
    out: dict = {"model": f"grown from stage {stage.index - 1}'s model at step {stage.step_offset} by the grow plan (config.grow)"}
    rec = read_provenance(stage.model_dir)
    if rec is not None:
        output = rec.output or {}
        out["grown"] = {k: output.get(k) for k in ("num_layers", "parameters", "shards")}
        out["grown"]["layer_map"] = rec.layer_map_dicts()
        if rec.growth_operator:  # G_learn: the learned operator that made the weights
            out["grown"]["growth_operator"] = rec.growth_operator
    return out


def write_output(cfg: Config, trainer, model_dir: Path, work: Path, folder: OutputFolder, res: TrainResult, echo=print) -> None:
    import torch

    b = cfg.body
    out, staging = folder.out, folder.staging
    if is_main():
        folder.fresh_staging()
    dtype = b.save_dtype
    if dtype == "auto":
        dtype = str(getattr(source_config(model_dir), "dtype", None) or "float32").removeprefix("torch.")
    trainer.save_dtype = getattr(torch, dtype, torch.float32)  # DDP and FSDP alike: cast in the saved state dict
    trainer.save_model(str(staging))
    barrier()
    if not is_main():
        return
    cfg_path = staging / "config.json"
    config = json.loads(cfg_path.read_text())
    if config.get("dtype") != dtype:  # save_pretrained records the in-memory (fp32 master) dtype
        config["dtype"] = dtype
        cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; the settings are in train.json
    shutil.copy(work / "metrics.jsonl", staging / "metrics.jsonl")
    if (work / "logs").is_dir():  # report_to: tensorboard's event files
        shutil.copytree(work / "logs", staging / "logs")
    from surgery.train.plot import loss_curve

    plotted = loss_curve(work / "metrics.jsonl", staging / "loss.png", title=out.name)
    from importlib.util import find_spec

    if not plotted and find_spec("matplotlib") is None:
        echo("warning: loss.png was not drawn: matplotlib is not installed (pip install matplotlib, or 'surgery[train]')")
    summary = {
        "format": "surgery-train/1",
        "config": b.model_dump(mode="json"),
        "config_source": cfg.source,
        "model": str(model_dir),
        "steps": res.steps,
        "tokens": res.tokens,
        "eval_loss": res.eval_loss,
        "perplexity": res.perplexity,
        "seconds": round(res.seconds, 2),
        "trainable_params": res.trainable_params,
        "params": res.total_params,
        "stages": res.stages,
        "flops": res.flops,
        "world_size": world_size(),
    }
    if getattr(trainer, "mixture", None):
        summary["mixture"] = trainer.mixture
    prov = read_provenance(model_dir)
    if prov is not None:
        summary["source_surgery"] = prov.layer_map_dicts()
    (staging / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    (staging / "README.md").write_text(_card(summary, plotted, out.name))
    folder.publish()
    shutil.rmtree(work, ignore_errors=True)


def source_config(model_dir: Path):
    import transformers

    return transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def _card(s: dict, plotted: bool, name: str) -> str:
    c = s["config"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [surgery, continued-pretraining]",
        "---",
        "",
        f"# {name}",
        "",
        f"Continued pretraining of `{s['model']}` with `surgery train`: {s['steps']:,} steps, {s['tokens']:,} tokens, "
        f"{s['trainable_params']:,} of {s['params']:,} parameters trained ({c['trainable']}).",
        "",
    ]
    if s["perplexity"] is not None:
        lines += [f"Held-out loss {s['eval_loss']:.4f}, perplexity {s['perplexity']:.3f}.", ""]
    if c.get("grow"):
        lines += [f"Grown at {c['grow']['at_tokens']:,} tokens with the plan below (schedule: {c['grow']['schedule']}).", ""]
    if plotted:
        lines += ["![loss curve](loss.png)", ""]
    lines += ["| stage | steps | layers | trainable params |", "| ---: | ---: | ---: | ---: |"]
    for st in s["stages"]:
        lines.append(f"| {st['stage']} | {st['steps']} | {st.get('layers', '')} | {st.get('trainable_params', '')} |")
    lines += ["", "## Config", "", "```json", json.dumps(c, indent=2), "```", ""]
    return "\n".join(lines)
