"""What a stage hands HF Trainer: its TrainingArguments (batch, optimiser, precision, checkpoints,
FSDP, reporting) and the check, at the run's start, that every `report_to` integration is installed."""

from __future__ import annotations

from pathlib import Path

from surgery.errors import PlanError
from surgery.train.config import Config
from surgery.train.dist import world_size
from surgery.train.stages import Stage


def _precision(p: str) -> str:
    import torch

    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return p  # bf16 on a CPU is CPU autocast: slow, but what was asked


def training_args(cfg: Config, stage: Stage, ckpt_dir: Path, run_name: str):
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
