"""The training config (`surgery train CONFIG.yaml`): a strict schema with located errors.

The file is flat on purpose: every common field is also a command-line flag (`--lr 1e-4`,
`--tokens 2M`, `--trainable new-layers`), and flags override the file. Relative paths are
relative to the config file's folder, like plans.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, WithJsonSchema, field_validator, model_validator
from typing_extensions import Annotated

from surgery.errors import PlanError
from surgery.plan import Strict, _problems
from surgery.plan.yamlio import FromDocument, Located, load_yaml_file, load_yaml_text

_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([KMGBT]?)\s*$", re.I)  # 2M, 1.5B, 7e9, 2e12
_MULT = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12}


COUNT_SCHEMA = WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[KMGBTkmgbt]?\s*$"}]}
)


def parse_count(v: Any) -> int:
    """`2M`, `1.5B`, `2T`, `300000` -> an integer count (tokens, parameters; B = billion)."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a count")
    if isinstance(v, (int, float)):
        x = float(v) if isinstance(v, float) else v
    else:
        m = _COUNT.match(str(v)[:100])
        if not m:
            raise ValueError(f"{str(v)[:60]!r} is not a count; write e.g. 300000, 2M, 1.5B, 2T or 7e9")
        x = float(m.group(1)) * _MULT[m.group(2).upper()]
    if isinstance(x, float) and not math.isfinite(x) or x > 10**18:
        raise ValueError(f"{str(v)[:60]!r} is not a usable count (at most 1e18)")
    n = int(x)
    if n <= 0:
        raise ValueError(f"{v!r} must be positive")
    return n


class HFDataset(Strict):
    """A dataset already in the local HF datasets cache (loaded offline) or saved with `save_to_disk`."""

    dataset: str
    config: Optional[str] = None
    split: str = "train"
    text_field: Optional[str] = None


DataFile = Union[str, HFDataset]


WEIGHT_RULES = ("given", "uniform", "tokens", "entropy", "conditional-entropy", "joint-entropy", "marginal-entropy")


class DataSource(Strict):
    """One domain of a mixture: its files, its own held-out text (or split), its weight."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    files: tuple[DataFile, ...] = Field(min_length=1)
    eval_files: tuple[DataFile, ...] = ()  # default: the last `eval_fraction` of this domain's sequences
    weight: Optional[float] = Field(default=None, ge=0, le=1e9, allow_inf_nan=False)  # relative; used when data.weights is `given`


class Data(Strict):
    files: tuple[DataFile, ...] = ()  # .txt, .jsonl/.json, .parquet files or globs; or HF datasets
    eval_files: tuple[DataFile, ...] = ()  # held-out text; default: the last `eval_fraction` of the packed sequences
    # or a mixture: domains sampled by weight (each with its own held-out split and loss)
    sources: tuple[DataSource, ...] = ()
    # how the domains' proportions are set: `given` (each source's weight), `uniform`, `tokens` (their
    # sizes), or from each domain's token statistics (BiMix's entropy proxies): `entropy` (=
    # conditional-entropy), `joint-entropy`, `marginal-entropy`
    weights: Literal[WEIGHT_RULES] = "given"
    # the entropy rules' softmax is over entropies in nats (e) or bits (2); the BiMix paper does not
    # state its base, and the two give different proportions (bits: a sharper softmax)
    entropy_base: Literal["e", "2"] = "e"
    # a domain with fewer sequences than its share: reuse them (reported), or stop: the run does not start (a located error)
    exhausted: Literal["repeat", "stop"] = "repeat"
    entropy_max_tokens: Annotated[int, COUNT_SCHEMA] = 10_000_000  # entropy statistics read at most this many tokens per domain
    _ent_cap = field_validator("entropy_max_tokens", mode="before")(lambda v: parse_count(v))
    text_field: str = "text"  # the field of JSONL records / parquet columns holding the text
    seq_len: Optional[int] = Field(default=None, ge=8, le=1 << 20)  # default: the model's context, at most 2048
    eval_fraction: float = Field(default=0.02, ge=0.0, lt=0.5)
    # held-out text is capped (it is evaluated ~10 times a run): default 2M tokens on a GPU; on a CPU what
    # ~2e12 forward FLOPs allow for the model (16K tokens for a 135M model, 2M for a tiny one); said when it caps
    eval_max_tokens: Annotated[Optional[int], COUNT_SCHEMA] = None
    _eval_cap = field_validator("eval_max_tokens", mode="before")(lambda v: None if v is None else parse_count(v))
    separator: Optional[str] = None  # split .txt files into documents at this string (default: one document per file)
    cache_dir: Optional[str] = None  # tokenized shards (default: $SURGERY_CACHE/tokens or ~/.cache/surgery/tokens)

    @model_validator(mode="after")
    def _files_or_sources(self):
        if bool(self.files) == bool(self.sources):
            raise ValueError("give the training text as `files:` (one stream) or as `sources:` (a mixture of domains), exactly one")
        if self.sources:
            if self.eval_files:
                raise ValueError("with `sources:`, held-out text is per domain: move eval_files into each source")
            names = [s.name for s in self.sources]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"source names must differ; {dup[0]!r} is used twice")
            if self.weights == "given":
                missing = [s.name for s in self.sources if s.weight is None]
                if missing:
                    raise ValueError(
                        f"source {missing[0]!r} has no weight; give every source a weight, or set data.weights "
                        f"to one of {', '.join(w for w in WEIGHT_RULES if w != 'given')}"
                    )
                if sum(s.weight for s in self.sources) <= 0:
                    raise ValueError("the sources' weights sum to 0; give at least one a positive weight")
        return self


class Grow(Strict):
    at_tokens: Annotated[int, COUNT_SCHEMA]  # train the starting model on this many tokens, then grow it
    plan: Union[str, dict]  # a surgery plan (file or inline) with one model; its ref is replaced by the trained model
    schedule: Literal["reset", "continue"] = "reset"  # Gstack resets optimizer and schedule; `continue` keeps the LR curve
    trainable: Optional[Union[str, tuple[str, ...]]] = None  # what trains after growth (default: the top-level `trainable`)
    # G_random with masks (Gstack's masked structural growth): each new layer's contribution to the
    # residual stream is multiplied by min(1, step / mask_steps), so the grown model starts from the
    # small model's function and the new layers fade in; the mask follows the step, so it resumes exactly
    mask_steps: Optional[int] = Field(default=None, ge=1)
    # width masks (surgery/train/masks.py): `msg` (MSG and the Gstack paper's code: new heads masked at
    # their q, k, v; MLP units, then the stream, then heads, each over mask_steps) or `together`
    # (ours: every mask over the same mask_steps, new heads masked before o_proj)
    masks: Literal["msg", "together"] = "msg"
    # G_learn (LiGO): `learn` trains the growth operator (each grown layer a learned combination of
    # the small model's layers, per parameter type; in width, one expansion [I; R] per kind of unit,
    # tied between a matrix's in- and out-side, as the Gstack paper's code has it) for learn_steps
    # steps with the small model frozen, writes the grown weights, then continues; `learn-split`: the
    # width operator untied and started at the plan's function-preserving split (ours); `plan`
    # (default) takes the plan's weights as they are
    operator: Literal["plan", "learn", "learn-split"] = "plan"
    learn_steps: Optional[int] = Field(default=None, ge=1)
    learn_lr: float = Field(default=1e-2, gt=0, allow_inf_nan=False)

    _count = field_validator("at_tokens", mode="before")(lambda v: parse_count(v))

    @model_validator(mode="after")
    def _learn(self):
        if self.learns and self.learn_steps is None:
            raise ValueError(f"operator: {self.operator} needs learn_steps (how many steps the growth operator trains; LiGO used 100)")
        if not self.learns and self.learn_steps is not None:
            raise ValueError("learn_steps is for operator: learn or learn-split")
        return self

    @property
    def learns(self) -> bool:
        """The operator is learned (LiGO) before the grown model trains."""
        return self.operator != "plan"


# HF Trainer's reporting integrations and the check that each one's package is installed
REPORT_TO = (
    "tensorboard",
    "wandb",
    "mlflow",
    "trackio",
    "comet_ml",
    "neptune",
    "clearml",
    "dagshub",
    "dvclive",
    "codecarbon",
    "swanlab",
    "azure_ml",
    "flyte",
)


# `routers`, `experts`: a mixture of experts' routers (and shared-expert gates) / its experts (routed and shared)
TRAINABLE_KEYWORDS = ("all", "new-layers", "new-params", "routers", "experts")


class TrainConfig(Strict):
    model: str  # an HF causal LM folder (typically a `surgery apply` output) or a hub id in the local cache
    output: Optional[str] = None
    data: Data
    trainable: Union[str, tuple[str, ...]] = "all"  # all | new-layers | new-params | routers | experts | name patterns
    freeze_embeddings: bool = False  # keep the input embeddings and lm_head (tied or not) fixed
    # new parameters no gradient can reach (all-zero blocks, zero width units) are refused for
    # `trainable: new-layers|new-params` and `grow:` unless this says they are meant
    allow_dead: bool = False
    # optimisation
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: Union[int, float] = 0.01  # steps (an integer) or a fraction of the steps (below 1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float = Field(default=1.0, ge=0)  # 0 turns clipping off
    micro_batch: int = Field(default=8, ge=1)  # sequences per device per forward
    grad_accum: int = Field(default=1, ge=1)
    tokens: Annotated[Optional[int], COUNT_SCHEMA] = None  # the budget in tokens, or
    steps: Optional[int] = Field(default=None, ge=1)  # in optimizer steps
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on a GPU with bf16, else fp32
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard parameters, grads and optimizer state with FSDP2 (multi-GPU)
    gradient_checkpointing: bool = False
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the input checkpoint's dtype
    # bookkeeping
    save_every: Optional[int] = Field(default=None, ge=1)  # checkpoint every N steps (default: ~10 per run)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: Optional[int] = Field(default=None, ge=1)  # held-out loss every N steps (default: ~10 per run)
    log_every: Optional[int] = Field(default=None, ge=1)
    seed: int = 0
    workers: int = Field(default=0, ge=0)  # dataloader worker processes
    # a mixture of experts: the router's load-balancing loss is added to the training loss (not to
    # held-out losses) with the model config's router_aux_loss_coef, or this one; 0 turns it off
    router_aux_loss_coef: Optional[float] = Field(default=None, ge=0, le=1)
    # experiment tracking through HF Trainer's own integrations (tensorboard, wandb, mlflow, trackio,
    # ...); metrics.jsonl and loss.png are written either way. TensorBoard's events go to OUT/logs.
    report_to: tuple[str, ...] = ()
    grow: Optional[Grow] = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise ValueError("report_to is a name or a list of names, e.g. tensorboard or [tensorboard, wandb]")
        if list(v) == ["none"]:
            return ()
        bad = [x for x in v if x not in REPORT_TO]
        if bad:
            raise ValueError(f"report_to {bad[0]!r} is not one of HF Trainer's integrations: {', '.join(REPORT_TO)} (or none)")
        return tuple(dict.fromkeys(v))

    _tok = field_validator("tokens", mode="before")(lambda v: None if v is None else parse_count(v))

    @field_validator("trainable")
    @classmethod
    def _trainable(cls, v):
        for x in [v] if isinstance(v, str) else v:
            if x not in TRAINABLE_KEYWORDS and not any(c in x for c in "*?[."):
                raise ValueError(
                    f"trainable {x!r} is not one of {', '.join(TRAINABLE_KEYWORDS)} or a parameter-name pattern "
                    "(e.g. 'model.layers.1[0-9].*')"
                )
        if not isinstance(v, str) and any(x in ("all", "new-layers", "new-params") for x in v):
            raise ValueError("all, new-layers and new-params stand alone; a list holds patterns, routers and experts")
        return v

    @field_validator("warmup")
    @classmethod
    def _warmup(cls, v):
        if v < 0 or (isinstance(v, float) and v >= 1 and not float(v).is_integer()):
            raise ValueError("warmup is a number of steps (integer) or a fraction of the run below 1")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("give exactly one budget: `tokens` (e.g. 2M) or `steps`")
        return self


@dataclass
class Config(FromDocument):
    body: TrainConfig
    doc: Located = field(repr=False)
    base_dir: Path


def config_from_doc(doc: Located, base_dir: Path, overrides: dict | None = None) -> Config:
    data = doc.data
    if not isinstance(data, dict):
        raise PlanError(
            "a training config is a YAML mapping with at least `model:`, `data:` and a budget",
            where=doc.where(),
            fix="see examples/train-*.yaml",
        )
    data = dict(data)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k in ("seq_len", "files"):
            data["data"] = {**(data.get("data") or {}), k: v}
        elif k in ("tokens", "steps"):
            data.pop("tokens", None), data.pop("steps", None)
            data[k] = v
        else:
            data[k] = v
    try:
        body = TrainConfig.model_validate(data)
    except ValidationError as e:
        raise PlanError(_problems(e, doc, (), TrainConfig, data)) from None
    return Config(body, doc, base_dir)


def with_seq_len(cfg: Config, model_dir) -> Config:
    """The config with data.seq_len set (its default from the model's context when not given): a new
    Config, the loaded one is never changed."""
    import dataclasses

    if cfg.body.data.seq_len is not None:
        return cfg
    import transformers

    ctx = getattr(transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False), "max_position_embeddings", None)
    data = cfg.body.data.model_copy(update={"seq_len": default_seq_len(ctx)})
    return dataclasses.replace(cfg, body=cfg.body.model_copy(update={"data": data}))


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    path = Path(path)
    return config_from_doc(load_yaml_file(path), path.resolve().parent, overrides)


def config_from_text(text: str, base_dir: str | Path = ".", overrides: dict | None = None, source: str = "<config>") -> Config:
    return config_from_doc(load_yaml_text(text, source), Path(base_dir).resolve(), overrides)


EVAL_TOKENS_GPU, EVAL_TOKENS_CPU, EVAL_TOKENS_CPU_MIN = 2_000_000, 65_536, 16_384
EVAL_FLOPS_CPU = 2e12  # one held-out evaluation's forward FLOPs on a CPU: ~30 s on 2 cores


def eval_token_cap(d: Data, model_dir=None) -> int:
    """data.eval_max_tokens, or its default for the machine: 2M tokens with a GPU; on a CPU, as many
    as ~2e12 forward FLOPs allow for this model (2 x parameters per token; at least 16K, at most
    2M: a 135M model gets 16K tokens, a tiny test model 2M), 64K when the size is unknown."""
    if d.eval_max_tokens is not None:
        return d.eval_max_tokens
    import torch

    if torch.cuda.is_available():
        return EVAL_TOKENS_GPU
    params = _parameters(model_dir) if model_dir is not None else None
    if not params:
        return EVAL_TOKENS_CPU
    return int(min(EVAL_TOKENS_GPU, max(EVAL_TOKENS_CPU_MIN, EVAL_FLOPS_CPU / (2 * params))))


def _parameters(model_dir) -> int | None:
    """The checkpoint's parameter count from its safetensors headers (no weights read), or None."""
    from surgery.errors import SurgeryError
    from surgery.io.checkpoint import open_checkpoint

    try:
        ck = open_checkpoint("model", str(model_dir), Path(model_dir))
    except (SurgeryError, OSError):
        return None
    return sum(t.numel for t in ck.tensors.values())


def run_sequences(body: TrainConfig, world: int = 1) -> int:
    """The training sequences a run draws in all: its budget (`steps`, or `tokens` at micro_batch x
    seq_len x grad_accum x world tokens per step) in sequences. `train` draws exactly this many and
    `mix` judges each domain's supply (`exhausted: stop|repeat`) against it, so they cannot disagree."""
    per_step = body.micro_batch * body.grad_accum * world
    total = body.steps if body.steps is not None else math.ceil(body.tokens / (per_step * body.data.seq_len))
    return total * per_step


def default_seq_len(max_positions) -> int:
    """data.seq_len when the config leaves it out: the model's context, at most 2048."""
    return min(2048, max_positions) if isinstance(max_positions, int) and max_positions > 0 else 2048


def train_schema() -> dict:
    """The JSON schema of training configs (`surgery schema --train`)."""
    from surgery.plan.schema import DIALECT

    s = TrainConfig.model_json_schema()
    s.update({"$schema": DIALECT, "$id": "https://surgery.dev/schemas/train.schema.json", "title": "surgery train config"})
    return s


def load_sources(path: str | Path):
    """The `sources:` of a YAML file (a training config's `data.sources`, or a file holding `sources:`
    with the data settings beside it) for `surgery eval --data`: (the validated `Data`, where(*keys))."""
    doc = load_yaml_file(Path(path))
    data, prefix = doc.data, ()
    if isinstance(data, dict) and isinstance(data.get("data"), dict):
        data, prefix = data["data"], ("data",)
    if not isinstance(data, dict) or "sources" not in data:
        raise PlanError(
            "this YAML file has no `sources:` to evaluate",
            where=doc.where(prefix),
            fix="give a training config with data.sources, or a file with `sources: [{name, files, eval_files}]`",
        )
    try:
        d = Data.model_validate(data)
    except ValidationError as e:
        raise PlanError(_problems(e, doc, prefix, Data, data)) from None
    return d, lambda *keys: doc.where(prefix + keys)
