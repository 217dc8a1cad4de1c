"""A run as stages: one, or two around a growth (`grow:`), each with its steps, its place on the LR
schedule and in the run's data order; and the grow plan, loaded and checked before anything trains."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import PlanError
from surgery.train.config import Config
from surgery.train.dist import world_size


@dataclass
class Stage:
    index: int
    model_dir: Path | None  # None: the grown model, made when the previous stage ends
    steps: int  # optimizer steps in this stage
    trainable: object
    schedule_steps: int  # the length of the LR schedule this stage follows
    schedule_offset: int  # where on that schedule this stage starts
    step_offset: int  # optimizer steps taken before this stage (for metrics)
    run_steps: int = 0  # optimizer steps of the whole run (all stages)
    flops_per_token: int = 0  # training FLOPs per token at this stage's size (surgery.train.flops)
    flops_offset: float = 0.0  # training FLOPs of the stages before this one
    data_offset: int = 0  # steps of data read before this stage beyond step_offset (a learned growth operator's)
    router_aux_loss_coef: float | None = None  # a mixture of experts' load-balancing loss in training (None: dense)

    def flops_at(self, step: int, tps: int) -> float:
        """Cumulative training FLOPs of the run at global step `step` (inside this stage)."""
        return self.flops_offset + (step - self.step_offset) * tps * self.flops_per_token


def plan_stages(cfg: Config, model_dir: Path) -> tuple[list[Stage], int]:
    b = cfg.body
    tps = b.micro_batch * b.data.seq_len * b.grad_accum * world_size()
    total = b.steps if b.steps is not None else math.ceil(b.tokens / tps)
    if b.grow is None:
        return [Stage(1, model_dir, total, b.trainable, total, 0, 0, total)], tps
    at = math.ceil(b.grow.at_tokens / tps)
    if at >= total:
        raise PlanError(
            f"grow.at_tokens ({b.grow.at_tokens:,} tokens = {at} steps of {tps:,} tokens) is not before the end of the run ({total} steps)",
            where=cfg.where("grow", "at_tokens"),
            fix="grow earlier or raise the budget (`tokens` / `steps`)",
        )
    keep = b.grow.schedule == "continue"
    if b.grow.mask_steps is not None and b.grow.mask_steps > total - at:
        raise PlanError(
            f"grow.mask_steps {b.grow.mask_steps} is longer than the {total - at} steps after growth: the saved "
            "model would still have its new layers partly masked",
            where=cfg.where("grow", "mask_steps"),
            fix=f"use mask_steps <= {total - at}",
        )
    return [
        Stage(1, model_dir, at, "all", total if keep else at, 0, 0, total),
        Stage(2, None, total - at, b.grow.trainable or b.trainable, total if keep else total - at, at if keep else 0, at, total),
    ], tps


def check_grown(cfg: Config, program, after: int) -> None:
    """Everything stage 2 (`after` steps) will need from the grow plan, checked when the run starts
    (not after stage 1 has trained): masks need something new to fade in and time to end within the
    run, `new-layers` needs new layers and `new-params` a widen."""
    from surgery.train.masks import mask_stages, require_new

    g, b = cfg.body.grow, cfg.body
    widened = program.widened()
    new_units = bool(widened) and widened.get("init") in ("zero", "random")
    if g.mask_steps is not None:
        require_new(bool(program.new_layers), new_units, cfg.where("grow", "mask_steps"))
        sizes = widened.get("sizes", {}) if new_units else {}
        n = 1 + max(mask_stages(sizes, bool(program.new_layers), g.masks).values(), default=0)
        if n * g.mask_steps > after:
            raise PlanError(
                f"grow.mask_steps {g.mask_steps} x {n} stages (MSG's: MLP units, then the stream, then heads) is longer than "
                f"the {after} steps after growth: the saved model would still be partly masked",
                where=cfg.where("grow", "mask_steps"),
                fix=f"use mask_steps <= {after // n}, or `masks: together` (every mask over the same mask_steps)",
            )
    trainable = g.trainable or b.trainable
    where = cfg.where("grow", "trainable") if g.trainable else cfg.where("trainable")
    if trainable == "new-layers" and not program.new_layers:
        raise PlanError(
            "trainable: new-layers after growth, but the grow plan adds no new layers (stacked or copied layers are not new)",
            where=where,
            fix="grow with `expand` (LLaMA Pro) or `gstack: {operator: zero|random}`, or train all layers",
        )
    if trainable == "new-params" and not widened:
        raise PlanError(
            "trainable: new-params after growth, but the grow plan has no `widen` step: no parameter grew",
            where=where,
            fix="add a `widen` step to the grow plan, or use all / new-layers / patterns",
        )


def load_grow_plan(cfg: Config, model_path: Path):
    """The growth plan with its one model pointed at `model_path`."""
    from surgery.plan import plan_from_doc
    from surgery.plan.yamlio import Located, load_yaml_file

    g = cfg.body.grow
    if isinstance(g.plan, str):
        src = cfg.path(g.plan)
        if not src.is_file():
            raise PlanError(f"grow plan not found: {src}", where=cfg.where("grow", "plan"))
        doc, base = load_yaml_file(src), src.parent
    else:
        pre = ("grow", "plan")
        doc = Located(g.plan, cfg.doc.source, {k[2:]: v for k, v in cfg.doc.lines.items() if k[:2] == pre})
        base = cfg.base_dir
    models = doc.data.get("models") if isinstance(doc.data, dict) else None
    if not isinstance(models, dict) or len(models) != 1:
        raise PlanError(
            "a grow plan names exactly one model (the one being trained; its path is filled in)",
            where=doc.where(("models",)),
            fix="write e.g. `models: {small: TRAINED}`",
        )
    data = dict(doc.data)
    data["models"] = {next(iter(models)): str(model_path)}
    return plan_from_doc(Located(data, doc.source, doc.lines), base)
