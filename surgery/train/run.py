"""`surgery train`: continued pretraining on HF `Trainer` (with accelerate underneath).

Why `Trainer`: it is the distributed stack HF checkpoints already live in. One code path runs on a
CPU, one GPU, DDP over many GPUs and machines (`torchrun` / `accelerate launch` set the
environment; nothing here changes), and FSDP2 sharding through `fsdp_config`; it saves and
resumes optimizer, scheduler, RNG and data position, does gradient accumulation, bf16 autocast
over fp32 master weights, clipping and `torch.compile`. What surgery adds around it: the data
pipeline (`data.py`), freezing by layer map, the growth schedule, metrics, the loss plot, and an
output that appears only when complete.

Layout while running, next to the output folder OUT:

    .OUT.surgery-train/          the run's work folder (kept for --resume until the run ends)
        stage-1/checkpoints/     Trainer checkpoints (checkpoint-N)
        stage-1/final/           the model at growth time (grow runs)
        grown/                   the grown checkpoint (`surgery apply` output)
        stage-2/checkpoints/
        metrics.jsonl
    .OUT.surgery-partial/        the final model being written, renamed to OUT when whole
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from surgery.errors import OutputError, PlanError
from surgery.io.outdir import OutputFolder, output_path
from surgery.train.config import Config, load_config
from surgery.train.masks import fade_in_new_layers


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

    def flops_at(self, step: int, tps: int) -> float:
        """Cumulative training FLOPs of the run at global step `step` (inside this stage)."""
        return self.flops_offset + (step - self.step_offset) * tps * self.flops_per_token


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


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _barrier():
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


# ---- what trains ----


def select_trainable(model, spec, model_dir: Path, where: str, allow_dead: bool = False) -> tuple[set[str], list[str]]:
    """Names (every alias, so tied weights count once) of the parameters that train, and notes."""
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    notes = []
    if spec == "all":
        return {n for names in aliases.values() for n in names}, notes
    exact = False
    if spec in ("new-layers", "new-params"):
        from surgery.io.provenance import read_provenance

        prov = read_provenance(model_dir)
        if prov is None:
            what = "the layer map" if spec == "new-layers" else "the widened tensors"
            raise PlanError(
                f"trainable: {spec} reads {what} from surgery.json, and {model_dir} has none",
                where=where,
                fix="train a `surgery apply` output, or name parameters with patterns",
            )
    if spec == "new-layers":
        new = prov.new_layers
        if not new:
            raise PlanError(
                f"{model_dir / 'surgery.json'}: the plan added no new layers (copies and merges only), so nothing would train",
                where=where,
                fix="use trainable: all, or patterns",
            )
        dead = prov.zero_layers
        if dead and not allow_dead:
            raise PlanError(
                f"{model_dir / 'surgery.json'}: new layers {dead[:8]} were made all zero (`init: zero`): no gradient reaches "
                "their weights, so `trainable: new-layers` would train nothing",
                where=where,
                fix="regrow with `init: identity` (the paper's G_zero) or `init: random`; or set `allow_dead: true` to train anyway",
            )
        from surgery.io.checkpoint import open_checkpoint

        prefix = open_checkpoint("model", str(model_dir), model_dir).family.layer_prefix
        patterns = [f"{prefix}{i}.*" for i in new]
        notes.append(f"new layers {new} (from surgery.json)")
    elif spec == "new-params":
        # a widened matrix holds old and new units side by side; requires_grad freezes whole tensors,
        # so `new-params` trains every tensor that grew (old units in it too) and freezes the rest
        if prov.widened is None:
            raise PlanError(
                f"trainable: new-params reads the widened tensors from surgery.json; {model_dir} has none (no `widen` step)",
                where=where,
                fix="train a `surgery apply` output of a plan with `widen`, or use all / patterns",
            )
        patterns, exact = list(prov.widened.tensors), True
        notes.append(f"{len(patterns)} widened tensors train (whole tensors: their old units too)")
    else:
        patterns = [spec] if isinstance(spec, str) else list(spec)
    chosen = set()
    wanted = set(patterns) if exact else None  # tensor names from surgery.json are names, never patterns
    for names in aliases.values():
        if any((n in wanted) if exact else fnmatchcase(n, pat) for n in names for pat in patterns):
            chosen.update(names)
    if not chosen:
        some = ", ".join(list(n for names in aliases.values() for n in names)[:6])
        raise PlanError(f"trainable patterns {patterns} match no parameter", where=where, fix=f"parameter names look like: {some}, ...")
    return chosen, notes


def apply_freezing(model, trainable: set[str], freeze_embeddings: bool, where: str) -> tuple[int, int]:
    if freeze_embeddings:
        emb = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        emb_ids = {id(p) for p in emb}
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if n in trainable and id(p) not in emb_ids}
    n_train = n_all = 0
    for n, p in model.named_parameters():  # deduplicated: a tied weight is one parameter
        on = n in trainable
        p.requires_grad_(on)
        n_all += p.numel()
        n_train += p.numel() if on else 0
    if n_train == 0:
        raise PlanError("nothing trains: every parameter is frozen", where=where, fix="check `trainable` and `freeze_embeddings`")
    return n_train, n_all


# ---- plan for the run ----


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


def _check_grown(cfg: Config, program, after: int) -> None:
    """Everything stage 2 (`after` steps) will need from the grow plan, checked when the run starts
    (not after stage 1 has trained): masks need something new to fade in and time to end within the
    run, `new-layers` needs new layers and `new-params` a widen."""
    from surgery.train.masks import mask_stages

    g, b = cfg.body.grow, cfg.body
    widened = program.widened()
    new_units = bool(widened) and widened.get("init") in ("zero", "random")
    if g.mask_steps is not None and not program.new_layers and not new_units:
        raise PlanError(
            "grow.mask_steps fades in new layers or new units, and the grow plan adds neither (stacked copies and split "
            "units are not new: they already compute the small model's function)",
            where=cfg.where("grow", "mask_steps"),
            fix="grow with `expand` or `gstack: {operator: random}`, or `widen` with init: random|zero; or drop mask_steps",
        )
    if g.mask_steps is not None:
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


# ---- the Trainer ----


def _trainer_class():
    import transformers

    class SurgeryTrainer(transformers.Trainer):
        """Trainer whose schedule can start part-way along a longer one (grow with `schedule: continue`),
        reading the training set in surgery's order."""

        schedule_total: int = 0
        schedule_offset: int = 0
        min_lr_ratio: float = 0.0
        schedule_name: str = "cosine"
        warmup_steps_: int = 0

        def create_scheduler(self, num_training_steps, optimizer=None):
            import torch

            if self.lr_scheduler is None:
                total, off, warm, floor = self.schedule_total, self.schedule_offset, self.warmup_steps_, self.min_lr_ratio
                name = self.schedule_name

                def factor(step):
                    s = step + off
                    if s < warm:
                        return (s + 1) / (warm + 1)
                    if name == "constant":
                        return 1.0
                    progress = min(1.0, (s - warm) / max(1, total - warm))
                    if name == "linear":
                        return 1.0 - progress
                    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        save_dtype = None  # set for the final save only: the weights in the input checkpoint's dtype

        def _get_train_sampler(self, train_dataset=None):
            """In order: the training set is already the run's shuffled order from this stage's start
            (surgery.train.data.Ordered / Mixture), so growth continues it rather than replaying it."""
            import torch

            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def _save(self, output_dir=None, state_dict=None):
            import torch

            if self.save_dtype is not None:
                if state_dict is None:
                    state_dict = self.model.state_dict()
                cast: dict = {}  # tied weights stay one tensor
                state_dict = {
                    k: cast.setdefault((v.data_ptr(), tuple(v.shape)), v.to(self.save_dtype)) if torch.is_floating_point(v) else v
                    for k, v in state_dict.items()
                }
            super()._save(output_dir, state_dict=state_dict)

        def _save_checkpoint(self, model, trial):
            """Save, then mark the checkpoint complete (fsynced), then rotate old ones: a kill during a
            save leaves an unmarked folder that --resume skips, and never the only complete one deleted."""
            limit = self.args.save_total_limit
            self.args.save_total_limit = None  # rotation happens below, after the marker
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                mark_checkpoint_complete(folder)
                prune_checkpoints(folder.parent, limit)

    return SurgeryTrainer


CHECKPOINT_DONE = "surgery-complete"


def mark_checkpoint_complete(folder: Path) -> None:
    from surgery.io.outdir import fsync_path, fsync_tree

    fsync_tree(folder)
    (folder / CHECKPOINT_DONE).write_text("")
    fsync_path(folder / CHECKPOINT_DONE)
    fsync_path(folder, directory=True)


def _checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint-N folder, oldest first."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p, (p / CHECKPOINT_DONE).is_file() and (p / "trainer_state.json").is_file()))
    return sorted(out)


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (and nothing incomplete older than them)."""
    if not keep:
        return
    complete = [p for _, p, ok in _checkpoints(folder) if ok]
    for p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def last_complete_checkpoint(folder: Path, echo=print) -> str | None:
    """The newest checkpoint whose save finished; newer, half-written ones (a kill during a save)
    are set aside so the Trainer never sees them."""
    found = _checkpoints(folder)
    good = [p for _, p, ok in found if ok]
    newest = good[-1] if good else None
    for step, p, ok in found:
        if not ok:
            echo(
                f"note: {p.name} was not saved completely (interrupted); resuming from "
                f"{newest.name if newest else 'the start of the stage'}"
            )
            shutil.rmtree(p, ignore_errors=True)
    return str(newest) if newest else None


def _callbacks(
    metrics_path: Path,
    tps: int,
    stage: Stage,
    stop_after: int | None,
    progress: bool,
    echo,
    domains: dict | None = None,
    eval_every: int | None = None,
):
    """`domains`: a mixture's {name: proportion} of the domains with held-out text; their losses
    arrive one evaluation each, and are written as one record with their weighted average.
    `eval_every`: evaluate when the run's global step (not the stage's) is a multiple of it, so the
    evaluations of runs with and without growth line up."""
    import transformers

    from surgery.train.mixture import weighted_loss

    class Metrics(transformers.TrainerCallback):
        def __init__(self):
            self.t = self.step = None
            self.bar = None
            self.pending: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t, self.step = time.perf_counter(), state.global_step
            if progress and state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=state.max_steps, initial=state.global_step, desc=f"stage {stage.index}", unit="step", dynamic_ncols=True
                )

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if eval_every and (stage.step_offset + state.global_step) % eval_every == 0:
                control.should_evaluate = True
            if stop_after is not None and state.global_step >= stop_after and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and any(isinstance(v, float) and not math.isfinite(v) for k, v in logs.items() if _watched(k)):
                control.should_training_stop = True  # diverged: stop now (every process), _check_finite says why
            if not state.is_world_process_zero or not logs:
                return
            step = stage.step_offset + state.global_step
            rec = {"step": step, "stage": stage.index, "tokens": step * tps, "flops": stage.flops_at(step, tps)}
            if "loss" in logs:
                now = time.perf_counter()
                dt, ds = now - self.t, state.global_step - self.step
                self.t, self.step = now, state.global_step
                rec.update(
                    loss=logs["loss"],
                    lr=logs.get("learning_rate"),
                    grad_norm=logs.get("grad_norm"),
                    tokens_per_s=round(ds * tps / dt, 1) if dt > 0 and ds > 0 else None,
                )
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=False)
            elif "eval_loss" in logs:
                rec.update(eval_loss=logs["eval_loss"], eval_ppl=_ppl(logs["eval_loss"]))
                msg = f"step {step}: held-out loss {logs['eval_loss']:.4f}, perplexity {rec['eval_ppl']:.2f}"
                (self.bar.write if self.bar is not None else echo)(msg)
            elif domains and any(f"eval_{name}_loss" in logs for name in domains):
                self.pending.update({name: logs[f"eval_{name}_loss"] for name in domains if f"eval_{name}_loss" in logs})
                if set(self.pending) != set(domains):
                    return  # the other domains' evaluations follow
                by, self.pending = dict(self.pending), {}
                avg = weighted_loss(by, domains)
                rec.update(eval_loss=avg, eval_ppl=_ppl(avg), eval_loss_by_domain=by)
                each = ", ".join(f"{k} {v:.4f}" for k, v in by.items())
                msg = f"step {step}: held-out loss {avg:.4f} (weighted; {each}), perplexity {rec['eval_ppl']:.2f}"
                (self.bar.write if self.bar is not None else echo)(msg)
            else:
                return
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return [Metrics()]


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _truncate_metrics(path: Path, stage: int, step: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    keep = [r for r in recs if (r["stage"], r["step"]) <= (stage, step)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _precision(p: str) -> str:
    import torch

    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return p  # bf16 on a CPU is CPU autocast: slow, but what was asked


def _training_args(cfg: Config, stage: Stage, ckpt_dir: Path, run_name: str):
    import torch
    import transformers

    b = cfg.body
    every = max(1, stage.steps // 10)
    warm = b.warmup if isinstance(b.warmup, int) else int(b.warmup * stage.schedule_steps)
    prec = _precision(b.precision)
    kw = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=b.micro_batch,
        per_device_eval_batch_size=b.micro_batch,
        gradient_accumulation_steps=b.grad_accum,
        learning_rate=b.lr,
        weight_decay=b.weight_decay,
        adam_beta1=b.betas[0],
        adam_beta2=b.betas[1],
        max_grad_norm=b.grad_clip,  # 0: no clipping (HF skips it; None would crash its comparison)
        max_steps=stage.steps,
        logging_steps=b.log_every or max(1, min(every, 10)),
        save_steps=b.save_every or every,
        save_total_limit=b.keep_checkpoints,
        eval_strategy="no",  # evaluations follow the run's global step (the Metrics callback), not the stage's
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (HF's filter would log the running mean instead)
        bf16=prec == "bf16",
        seed=b.seed,
        data_seed=b.seed,
        # HF's own integrations; TensorBoard is added by _run_stage, writing where the output keeps it
        report_to=[x for x in b.report_to if x != "tensorboard"],
        run_name=f"{run_name}-stage-{stage.index}" if b.grow is not None else run_name,
        disable_tqdm=True,
        dataloader_num_workers=b.workers,
        remove_unused_columns=False,
        torch_compile=b.compile,
        use_cpu=not torch.cuda.is_available(),
        save_only_model=False,
        log_level="error",
        log_level_replica="error",
        ddp_find_unused_parameters=False,
    )
    if b.fsdp:  # FSDP2, each decoder layer (the model's _no_split_modules) its own unit; full state dict on save
        kw.update(
            fsdp=True,
            fsdp_config={
                "version": 2,
                "reshard_after_forward": True,
                "state_dict_type": "FULL_STATE_DICT",
                **({"activation_checkpointing": True} if b.gradient_checkpointing else {}),
            },
        )
    elif b.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5
        fields = transformers.TrainingArguments.__dataclass_fields__
        kw["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    if world_size() > 1 and not torch.cuda.is_available():
        kw["ddp_backend"] = "gloo"
    return transformers.TrainingArguments(**kw), warm, prec


def check_reporting(cfg: Config) -> None:
    """Every `report_to` integration's package is installed: checked at the run's start, located."""
    if not cfg.body.report_to:
        return
    import transformers.integrations as hf

    probe = {"comet_ml": "comet", "azure_ml": "azureml", "flyte": "flytekit"}
    package = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "flyte": "flytekit flytekitplugins-deck-standard"}
    for name in cfg.body.report_to:
        available = getattr(hf, f"is_{probe.get(name, name)}_available", None)
        if available is not None and not available():
            raise PlanError(
                f"report_to {name}: its package is not installed",
                where=cfg.where("report_to"),
                fix=f"pip install {package.get(name, name)}, or drop {name} from report_to",
            )


def _run_stage(cfg: Config, stage: Stage, work: Path, tps: int, *, resume: bool, stop_after: int | None, progress: bool, echo):
    import torch
    import transformers
    from surgery.train.data import build_corpus

    b = cfg.body
    sdir = work / f"stage-{stage.index}"
    ckpt_dir = sdir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    args, warm, prec = _training_args(cfg, stage, ckpt_dir, work.name.removeprefix(".").removesuffix(".surgery-train"))
    last = last_complete_checkpoint(ckpt_dir, echo) if resume and is_main() else None
    if resume and not is_main():
        _barrier()
        last = last_complete_checkpoint(ckpt_dir, lambda *_: None)
    elif resume:
        _barrier()
    ctx = getattr(_source_config(stage.model_dir), "max_position_embeddings", None)
    if ctx and b.data.seq_len > ctx:
        raise PlanError(
            f"data.seq_len {b.data.seq_len} exceeds the model's context ({ctx} positions, max_position_embeddings)",
            where=cfg.where("data", "seq_len"),
            fix=f"use seq_len <= {ctx}",
        )
    tok = transformers.AutoTokenizer.from_pretrained(stage.model_dir, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with args.main_process_first(local=False, desc="tokenize"):
        per_step = b.micro_batch * b.grad_accum * world_size()
        # the stage's draws from the run's one training order: a stage after growth continues it
        corpus = build_corpus(
            cfg,
            tok,
            stage.model_dir,
            progress=progress and is_main(),
            sequences=stage.steps * per_step,
            start=(stage.step_offset + stage.data_offset) * per_step,
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(stage.model_dir, dtype=torch.float32, trust_remote_code=False)
    model.config.use_cache = False
    where = cfg.where("grow", "trainable") if stage.index > 1 and b.grow and b.grow.trainable else cfg.where("trainable")
    names, notes = select_trainable(model, stage.trainable, stage.model_dir, where, allow_dead=b.allow_dead)
    n_train, n_all = apply_freezing(model, names, b.freeze_embeddings, cfg.where("freeze_embeddings") if b.freeze_embeddings else where)
    if is_main():
        echo(
            f"stage {stage.index}: {stage.model_dir.name}, {model.config.num_hidden_layers} layers, "
            f"{n_train:,} of {n_all:,} parameters train{' (' + '; '.join(notes) + ')' if notes else ''}; "
            f"{stage.steps} steps x {tps:,} tokens; {corpus.train_tokens:,} training tokens in {corpus.documents:,} documents"
            f", {corpus.eval_tokens:,} held out; precision {prec}" + (f"; resuming from {Path(last).name}" if last else "")
        )
        if corpus.mixture:
            rows = corpus.mixture["domains"]
            echo(
                f"mixture ({corpus.mixture['weights']}): "
                + ", ".join(f"{r['name']} {r['proportion']:.1%} ({r['train_sequences']:,} sequences)" for r in rows)
            )
            for note in corpus.notes:
                echo(f"note: {note}")
        elif stage.steps * tps > corpus.train_tokens:
            echo(f"note: the budget ({stage.steps * tps:,} tokens) is {stage.steps * tps / corpus.train_tokens:.1f} passes over the data")
    domains = _eval_weights(corpus)
    eval_every = (b.eval_every or max(1, stage.run_steps // 10)) if corpus.eval is not None else None
    callbacks = _callbacks(work / "metrics.jsonl", tps, stage, stop_after, progress, echo, domains, eval_every)
    if "tensorboard" in b.report_to and is_main():
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = str(work / "logs" / f"stage-{stage.index}")  # published as OUT/logs
        callbacks.append(board)
    if stage.index > 1 and b.grow is not None and b.grow.mask_steps:
        small = work / f"stage-{stage.index - 1}" / "final"
        where = cfg.where("grow", "mask_steps")
        callbacks.append(fade_in_new_layers(model, stage.model_dir, b.grow.mask_steps, where, small, b.grow.masks))
        if is_main():
            how = "in MSG's stages" if b.grow.masks == "msg" else "together"
            echo(f"what the growth added fades in over {b.grow.mask_steps} steps per stage, {how} (masked growth)")
    cls = _trainer_class()
    trainer = cls(
        model=model,
        args=args,
        train_dataset=corpus.train,
        eval_dataset=corpus.eval,
        processing_class=tok,
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
    )
    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    trainer.mixture, trainer.eval_domains = corpus.mixture, domains
    trainer.schedule_total, trainer.schedule_offset = stage.schedule_steps, stage.schedule_offset
    trainer.min_lr_ratio = b.min_lr_ratio if b.schedule == "cosine" else 0.0
    trainer.schedule_name, trainer.warmup_steps_ = b.schedule, warm
    if last and is_main():
        _truncate_metrics(work / "metrics.jsonl", stage.index, stage.step_offset + int(Path(last).name.rpartition("-")[2]))
    _barrier()
    if stage.index > 1 and not last and corpus.eval is not None and not b.fsdp:
        trainer.evaluate()  # the held-out loss of the grown model before it trains: the jump of growth, at the growth step
    trainer.train(resume_from_checkpoint=last)
    _check_finite(trainer, stage, cfg)
    done = trainer.state.global_step >= stage.steps
    return trainer, done, n_train, n_all


def _watched(key: str) -> bool:
    """The logged values that must stay finite: the training loss, the gradient norm, every held-out loss."""
    return key in ("loss", "grad_norm") or (key.startswith("eval_") and key.endswith("loss"))


def _check_finite(trainer, stage: Stage, cfg: Config) -> None:
    """A diverged run is an error, never a published model: the first logged loss, gradient norm
    or held-out loss that is NaN or infinite stops training (the Metrics callback) and lands here,
    on every process (the log history is the same on all)."""
    for h in trainer.state.log_history:
        bad = {k: v for k, v in h.items() if _watched(k) and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            step = stage.step_offset + int(h.get("step", 0))
            what = ", ".join(f"{k} {v}" for k, v in bad.items())
            raise PlanError(
                f"training diverged at step {step} (stage {stage.index}): {what}; nothing was published",
                where=cfg.where("lr"),
                fix=f"start over (--force) with a lower lr (now {cfg.body.lr:g}), a longer warmup, or grad_clip; "
                "checkpoints saved after the divergence hold non-finite weights",
            )


def train(
    config: Config | str | Path,
    *,
    out: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
    echo=print,
    overrides: dict | None = None,
) -> TrainResult:
    """Run the config's training (and growth) and write the final checkpoint to `out`.

    `stop_after` ends this invocation after that many steps of the current stage, with a checkpoint
    that `resume=True` continues (for preemptible or time-limited jobs)."""
    import transformers

    from surgery.io.checkpoint import resolve_ref

    t0 = time.perf_counter()
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    b = cfg.body
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if out is None:
        if b.output is None:
            raise OutputError("no output folder given", where=cfg.where(), fix="pass -o OUT or set `output:` in the config")
        out = cfg.path(b.output)
    out = output_path(out)
    model_dir = resolve_ref(b.model, cfg.base_dir, where=cfg.where("model"))
    from surgery.train.loadable import check_loadable

    check_loadable(model_dir, cfg.where("model"))
    if model_dir == out.resolve() or model_dir in out.resolve().parents:
        raise OutputError(f"the output {out} is inside the model being trained ({model_dir})", fix="choose another output folder")
    work = out.parent / f".{out.name}.surgery-train"
    folder = OutputFolder(out, force=force, reads=training_reads(cfg, model_dir), side=[work])
    if is_main():
        folder.acquire()  # held until the output is published (a second run gets "already being written")
        try:
            folder.recover()  # a half-done publish of an earlier run is finished (or undone) first
            if resume and folder.notes and (out / "train.json").is_file():
                # the interrupted run had finished: its output is now published, nothing is left to do
                summary = json.loads((out / "train.json").read_text())
                shutil.rmtree(out.parent / f".{out.name}.surgery-train", ignore_errors=True)
                folder.release()
                echo(f"the interrupted run had finished; its output is published at {out}")
                return TrainResult(
                    out,
                    summary.get("steps", 0),
                    summary.get("tokens", 0),
                    summary.get("eval_loss"),
                    summary.get("perplexity"),
                    time.perf_counter() - t0,
                    summary.get("trainable_params", 0),
                    summary.get("params", 0),
                    summary.get("stages", []),
                )
            folder.check_target()
        except BaseException:
            folder.release()
            raise
    try:
        return _train(cfg, out, model_dir, folder, force=force, resume=resume, stop_after=stop_after, show=show, echo=echo, t0=t0)
    finally:
        folder.release()


def training_reads(cfg: Config, model_dir: Path) -> dict[str, list[Path]]:
    """Everything a run reads, for the output-folder protocol: the model, the config, every data and
    held-out file (globs expanded, and the folder each glob starts from), HF datasets saved on disk,
    the token cache, the grow plan."""
    from surgery.train.data import data_paths, default_cache_dir

    b, d = cfg.body, cfg.body.data
    reads: dict[str, list[Path]] = {"the model being trained": [model_dir], "the training config": []}
    if Path(cfg.doc.source).is_file():
        reads["the training config"].append(Path(cfg.doc.source))
    entries = list(d.files) + list(d.eval_files) + [e for s in d.sources for e in (*s.files, *s.eval_files)]
    reads["a data file"] = data_paths(entries, cfg.base_dir)
    reads["the token cache"] = [cfg.path(d.cache_dir) if d.cache_dir else default_cache_dir()]
    if b.grow is not None and isinstance(b.grow.plan, str):
        reads["the grow plan"] = [cfg.path(b.grow.plan)]
    return reads


def _train(
    cfg: Config,
    out: Path,
    model_dir: Path,
    folder: OutputFolder,
    *,
    force: bool,
    resume: bool,
    stop_after: int | None,
    show: bool,
    echo,
    t0: float,
) -> TrainResult:
    b = cfg.body
    work = folder.side[0]
    if work.exists() and not resume:
        if not force:
            raise OutputError(
                f"an interrupted run of this output is in {work}",
                fix="pass --resume to continue it, or --force to discard it and start over",
            )
        if is_main():
            shutil.rmtree(work)
    if resume and not work.exists():
        raise OutputError(f"nothing to resume: no interrupted run for {out} (looked for {work.name})", fix="run without --resume")
    _barrier()
    if b.data.seq_len is None:
        from surgery.train.config import default_seq_len

        ctx = getattr(_source_config(model_dir), "max_position_embeddings", None)
        b = cfg.body = b.model_copy(update={"data": b.data.model_copy(update={"seq_len": default_seq_len(ctx)})})
    stages, tps = plan_stages(cfg, model_dir)
    check_reporting(cfg)
    if b.grow is not None:
        from surgery.api import compile_plan

        program = compile_plan(load_grow_plan(cfg, model_dir))  # a bad grow plan fails now, not after stage 1
        from surgery.compile.lint import dead_parameters

        dead = dead_parameters(program.stack, program.ckpts)
        if dead and not b.allow_dead:
            where, what, fix = dead[0]
            where = f"{cfg.where('grow', 'plan')} ({where})"
            raise PlanError(f"the grow plan's {what}", where=where, fix=f"{fix}; or set `allow_dead: true`")
        if b.grow.learns:
            from surgery.train.ligo import check_learnable

            check_learnable(program.layer_map(), program.widened(), cfg.where("grow", "operator"), b.grow.operator)
        _check_grown(cfg, program, stages[1].steps)
    if resume:
        _check_resumable(work / "config.json", b, where=cfg.where())
    if is_main():
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(b.model_dump(mode="json"), indent=2))
    _barrier()

    trainer = None
    n_train = n_all = 0
    summaries = []
    from surgery.train.flops import flops_per_token

    for stage in stages:
        if stage.model_dir is None:  # the grown model
            stage.model_dir = _grow(cfg, stages[stage.index - 2], work, tps, echo)
        stage.flops_per_token = flops_per_token(stage.model_dir, b.data.seq_len)["flops_per_token"]
        if stage.index > 1:
            prev = stages[stage.index - 2]
            stage.flops_offset = prev.flops_at(prev.step_offset + prev.steps, tps)
            if b.grow is not None and b.grow.learns:  # the operator's own steps, at the grown size
                stage.flops_offset += b.grow.learn_steps * tps * stage.flops_per_token
                stage.data_offset = b.grow.learn_steps  # the grown model trains on the data after them
        if resume and stage.index < len(stages) and (work / "grown" / "config.json").exists():
            summaries.append({"stage": stage.index, "steps": stage.steps, "resumed_past": True})
            continue  # this stage finished before the interruption
        trainer, done, n_train, n_all = _run_stage(cfg, stage, work, tps, resume=resume, stop_after=stop_after, progress=show, echo=echo)
        summaries.append(
            {
                "stage": stage.index,
                **_stage_model(stage, work),
                "steps": stage.steps,
                "layers": trainer.model.config.num_hidden_layers,
                "flops_per_token": stage.flops_per_token,
                "trainable_params": n_train,
                "params": n_all,
            }
        )
        if not done:
            if is_main():
                echo(
                    f"stopped after step {trainer.state.global_step} of stage {stage.index}; the checkpoint is in "
                    f"{work / f'stage-{stage.index}' / 'checkpoints'}; `surgery train ... --resume` continues"
                )
            steps = stages[stage.index - 1].step_offset + trainer.state.global_step
            return TrainResult(None, steps, steps * tps, None, None, time.perf_counter() - t0, n_train, n_all, summaries)
        if stage.index < len(stages):
            _save_stage(trainer, work / f"stage-{stage.index}" / "final")

    loss, by_domain = _final_eval(trainer)
    total_steps = stages[-1].step_offset + stages[-1].steps
    res = TrainResult(
        out,
        total_steps,
        total_steps * tps,
        loss,
        _ppl(loss) if loss is not None else None,
        time.perf_counter() - t0,
        n_train,
        n_all,
        summaries,
        stages[-1].flops_at(total_steps, tps),
    )
    if is_main():
        with open(work / "metrics.jsonl", "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": total_steps,
                        "stage": len(stages),
                        "tokens": total_steps * tps,
                        "flops": stages[-1].flops_at(total_steps, tps),
                        "final": True,
                        **({"eval_loss": loss, "eval_ppl": res.perplexity} if loss is not None else {}),
                        **({"eval_loss_by_domain": by_domain} if by_domain else {}),
                    }
                )
                + "\n"
            )
    _write_output(cfg, trainer, model_dir, work, folder, res, echo)
    return res


def _stage_model(stage: Stage, work: Path) -> dict:
    """What train.json says a stage trained: the input model's path, or for a grown stage (whose
    folder is deleted with the run's work folder) what stays true: where it came from, and the
    grown checkpoint's shards as surgery.json recorded them (names, sizes, header sha256, CRC-32)."""
    if stage.index == 1 or stage.model_dir is None or work not in Path(stage.model_dir).parents:
        return {"model": str(stage.model_dir)}
    out: dict = {"model": f"grown from stage {stage.index - 1}'s model at step {stage.step_offset} by the grow plan (config.grow)"}
    prov = Path(stage.model_dir) / "surgery.json"
    if prov.is_file():
        rec = json.loads(prov.read_text())
        out["grown"] = {k: rec.get("output", {}).get(k) for k in ("num_layers", "parameters", "shards")}
        out["grown"]["layer_map"] = rec.get("layer_map")
        if rec.get("growth_operator"):  # G_learn: the learned operator that made the weights
            out["grown"]["growth_operator"] = rec["growth_operator"]
    return out


def _eval_weights(corpus) -> dict | None:
    """A mixture's {domain: proportion} for the domains with held-out text, or None."""
    if not corpus.mixture or not isinstance(corpus.eval, dict):
        return None
    share = {r["name"]: r["proportion"] for r in corpus.mixture["domains"]}
    return {name: share[name] for name in corpus.eval}


def _final_eval(trainer) -> tuple[float | None, dict | None]:
    """The held-out loss after the last step (and per domain for a mixture): the last evaluation's
    when it ran at the last step, else a new one."""
    from surgery.train.mixture import weighted_loss

    if trainer.eval_dataset is None:
        return None, None
    step = trainer.state.global_step
    domains = getattr(trainer, "eval_domains", None)
    if not domains:
        last_eval = [h for h in trainer.state.log_history if "eval_loss" in h]
        if last_eval and last_eval[-1].get("step") == step:
            return last_eval[-1]["eval_loss"], None
        return trainer.evaluate().get("eval_loss"), None
    keys = {name: f"eval_{name}_loss" for name in domains}
    at_end = {}
    for h in trainer.state.log_history:
        if h.get("step") == step:
            at_end.update({name: h[k] for name, k in keys.items() if k in h})
    if set(at_end) != set(domains):
        metrics = trainer.evaluate()
        at_end = {name: metrics[k] for name, k in keys.items()}
    return weighted_loss(at_end, domains), at_end


# what a resumed run must share with the interrupted one (the rest, e.g. eval_every, may change)
RESUME_KEYS = (
    "model",
    "data",
    "trainable",
    "freeze_embeddings",
    "micro_batch",
    "grad_accum",
    "tokens",
    "steps",
    "seed",
    "grow",
    "schedule",
    "fsdp",
)


def _check_resumable(saved: Path, body, where: str) -> None:
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = body.model_dump(mode="json")
    changed = [k for k in RESUME_KEYS if before.get(k) != now.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise OutputError(
            f"--resume with a different config than the interrupted run ({diff})"[:900],
            where=where,
            fix="resume with the same settings, or pass --force (without --resume) to start over",
        )


def _save_stage(trainer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    _barrier()
    if is_main():
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    _barrier()


def _grow(cfg: Config, prev: Stage, work: Path, tps: int, echo) -> Path:
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
        if (target / "config.json").exists() and (target / "surgery.json").exists():
            info = json.loads((target / "surgery.json").read_text()).get("output", {})
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
            _append_once(work / "metrics.jsonl", [record, learned])
        else:
            _append_once(work / "metrics.jsonl", [record])
    _barrier()
    return grown


def _append_once(path: Path, records: list[dict]) -> None:
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
    with open(path, "a") as f:
        for r in records:
            if (r["event"], r["stage"], r["step"]) not in have:
                f.write(json.dumps(r) + "\n")


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


def _write_output(cfg: Config, trainer, model_dir: Path, work: Path, folder: OutputFolder, res: TrainResult, echo=print) -> None:
    import torch

    b = cfg.body
    out, staging = folder.out, folder.staging
    if is_main():
        folder.fresh_staging()
    dtype = b.save_dtype
    if dtype == "auto":
        dtype = str(getattr(_source_config(model_dir), "dtype", None) or "float32").removeprefix("torch.")
    trainer.save_dtype = getattr(torch, dtype, torch.float32)  # DDP and FSDP alike: cast in the saved state dict
    trainer.save_model(str(staging))
    _barrier()
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
    prov = model_dir / "surgery.json"
    if prov.is_file():
        summary["source_surgery"] = json.loads(prov.read_text()).get("layer_map")
    (staging / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    (staging / "README.md").write_text(_card(summary, plotted, out.name))
    folder.publish()
    shutil.rmtree(work, ignore_errors=True)


def _source_config(model_dir: Path):
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
