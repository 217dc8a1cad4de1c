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
import shutil
import sys
import time
from pathlib import Path

from surgery.errors import OutputError, PlanError
from surgery.io.outdir import OutputFolder, output_path
from surgery.train.config import Config, load_config, with_seq_len
from surgery.train.args import check_reporting, training_args
from surgery.train.checkpoints import check_resumable, last_complete_checkpoint, save_stage
from surgery.train.dist import barrier, is_main, world_size
from surgery.train.growth import grow_model
from surgery.train.masks import fade_in_new_layers
from surgery.train.moe import enable_router_aux_loss, watch_experts
from surgery.train.metrics import check_finite, eval_weights, final_eval, metric_callbacks, ppl, truncate_metrics, write_record
from surgery.train.schedule import Schedule
from surgery.train.publish import TrainResult, source_config, stage_model, write_output
from surgery.train.stages import Stage, check_grown, load_grow_plan, plan_stages
from surgery.train.trainable import apply_freezing, select_trainable
from surgery.train.trainer import trainer_class

# the names this module had before the training side was split into parts (issue 24), for callers
from surgery.train.checkpoints import CHECKPOINT_DONE, RESUME_KEYS, mark_checkpoint_complete, prune_checkpoints  # noqa: E402, F401


def _resume_point(ckpt_dir: Path, resume: bool, echo) -> str | None:
    """The checkpoint a resumed stage continues from (rank 0 sets half-written ones aside first)."""
    if not resume:
        return None
    last = last_complete_checkpoint(ckpt_dir, echo) if is_main() else None
    barrier()
    return last if is_main() else last_complete_checkpoint(ckpt_dir, lambda *_: None)


def _stage_data(cfg: Config, stage: Stage, args, progress: bool):
    """The stage's tokenizer and corpus: its draws from the run's one training order (a stage after
    growth continues it), tokenized by rank 0 first; seq_len checked against the model's context."""
    import transformers

    from surgery.train.data import build_corpus

    b = cfg.body
    ctx = getattr(source_config(stage.model_dir), "max_position_embeddings", None)
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
        corpus = build_corpus(
            cfg,
            tok,
            stage.model_dir,
            progress=progress and is_main(),
            sequences=stage.steps * per_step,
            start=(stage.step_offset + stage.data_offset) * per_step,
        )
    return tok, corpus


def _stage_model_loaded(cfg: Config, stage: Stage):
    """The stage's model in float32 with what does not train frozen: (model, trainable, all, notes)."""
    import torch
    import transformers

    b = cfg.body
    model = transformers.AutoModelForCausalLM.from_pretrained(stage.model_dir, dtype=torch.float32, trust_remote_code=False)
    model.config.use_cache = False
    stage.router_aux_loss_coef = enable_router_aux_loss(model, b.router_aux_loss_coef)
    where = cfg.where("grow", "trainable") if stage.index > 1 and b.grow and b.grow.trainable else cfg.where("trainable")
    names, notes = select_trainable(model, stage.trainable, stage.model_dir, where, allow_dead=b.allow_dead)
    n_train, n_all = apply_freezing(model, names, b.freeze_embeddings, cfg.where("freeze_embeddings") if b.freeze_embeddings else where)
    return model, n_train, n_all, notes


def _say_stage(stage: Stage, model, corpus, tps: int, counts: tuple, notes: list, prec: str, last, echo) -> None:
    n_train, n_all = counts
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


def _stage_callbacks(cfg: Config, stage: Stage, work: Path, tps: int, model, corpus, domains, stop_after, progress: bool, echo) -> list:
    """metrics.jsonl's writer (and the run's evaluations), TensorBoard when asked, growth's masks."""
    b = cfg.body
    eval_every = (b.eval_every or max(1, stage.run_steps // 10)) if corpus.eval is not None else None
    experts = watch_experts(model) if stage.router_aux_loss_coef is not None else None
    callbacks = metric_callbacks(work / "metrics.jsonl", tps, stage, stop_after, progress, echo, domains, eval_every, experts)
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
    return callbacks


def _run_stage(cfg: Config, stage: Stage, work: Path, tps: int, *, resume: bool, stop_after: int | None, progress: bool, echo):
    """Train one stage (from its last complete checkpoint when resuming): (trainer, finished, trainable, all)."""
    import transformers

    b = cfg.body
    ckpt_dir = work / f"stage-{stage.index}" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    args, warm, prec = training_args(cfg, stage, ckpt_dir, work.name.removeprefix(".").removesuffix(".surgery-train"))
    last = _resume_point(ckpt_dir, resume, echo)
    tok, corpus = _stage_data(cfg, stage, args, progress)
    model, n_train, n_all, notes = _stage_model_loaded(cfg, stage)
    if is_main():
        _say_stage(stage, model, corpus, tps, (n_train, n_all), notes, prec, last, echo)
    domains = eval_weights(corpus)
    callbacks = _stage_callbacks(cfg, stage, work, tps, model, corpus, domains, stop_after, progress, echo)
    floor = b.min_lr_ratio if b.schedule == "cosine" else 0.0
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=corpus.train,
        eval_dataset=corpus.eval,
        processing_class=tok,
        data_collator=transformers.default_data_collator,
        callbacks=callbacks,
        schedule=Schedule(b.schedule, stage.schedule_steps, warm, floor, stage.schedule_offset),
        mixture=corpus.mixture,
        eval_domains=domains,
    )
    for cb in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    if last and is_main():
        truncate_metrics(work / "metrics.jsonl", stage.index, stage.step_offset + int(Path(last).name.rpartition("-")[2]))
    barrier()
    if stage.index > 1 and not last and corpus.eval is not None and not b.fsdp:
        trainer.evaluate()  # the held-out loss of the grown model before it trains: the jump of growth, at the growth step
    trainer.train(resume_from_checkpoint=last)
    check_finite(trainer, stage, cfg)
    return trainer, trainer.state.global_step >= stage.steps, n_train, n_all


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
    from surgery.io.loadable import check_loadable

    check_loadable(model_dir, cfg.where("model"))
    from surgery.io.provenance import read_provenance

    read_provenance(model_dir)  # a damaged surgery.json is refused now, not when the output is published
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
                    path=out,
                    steps=summary.get("steps", 0),
                    tokens=summary.get("tokens", 0),
                    eval_loss=summary.get("eval_loss"),
                    perplexity=summary.get("perplexity"),
                    seconds=time.perf_counter() - t0,
                    trainable_params=summary.get("trainable_params", 0),
                    total_params=summary.get("params", 0),
                    stages=summary.get("stages", []),
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
    from surgery.data.sources import data_paths
    from surgery.data.tokens import default_cache_dir

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


def _prepare_work(work: Path, out: Path, *, force: bool, resume: bool) -> None:
    """An interrupted run's work folder is resumed (--resume), discarded (--force) or a located refusal."""
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
    barrier()


def _check_grow_plan(cfg: Config, model_dir: Path, stages: list[Stage]) -> None:
    """The grow plan compiles, has no dead parameters (unless allowed), suits a learned operator and
    everything stage 2 asks of it: checked before stage 1 trains."""
    from surgery.api import compile_plan
    from surgery.compile.lint import dead_parameters

    b = cfg.body
    program = compile_plan(load_grow_plan(cfg, model_dir))
    dead = dead_parameters(program.stack, program.ckpts)
    if dead and not b.allow_dead:
        where, what, fix = dead[0]
        where = f"{cfg.where('grow', 'plan')} ({where})"
        raise PlanError(f"the grow plan's {what}", where=where, fix=f"{fix}; or set `allow_dead: true`")
    if b.grow.learns:
        from surgery.train.ligo import check_learnable

        check_learnable(program.layer_map(), program.widened(), cfg.where("grow", "operator"), b.grow.operator)
    check_grown(cfg, program, stages[1].steps)


def _place_stage(cfg: Config, stage: Stage, stages: list[Stage], work: Path, tps: int, echo) -> None:
    """The stage's model (grown now when it is the grown one) and its place in the run's FLOPs and data."""
    from surgery.train.flops import flops_per_token

    b = cfg.body
    if stage.model_dir is None:  # the grown model
        stage.model_dir = grow_model(cfg, stages[stage.index - 2], work, tps, echo)
    stage.flops_per_token = flops_per_token(stage.model_dir, b.data.seq_len)["flops_per_token"]
    if stage.index > 1:
        prev = stages[stage.index - 2]
        stage.flops_offset = prev.flops_at(prev.step_offset + prev.steps, tps)
        if b.grow is not None and b.grow.learns:  # the operator's own steps, at the grown size
            stage.flops_offset += b.grow.learn_steps * tps * stage.flops_per_token
            stage.data_offset = b.grow.learn_steps  # the grown model trains on the data after them


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
    work = folder.side[0]
    _prepare_work(work, out, force=force, resume=resume)
    cfg = with_seq_len(cfg, model_dir)
    b = cfg.body
    stages, tps = plan_stages(cfg, model_dir)
    check_reporting(cfg)
    if b.grow is not None:
        _check_grow_plan(cfg, model_dir, stages)
    if resume:
        check_resumable(work / "config.json", b, where=cfg.where())
    if is_main():
        work.mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(json.dumps(b.model_dump(mode="json"), indent=2))
    barrier()
    trainer, n_train, n_all, summaries = None, 0, 0, []
    for stage in stages:
        _place_stage(cfg, stage, stages, work, tps, echo)
        if resume and stage.index < len(stages) and (work / "grown" / "config.json").exists():
            summaries.append({"stage": stage.index, "steps": stage.steps, "resumed_past": True})
            continue  # this stage finished before the interruption
        trainer, done, n_train, n_all = _run_stage(cfg, stage, work, tps, resume=resume, stop_after=stop_after, progress=show, echo=echo)
        summaries.append(
            {
                "stage": stage.index,
                **stage_model(stage, work),
                "steps": stage.steps,
                "layers": trainer.model.config.num_hidden_layers,
                "flops_per_token": stage.flops_per_token,
                "trainable_params": n_train,
                "params": n_all,
                **({"router_aux_loss_coef": stage.router_aux_loss_coef} if stage.router_aux_loss_coef is not None else {}),
            }
        )
        if not done:
            steps = stage.step_offset + trainer.state.global_step
            if is_main():
                echo(
                    f"stopped after step {trainer.state.global_step} of stage {stage.index}; the checkpoint is in "
                    f"{work / f'stage-{stage.index}' / 'checkpoints'}; `surgery train ... --resume` continues"
                )
            return TrainResult(
                path=None, steps=steps, tokens=steps * tps, eval_loss=None, perplexity=None, seconds=time.perf_counter() - t0,
                trainable_params=n_train, total_params=n_all, stages=summaries,
            )  # fmt: skip
        if stage.index < len(stages):
            save_stage(trainer, work / f"stage-{stage.index}" / "final")
    loss, by_domain = final_eval(trainer)
    total = stages[-1].step_offset + stages[-1].steps
    flops = stages[-1].flops_at(total, tps)
    res = TrainResult(
        path=out, steps=total, tokens=total * tps, eval_loss=loss, perplexity=ppl(loss) if loss is not None else None,
        seconds=time.perf_counter() - t0, trainable_params=n_train, total_params=n_all, stages=summaries, flops=flops,
    )  # fmt: skip
    if is_main():
        rec = {"step": total, "stage": len(stages), "tokens": total * tps, "flops": flops, "final": True}
        rec.update({"eval_loss": loss, "eval_ppl": res.perplexity} if loss is not None else {})
        write_record(work / "metrics.jsonl", {**rec, **({"eval_loss_by_domain": by_domain} if by_domain else {})})
    write_output(cfg, trainer, model_dir, work, folder, res, echo)
    return res
