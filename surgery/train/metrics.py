"""metrics.jsonl and the held-out loss: the callback that writes a record per logged step (training
loss, lr, tokens/s, FLOPs; held-out loss, a mixture's per domain), the check that nothing diverged,
the final evaluation."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from surgery.errors import PlanError
from surgery.train.config import Config
from surgery.train.stages import Stage


def metric_callbacks(
    metrics_path: Path,
    tps: int,
    stage: Stage,
    stop_after: int | None,
    progress: bool,
    echo,
    domains: dict | None = None,
    eval_every: int | None = None,
    experts=None,
):
    """`experts`: a mixture of experts' ExpertLoad (surgery.train.moe), read into each training
    record. `domains`: a mixture's {name: proportion} of the domains with held-out text; their losses
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
                control.should_training_stop = True  # diverged: stop now (every process), check_finite says why
            if not state.is_world_process_zero or not logs:
                return
            step = stage.step_offset + state.global_step
            if "loss" in logs:
                what = self._training(state, logs)
            elif "eval_loss" in logs:
                what = self._held_out(step, logs["eval_loss"])
            elif domains and any(f"eval_{name}_loss" in logs for name in domains):
                self.pending.update({name: logs[f"eval_{name}_loss"] for name in domains if f"eval_{name}_loss" in logs})
                if set(self.pending) != set(domains):
                    return  # the other domains' evaluations follow
                by, self.pending = dict(self.pending), {}
                what = self._held_out(step, weighted_loss(by, domains), by)
            else:
                return
            write_record(
                metrics_path, {"step": step, "stage": stage.index, "tokens": step * tps, "flops": stage.flops_at(step, tps), **what}
            )

        def _training(self, state, logs) -> dict:
            now = time.perf_counter()
            dt, ds = now - self.t, state.global_step - self.step
            self.t, self.step = now, state.global_step
            rec = {
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens_per_s": round(ds * tps / dt, 1) if dt > 0 and ds > 0 else None,
            }
            rec.update((experts.take() if experts is not None else None) or {})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=False)
            return rec

        def _held_out(self, step: int, loss: float, by: dict | None = None) -> dict:
            """A held-out record (with a mixture's losses per domain, `loss` their weighted average), said too."""
            rec = {"eval_loss": loss, "eval_ppl": ppl(loss)}
            each = ""
            if by is not None:
                rec["eval_loss_by_domain"] = by
                each = " (weighted; " + ", ".join(f"{k} {v:.4f}" for k, v in by.items()) + ")"
            msg = f"step {step}: held-out loss {loss:.4f}{each}, perplexity {rec['eval_ppl']:.2f}"
            (self.bar.write if self.bar is not None else echo)(msg)
            return rec

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()

    return [Metrics()]


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def truncate_metrics(path: Path, stage: int, step: int) -> None:
    """On resume, drop records the interrupted run wrote after its last checkpoint."""
    if not path.exists():
        return
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    keep = [r for r in recs if (r["stage"], r["step"]) <= (stage, step)]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _watched(key: str) -> bool:
    """The logged values that must stay finite: the training loss, the gradient norm, every held-out loss."""
    return key in ("loss", "grad_norm") or (key.startswith("eval_") and key.endswith("loss"))


def check_finite(trainer, stage: Stage, cfg: Config) -> None:
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


def eval_weights(corpus) -> dict | None:
    """A mixture's {domain: proportion} for the domains with held-out text, or None."""
    if not corpus.mixture or not isinstance(corpus.eval, dict):
        return None
    share = {r["name"]: r["proportion"] for r in corpus.mixture["domains"]}
    return {name: share[name] for name in corpus.eval}


def final_eval(trainer) -> tuple[float | None, dict | None]:
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


def write_record(path: Path, rec: dict) -> None:
    """Append one record to metrics.jsonl: the one writer of the file (steps, evaluations, events, the final record)."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
