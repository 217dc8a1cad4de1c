"""The plan language: a strict schema over YAML, with every error located at plan file:line.

A plan names its models and builds the output layer stack with ordered steps. Each step is a
one-key mapping `{op: {...}}`; the ops and their schemas live in the registry (`surgery.registry`)
that plugins extend. Unknown keys, ops and model names are errors listing the valid choices;
all problems in a plan are reported at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from typing_extensions import Annotated

from surgery.io.safetensors import DTYPE_NAMES
from surgery import registry
from surgery.errors import PlanError, Problem
from surgery.plan.yamlio import FromDocument, Located, load_yaml_file, load_yaml_text

MAX_LAYERS = 10_000  # no real model comes near; bounds `times`, ranges and the work a plan can ask for


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


# Numbers and strings are strict (true is not 1, !!binary is not text); lists still become tuples.
Range = tuple[StrictInt, StrictInt]
Gradient = Union[StrictFloat, tuple[StrictFloat, ...]]


def check_range(v: Optional[Range]) -> Optional[Range]:
    if v is None:
        return v
    a, b = v
    if a < 0 or b < 0:
        raise ValueError(f"layer range [{a}, {b}] has a negative bound; ranges are [start, end) with 0 <= start < end")
    if b <= a:
        raise ValueError(f"layer range [{a}, {b}] is empty; ranges are half-open [start, end), so end must exceed start")
    if b > MAX_LAYERS:
        raise ValueError(f"layer range end {b} exceeds the limit of {MAX_LAYERS} layers")
    return v


def check_std(step):
    """`std` belongs to `init: random` only (expand, widen)."""
    if step.std is not None and step.init != "random":
        raise ValueError(f"`std` only applies to `init: random` (this step has init: {step.init})")
    return step


def check_gradient(v: Gradient) -> Gradient:
    if isinstance(v, tuple) and not v:
        raise ValueError("a gradient list needs at least one value")
    return v


# ---------------------------------------------------------------------------------------------
# steps


class Step(Strict):
    op: ClassVar[str]
    summary: ClassVar[str]


class Take(Step):
    op: ClassVar[str] = "take"
    summary: ClassVar[str] = "append layers [start, end) of a model (all of them when no range)"
    model: StrictStr
    layers: Optional[Range] = None
    scale: Optional[Setting] = None  # mergekit passthrough's `scale`; the first step's also scales non-layer tensors
    _r = field_validator("layers")(check_range)


class Stack(Step):
    op: ClassVar[str] = "stack"
    summary: ClassVar[str] = "repeat the current stack (or a range of it) `times` times: Gstack's G_direct"
    times: StrictInt = Field(ge=2, le=64)
    layers: Optional[Range] = None
    _r = field_validator("layers")(check_range)


class Dus(Step):
    op: ClassVar[str] = "dus"
    summary: ClassVar[str] = "SOLAR depth up-scaling: [0, n-m) + [m, n), from `trim: m` or target `layers: s`"
    trim: Optional[StrictInt] = Field(default=None, ge=1)
    layers: Optional[StrictInt] = Field(default=None, ge=2)

    @model_validator(mode="after")
    def _one(self):
        if (self.trim is None) == (self.layers is None):
            raise ValueError("give exactly one of `trim: m` (layers removed at the seam) or `layers: s` (target depth)")
        if self.layers is not None and self.layers % 2:
            raise ValueError(f"`layers: {self.layers}` is odd; depth up-scaling gives s = 2 * (n - m), always even")
        return self


class Expand(Step):
    op: ClassVar[str] = "expand"
    summary: ClassVar[str] = "LLaMA Pro: after each of `groups` groups insert `per_group` copies of its top block"
    groups: StrictInt = Field(ge=1, le=MAX_LAYERS)
    per_group: StrictInt = Field(default=1, ge=1, le=64)
    init: Literal["identity", "copy", "zero", "random"] = "identity"
    std: Optional[StrictFloat] = Field(default=None, gt=0)
    seed: StrictInt = 0

    _std = model_validator(mode="after")(lambda self: check_std(self))


class Widen(Step):
    op: ClassVar[str] = "widen"
    summary: ClassVar[str] = (
        "grow the MLP (`intermediate`), the residual stream (`hidden`) and the attention heads (Gstack's width "
        "operators): split copies units and divides what reads them (the same function), zero and random add new units"
    )
    intermediate: Optional[StrictInt] = Field(default=None, ge=1, le=1 << 20)
    hidden: Optional[StrictInt] = Field(default=None, ge=1, le=1 << 20)  # an integer multiple of the hidden size (split)
    heads: Optional[StrictInt] = Field(default=None, ge=1, le=1 << 14)  # attention heads (split; head_dim stays)
    kv_heads: Optional[StrictInt] = Field(default=None, ge=1, le=1 << 14)  # key/value heads (keep the heads/kv ratio)
    init: Literal["split", "zero", "random"] = "split"
    # split: what each copy takes of the weights reading its unit. even: 1/copies (Net2Net); random:
    # seeded shares summing to 1 per unit (LEMON's asymmetric split): the same function, and copies
    # that no longer get identical gradients, so training can tell them apart
    shares: Literal["even", "random"] = "even"
    std: Optional[StrictFloat] = Field(default=None, gt=0)
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _what(self):
        if self.std is not None and self.init == "split":
            raise ValueError("`std` only applies to init: zero (its random A, C blocks) and init: random, not to split")
        if self.shares != "even" and self.init != "split":
            raise ValueError("`shares` is for init: split (zero and random units are new, not copies)")
        if self.intermediate is None and self.hidden is None and self.heads is None and self.kv_heads is None:
            raise ValueError("give `intermediate` (MLP units), `hidden` (the residual stream's width), `heads` or `kv_heads`")
        return self


class Gstack(Step):
    """A growth operator of the Gstack paper (Du et al., NeurIPS 2024, Appendix A) by its name, laid
    out as its reference code (tongxuluo/prts) lays it; it writes the same layers as the hand-written
    step named beside each operator (`validate` shows them):

    - direct: `stack: {times: factor}` (G↑direct, the paper's Gstack);
    - zero: each layer followed by factor - 1 copies whose attention output and MLP down
      projections are zero (prts `G_zero_depthwise.py`): `expand: {groups: n, per_group: factor - 1,
      init: identity}`; the same function; the zeroed projections get a gradient at once and the
      rest of the copy through them after the first step (an all-zero block never does);
    - random: (factor - 1) * n new random layers on top of the n old ones (prts `msg.py`), to be
      faded in by `grow.mask_steps` in training: `expand: {groups: 1, per_group: (factor-1) n, init: random}`.

    G↑learn is `direct` with `grow: {operator: learn}` in training. The width operators are `widen`
    (see the README's operator table)."""

    op: ClassVar[str] = "gstack"
    summary: ClassVar[str] = "a Gstack depth operator by name (direct | zero | random, x factor), laid out as the paper's code"
    operator: Literal["direct", "zero", "random"]
    direction: Literal["depth"] = "depth"
    factor: StrictInt = Field(ge=2, le=64)
    std: Optional[StrictFloat] = Field(default=None, gt=0)
    seed: StrictInt = 0

    @model_validator(mode="after")
    def _std(self):
        if self.std is not None and self.operator != "random":
            raise ValueError(f"`std` only applies to operator: random (this step has operator: {self.operator})")
        return self


class ExpertSource(Strict):
    """One expert of an upcycled layer taken from a model of the same shape (FrankenMoE, as
    mergekit-moe builds them), with the prompts that initialise its router row (`cheap_embed`)."""

    model: StrictStr
    positive_prompts: tuple[StrictStr, ...] = ()
    negative_prompts: tuple[StrictStr, ...] = ()
    residual_scale: Optional[StrictFloat] = None  # the expert's down projection times this (mergekit-moe's)
    noise_scale: Optional[StrictFloat] = Field(default=None, ge=0)  # N(0, noise_scale) added, seeded (mergekit-moe's, unseeded)


class Upcycle(Step):
    """Sparse upcycling (Komatsuzaki et al., ICLR 2023): each layer's dense MLP becomes experts
    behind a new router choosing `top_k` of them per token, in the MoE layout of the model's family
    (Llama, Mistral -> Mixtral; Qwen2 -> Qwen2-MoE, with its shared expert; Qwen3 -> Qwen3-MoE).
    `experts`: how many copies of the layer's own MLP, or a list of models (of the same shape) each
    giving one expert (FrankenMoE). `router: zero` (uniform: every expert equally likely) keeps a
    copy-upcycled model's function exactly (identical experts, renormalised top-k weights); `random`
    draws it N(0, std) from `seed`; `cheap_embed` (mergekit-moe's) sets each expert's row to the
    normalised sum of its prompts' token embeddings (minus its negative prompts'), the same in every
    layer. `layers` (Qwen-MoE only; Mixtral has no dense layers) upcycles a range and keeps the
    others dense. `shared` (Qwen2-MoE): the shared expert from a model of the same shape, its gate
    from its prompts like the routers (zero without prompts); without it the shared expert is the
    dense MLP and the routed experts' down projections are halved, so the function is kept. `noise`:
    N(0, noise) added to every expert (seeded), to break the copies' symmetry (an expert's own
    noise_scale wins)."""

    op: ClassVar[str] = "upcycle"
    summary: ClassVar[str] = (
        "sparse upcycling: every MLP becomes experts (copies or other models') behind a new top-k router (dense -> MoE)"
    )
    experts: Union[StrictInt, tuple[ExpertSource, ...]]
    top_k: StrictInt = Field(default=2, ge=1, le=1024)
    router: Literal["zero", "uniform", "random", "uniform_random", "cheap_embed", "hidden", "hidden_avg"] = "zero"
    std: Optional[StrictFloat] = Field(default=None, gt=0)
    seed: StrictInt = 0
    layers: Optional[Range] = None
    router_aux_loss_coef: StrictFloat = Field(default=0.001, ge=0, le=1)
    shared: Optional[ExpertSource] = None
    noise: StrictFloat = Field(default=0.0, ge=0)

    @property
    def count(self) -> int:
        return self.experts if isinstance(self.experts, int) else len(self.experts)

    @property
    def sources(self) -> tuple:
        """The expert models, or () for copies of the layer's own MLP."""
        return () if isinstance(self.experts, int) else self.experts

    @model_validator(mode="after")
    def _k(self):
        if not 1 <= self.count <= 1024:
            raise ValueError(f"experts: {self.count} is not a number of experts from 1 to 1024")
        if self.top_k > self.count:
            raise ValueError(f"top_k {self.top_k} is more than the {self.count} experts: a token can be routed to at most all of them")
        if self.std is not None and self.router not in ("random", "uniform_random"):
            raise ValueError("`std` is for router: random")
        if self.router in ("cheap_embed", "hidden", "hidden_avg"):
            bare = [i for i, e in enumerate(self.sources) if not e.positive_prompts]
            if not self.sources or bare:
                raise ValueError(
                    f"router: {self.router} needs positive_prompts for every expert"
                    + (f" (expert {bare[0]} has none)" if bare else " (give experts as a list of {model, positive_prompts})")
                )
        return self

    _r = field_validator("layers")(lambda v: v if v is None else check_range(v))


class Drop(Step):
    op: ClassVar[str] = "drop"
    summary: ClassVar[str] = "remove layers [start, end) of the current stack"
    layers: Range
    _r = field_validator("layers")(check_range)


def check_setting(v: Any) -> Any:
    """A parameter setting: a scalar, a gradient list, or a list of {filter, value} conditions."""
    import math

    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)) and v:
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or all(isinstance(x, str) for x in v):
            bad = [x for x in v if isinstance(x, float) and not math.isfinite(x)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a finite number")
            return tuple(v)
        if all(isinstance(x, dict) for x in v):
            for c in v:
                extra = set(c) - {"filter", "value"}
                if extra or "value" not in c:
                    raise ValueError(f"a condition is {{filter: substring, value: number or list}}; got keys {sorted(c)}")
                check_setting(c["value"])
                if c.get("filter") is not None and not isinstance(c["filter"], str):
                    raise ValueError(f"filter must be a string, got {c['filter']!r}")
            return tuple(dict(c) for c in v)
    raise ValueError(
        f"{v!r} is not a setting: use a number, a list of numbers (a gradient over the layers), or a list of {{filter, value}} conditions"
    )


Setting = Annotated[Any, AfterValidator(check_setting)]


class MergeSource(Strict):
    model: StrictStr
    layers: Optional[Range] = None
    parameters: dict[str, Setting] = {}
    _r = field_validator("layers")(check_range)


class Override(Strict):
    filter: StrictStr = Field(min_length=1)
    t: Optional[Gradient] = None
    weights: Optional[tuple[Gradient, ...]] = None
    _g = field_validator("t")(lambda v: v if v is None else check_gradient(v))


class Merge(Step):
    op: ClassVar[str] = "merge"
    summary: ClassVar[str] = "append layer-wise merges: slerp (t), linear (weights), nuslerp, or a plugin's method"
    method: StrictStr
    models: tuple[Union[str, MergeSource], ...] = Field(min_length=1)
    base: Optional[StrictStr] = None
    layers: Optional[Range] = None
    t: Optional[Gradient] = None
    weights: Optional[tuple[Gradient, ...]] = None
    normalize: Optional[bool] = None
    overrides: tuple[Override, ...] = ()
    parameters: dict[str, Setting] = {}
    _r = field_validator("layers")(check_range)
    _g = field_validator("t")(lambda v: v if v is None else check_gradient(v))

    @model_validator(mode="after")
    def _params(self, info: ValidationInfo):
        from surgery.methods import get_method

        mergekit = bool(info.context and info.context.get("mergekit"))
        spec = get_method(self.method)  # a SurgeryError (a ValueError) lists the methods
        n = len(self.models)
        names = [m if isinstance(m, str) else m.model for m in self.models]
        if len(set(names)) != n:
            dup = sorted({x for x in names if names.count(x) > 1})
            raise ValueError(f"model(s) {dup} appear twice in one merge; each model contributes once")
        if self.t is not None or any(o.t is not None for o in self.overrides):
            if spec.param("t") is None:
                raise ValueError(f"{self.method} takes no `t`; its parameters: {', '.join(p.name for p in spec.params)}")
            if "t" in self.parameters:
                raise ValueError("give `t` once: as `t:` or in `parameters:`")
        if self.weights is not None or any(o.weights is not None for o in self.overrides):
            if spec.param("weight") is None:
                raise ValueError(f"{self.method} takes no weights; its parameters: {', '.join(p.name for p in spec.params)}")
            if self.weights is not None and len(self.weights) != n:
                raise ValueError(f"`weights` has {len(self.weights)} entries for {n} models; give one per model")
            for o in self.overrides:
                if o.weights is not None and len(o.weights) != n:
                    raise ValueError(f"override {o.filter!r}: `weights` has {len(o.weights)} entries for {n} models")
        for o in self.overrides:
            if o.t is None and o.weights is None:
                raise ValueError(f"override {o.filter!r} sets nothing; give `t` (slerp) or `weights` (linear)")
        known = {p.name for p in spec.params}
        for where, params in [("parameters", self.parameters)] + [
            (f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models) if not isinstance(m, str)
        ]:
            unknown = sorted(set(params) - known)
            if unknown:
                raise ValueError(f"{where}: {self.method} has no parameter {unknown[0]!r}; its parameters: {', '.join(sorted(known))}")
        base = self.base if self.base is not None else (names[0] if spec.base == "required" else None)
        for p in spec.params:
            if not p.required:
                continue
            sugar = {"t": self.t is not None, "weight": self.weights is not None}.get(p.name, False)
            # a non_base parameter (ties' weight and density, ...) is not asked of the base, as mergekit resolves it
            needing = [m for m in self.models if p.scope == "input" or (m if isinstance(m, str) else m.model) != base]
            missing = [m if isinstance(m, str) else m.model for m in needing if isinstance(m, str) or p.name not in m.parameters]
            if not (p.name in self.parameters or sugar or (p.scope != "shared" and not missing)):
                who = "" if p.scope == "shared" else (" for every model but the base" if p.scope == "non_base" else " for every model")
                if mergekit:
                    hint = (
                        f"`parameters: {{{p.name}: ...}}` on each model (missing on {', '.join(missing)}) or at the top"
                        if p.scope != "shared"
                        else f"`parameters: {{{p.name}: ...}}`"
                    )
                else:
                    k = len(needing) if p.scope != "shared" else 0
                    hint = (
                        {"t": "`t: 0.5`", "weight": f"`weights: [{', '.join(['0.5'] * len(self.models))}]`"}.get(
                            p.name, f"`parameters: {{{p.name}: ...}}`"
                        )
                        if k == len(self.models) or p.name != "weight"
                        else f"`parameters: {{weight: ...}}` on each of {', '.join(missing)}"
                    )
                raise ValueError(f"{self.method} needs `{p.name}`{who}; give e.g. {hint}")
        if self.normalize is not None and spec.param("normalize") is None:
            raise ValueError(f"{self.method} takes no `normalize`")
        inputs = n + (1 if self.base is not None and self.base not in names else 0)

        if spec.base == "none" and self.base is not None:
            raise ValueError(f"{self.method} takes no base model")
        if inputs < spec.min_inputs or (spec.max_inputs is not None and inputs > spec.max_inputs):
            want = (
                f"exactly {spec.min_inputs}"
                if spec.min_inputs == spec.max_inputs
                else (f"{spec.min_inputs} to {spec.max_inputs}" if spec.max_inputs else f"at least {spec.min_inputs}")
            )
            raise ValueError(f"{self.method} merges {want} models (the base included); got {inputs}")
        return self

    @property
    def sources(self) -> tuple[MergeSource, ...]:
        out = tuple(MergeSource(model=m) if isinstance(m, str) else m for m in self.models)
        if self.base is not None and self.base not in [s.model for s in out]:
            out += (MergeSource(model=self.base),)  # mergekit adds a base that is not among the models
        return out

    @property
    def base_model(self) -> Optional[str]:
        from surgery.methods import get_method

        spec = get_method(self.method)
        if self.base is not None:
            return self.base
        return self.sources[0].model if spec.base == "required" else None


class ScaleStep(Step):
    op: ClassVar[str] = "scale"
    summary: ClassVar[str] = "multiply tensors (by name filter) of a layer range of the current stack"
    factor: StrictFloat
    layers: Optional[Range] = None
    filter: Optional[StrictStr] = None
    _r = field_validator("layers")(check_range)


BUILTIN_STEPS: tuple[type[Step], ...] = (Take, Stack, Dus, Expand, Gstack, Drop, Merge, ScaleStep, Widen, Upcycle)


def step_types() -> dict[str, type[Step]]:
    """Every plan step, built-in and from plugins: op -> schema."""
    return dict(registry.current().steps)


# ---------------------------------------------------------------------------------------------
# plan

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)  # 5GB, 2GiB, 5e9
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(v: Any, what: str = "shard size", minimum: int = 1024) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    else:
        m = _SIZE.match(str(v)[:100])
        if not m or float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()] > 1 << 60:
            raise ValueError(f"{v!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n < minimum:
        least = f"{minimum >> 20}MiB" if minimum >= 1 << 20 else f"{minimum // 1024}KB"
        raise ValueError(f"{what + ' ' if what else ''}{n} bytes is too small (at least {least})")
    return n


class TokenSource(Strict):
    kind: Literal["model_token", "zero"]
    model: Optional[StrictStr] = None
    token_id: Optional[StrictInt] = Field(default=None, ge=0)
    token: Optional[StrictStr] = None

    @model_validator(mode="after")
    def _one(self):
        if self.kind == "model_token" and (self.model is None or (self.token_id is None) == (self.token is None)):
            raise ValueError("a model_token source names `model` and exactly one of `token_id` or `token`")
        if self.kind == "zero" and (self.model or self.token_id is not None or self.token):
            raise ValueError("a zero source takes no other keys")
        return self


class TokenSetting(Strict):
    source: Union[StrictStr, TokenSource, None] = None  # a model name, a model's token, or zero
    force: bool = False


class TokenizerOptions(Strict):
    tokens: dict[StrictStr, TokenSetting] = {}
    pad_to_multiple_of: Optional[StrictInt] = Field(default=None, ge=1, le=4096)


class ModelRef(Strict):
    path: StrictStr
    revision: Optional[StrictStr] = None


DTYPE_SCHEMA = WithJsonSchema({"anyOf": [{"enum": sorted(DTYPE_NAMES)}, {"type": "null"}]})
SIZE_SCHEMA = WithJsonSchema(
    {"anyOf": [{"type": "integer", "minimum": 1024}, {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([KMGTkmgt][iI]?[bB]|[bB])?\s*$"}]}
)


class Output(Strict):
    dtype: Annotated[Optional[StrictStr], DTYPE_SCHEMA] = None
    shard_size: Annotated[int, SIZE_SCHEMA] = 5 * 10**9
    path: Optional[StrictStr] = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {v!r}; valid: {', '.join(DTYPE_NAMES)}")
        return v

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)


class PlanBody(Strict):
    name: Optional[StrictStr] = None
    input_dtype: Annotated[Optional[StrictStr], DTYPE_SCHEMA] = None
    seed: Optional[StrictInt] = None  # for random merge methods (dare, della, ...): seeded per tensor, reproducible
    chat_template: Optional[StrictStr] = None  # a Jinja template, "auto" (the models' most common), or a plugin's named one
    _in_dtype = field_validator("input_dtype")(lambda v: Output._dtype(v))
    models: dict[str, Union[str, ModelRef]] = Field(min_length=1)
    steps: tuple[Any, ...] = Field(min_length=1)
    non_layer: Optional[StrictStr] = None
    post_from: Literal["first", "last"] = "first"  # without non_layer: the step final norm and lm_head follow
    tokenizer: Optional[StrictStr] = None
    # mergekit's `tokenizer:` block beyond its source (mergekit plugin): per-token embedding sources
    # {token: {source: MODEL | {kind: model_token, model: MODEL, token_id | token} | {kind: zero}, force}}
    # and pad_to_multiple_of (embedding rows padded, the tokenizer not)
    tokenizer_options: Optional[TokenizerOptions] = None
    output: Output = Output()

    @field_validator("models")
    @classmethod
    def _names(cls, v):
        for k in v:
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][\w.-]*", k):
                raise ValueError(f"model name {k!r} must start with a letter or '_' and use letters, digits, '_', '.', '-'")
        return v


@dataclass(frozen=True)
class Plan(FromDocument):
    """A validated plan: its body, its steps, and where everything came from."""

    body: PlanBody
    steps: tuple[Step, ...]
    doc: Located = field(compare=False, repr=False)
    base_dir: Path = field(compare=False)
    mergekit: Any = field(default=None, compare=False, repr=False)  # the original mergekit config, if translated

    def step_where(self, i: int) -> str:
        return self.doc.where(("steps", i))

    def model_ref(self, name: str) -> ModelRef:
        r = self.body.models[name]
        return ModelRef(path=r) if isinstance(r, str) else r

    @property
    def raw(self) -> Any:
        return self.doc.data


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file (or a mergekit config, translated). Raises `PlanError` listing
    every problem with its file:line."""
    from surgery.plan.mergekit import is_mergekit, is_mergekit_moe, translate, translate_moe

    path = Path(path)
    doc = load_yaml_file(path)
    if is_mergekit(doc.data):
        # mergekit resolves local model paths against the working directory
        return plan_from_doc(translate(doc), Path.cwd().resolve(), mergekit=doc.data)
    if is_mergekit_moe(doc.data):
        return plan_from_doc(translate_moe(doc), Path.cwd().resolve(), mergekit=doc.data)
    return plan_from_doc(doc, path.resolve().parent)


def plan_from_text(text: str, base_dir: str | Path = ".", source: str = "<plan>") -> Plan:
    return plan_from_doc(load_yaml_text(text, source), Path(base_dir).resolve())


def plan_from_doc(doc: Located, base_dir: Path, mergekit: Any = None) -> Plan:
    data = doc.data
    if not isinstance(data, dict):
        raise PlanError(
            "a plan is a YAML mapping with `models:` and `steps:`",
            where=doc.where(),
            fix="see `surgery schema` or the README's plan reference",
        )
    problems: list[Problem] = []
    try:
        body = PlanBody.model_validate(data)
    except ValidationError as e:
        problems += _problems(e, doc, (), PlanBody, data)
        body = None
    steps: list[Step] = []
    s_index: dict[int, int] = {}
    raw_steps = data.get("steps")
    if isinstance(raw_steps, list):
        for i, raw in enumerate(raw_steps):
            step = _parse_step(raw, i, doc, problems, mergekit is not None)
            if step is not None:
                steps.append(step)
                s_index[id(step)] = i
    declared = data.get("models")
    if isinstance(declared, dict) and declared:
        names = ", ".join(map(str, declared))
        for s in steps:
            for key, model in _model_mentions(s):
                if model not in declared:
                    problems.append(
                        Problem(
                            doc.where(("steps", s_index[id(s)], s.op) + key), f"unknown model {model!r}", f"models in this plan: {names}"
                        )
                    )
        opts = data.get("tokenizer_options")
        if isinstance(opts, dict) and isinstance(opts.get("tokens"), dict):
            for tok, setting in opts["tokens"].items():
                src = setting.get("source") if isinstance(setting, dict) else None
                model = src if isinstance(src, str) else src.get("model") if isinstance(src, dict) else None
                if isinstance(model, str) and model not in declared:
                    problems.append(
                        Problem(
                            doc.where(("tokenizer_options", "tokens", tok)), f"unknown model {model!r}", f"models in this plan: {names}"
                        )
                    )
        if isinstance(opts, dict) and data.get("tokenizer") is None:
            problems.append(
                Problem(
                    doc.where(("tokenizer_options",)),
                    "tokenizer_options needs `tokenizer:` (union or a model)",
                    "set `tokenizer: union` or the model whose tokenizer the output keeps",
                )
            )
        tokenizer_sources = registry.current().tokenizer_sources
        for key in ("non_layer", "tokenizer"):
            v = data.get(key)
            if key == "tokenizer" and v in tokenizer_sources:
                continue
            if key == "tokenizer" and v == "union":
                problems.append(
                    Problem(
                        doc.where((key,)),
                        "tokenizer: union merges the models' vocabularies with "
                        "mergekit's tokenizer code, and the mergekit plugin is not installed",
                        "install the surgery-mergekit plugin (from a source checkout: pip install -e plugins/surgery-mergekit)",
                    )
                )
            elif isinstance(v, str) and v not in declared:
                problems.append(
                    Problem(
                        doc.where((key,)),
                        f"unknown model {v!r}",
                        f"models in this plan: {names}"
                        + (f"; tokenizer sources: {', '.join(tokenizer_sources)}" if key == "tokenizer" and tokenizer_sources else ""),
                    )
                )
    if problems:
        raise PlanError(sorted(problems, key=_line_of))
    return Plan(body=body, steps=tuple(steps), doc=doc, base_dir=base_dir, mergekit=mergekit)


def _line_of(p: Problem) -> int:
    tail = (p.where or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def _model_mentions(s: Step):
    if isinstance(s, Take):
        yield ("model",), s.model
    elif isinstance(s, Merge):
        for j, m in enumerate(s.models):
            yield (("models", j) if isinstance(m, str) else ("models", j, "model")), (m if isinstance(m, str) else m.model)
        if s.base is not None:
            yield ("base",), s.base


def _parse_step(raw: Any, i: int, doc: Located, problems: list[Problem], mergekit: bool = False) -> Step | None:
    where = doc.where(("steps", i))
    types = step_types()
    ops = ", ".join(types)
    if not isinstance(raw, dict) or len(raw) != 1:
        got = f"keys {list(raw)}" if isinstance(raw, dict) else type(raw).__name__
        problems.append(
            Problem(
                where,
                f"a step is a mapping with exactly one operation, got {got}",
                f"write e.g. `- take: {{model: base}}`; operations: {ops}",
            )
        )
        return None
    ((op, body),) = raw.items()
    cls = types.get(op)
    if cls is None:
        problems.append(Problem(doc.where(("steps", i, op)), f"unknown operation {op!r}", f"valid operations: {ops}"))
        return None
    if body is None:
        body = {}
    try:
        return cls.model_validate(body, context={"mergekit": mergekit})
    except ValidationError as e:
        problems += _problems(e, doc, ("steps", i, op), cls, body)
        return None


def _problems(err: ValidationError, doc: Located, prefix: tuple, model: type[BaseModel], data: Any) -> list[Problem]:
    """Turn pydantic's errors into located problems with fixes; union alternatives are merged."""
    grouped: dict[tuple, list[str]] = {}
    fixes: dict[tuple, str | None] = {}
    errors = [(e, _real_path(data, e["loc"])) for e in err.errors(include_url=False)]
    deepest = [p for _, p in errors]
    for e, path in errors:
        if e["type"].endswith("_type") and any(len(q) > len(path) and q[: len(path)] == path for q in deepest):
            continue  # a union branch that refused the value's kind, where another branch got further into it
        full = prefix + path
        if prefix == () and path[:1] == ("steps",) and len(path) > 2:
            continue  # step bodies are checked one by one with their own schema
        typ, msg = e["type"], e["msg"]
        fix = None
        if typ == "extra_forbidden":
            key = e["loc"][-1]
            owner = _owner(model, e["loc"][:-1])
            valid = sorted(owner.model_fields) if owner else []
            msg = f"unknown key {key!r}"
            fix = f"valid keys here: {', '.join(valid)}" if valid else None
        elif typ == "missing":
            msg = f"missing required key {e['loc'][-1]!r}"
        elif typ in ("value_error", "assertion_error"):
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        else:
            if typ == "literal_error":
                msg = f"{e['input']!r} is not allowed: {msg.lower()}"
            else:
                msg = msg[0].lower() + msg[1:]
                msg = f"{msg} (got {e['input']!r})" if "input" in e and not isinstance(e["input"], (dict, list)) else msg
            key = next((p for p in reversed(path) if isinstance(p, str)), None)
            msg = f"`{key}`: {msg}" if key and key != (prefix[-1] if prefix else None) else msg
        grouped.setdefault(full, [])
        if msg not in grouped[full]:
            grouped[full].append(msg)
        fixes.setdefault(full, fix)
    return [Problem(doc.where(p), " or ".join(m) if len(m) < 4 else m[0], fixes[p]) for p, m in grouped.items()]


def _real_path(data: Any, loc: tuple) -> tuple:
    """The prefix of pydantic's `loc` that indexes real data (drops union branch labels)."""
    out, cur = [], data
    for part in loc:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and part < len(cur):
            cur = cur[part]
        elif isinstance(cur, dict) and isinstance(part, str):
            out.append(part)  # a missing or unknown key: still name it
            break
        else:
            continue
        out.append(part)
    return tuple(out)


def _owner(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for listing valid keys)."""
    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        f = cur.model_fields.get(part) if isinstance(part, str) else None
        if f is None:
            # a union branch label or a list index: search the annotation for a model
            continue
        cur = _first_model(f.annotation)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _first_model(ann: Any):
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _first_model(a)
        if m is not None:
            return m
    return ann
