"""The layer stack and the plan steps' operations on it: each step maps the current stack (a list
of LayerSpec: which source layers make each output layer, and how) to a new one. Pure list
transforms; `Ctx` only locates errors and carries the models' catalogs."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from surgery.io.checkpoint import Checkpoint
from surgery.errors import PlanError, Problem, SurgeryError
from surgery.plan import MAX_LAYERS, Drop, Dus, Expand, Gstack, Merge, Plan, ScaleStep, Stack, Step, Take, Upcycle, Widen
from surgery.plan.settings import Cond, conditions_of


# ---------------------------------------------------------------------------------------------
# the layer stack


@dataclass(frozen=True)
class LayerSpec:
    """One output layer: where its tensors come from and how they are made."""

    sources: tuple[tuple[str, int], ...]  # (model, layer); several for a merge
    step: str  # the op that put it here
    where: str  # plan file:line of that step
    merge: Optional[Merge] = None
    t: float = 0.0  # position inside the merge, for gradients (mergekit: idx / (n - 1), 1 for one layer)
    init: str = "copy"  # copy | identity | zero | random
    std: Optional[float] = None
    seed: int = 0
    scales: tuple[tuple[Optional[str], float], ...] = ()
    take_scale: tuple = ()  # conditions of a take's `scale` setting (mergekit passthrough), at position t
    widen: Optional[Widen] = None  # a `widen` step applied to this layer's MLP
    widen_where: Optional[str] = None  # that step's plan line
    upcycle: Optional[Upcycle] = None  # an `upcycle` step: this layer's MLP becomes experts behind a router
    upcycle_where: Optional[str] = None

    @property
    def new(self) -> bool:
        return self.init in ("identity", "zero", "random")

    def source_text(self) -> str:
        srcs = ", ".join(f"{m}[{i}]" for m, i in self.sources)
        if self.merge is not None:
            return f"{self.merge.method}({srcs}) @ t={self.t:.3g}"
        return srcs

    def how(self) -> str:
        text = {
            "copy": "copy",
            "identity": "identity (output projections zeroed)",
            "zero": "zero (norms kept)",
            "random": f"random (std {self.std:g}, seed {self.seed})" if self.std else "random",
        }[self.init]
        if self.merge is not None and self.init == "copy":
            text = "merge"
        text += f" [{self.step}]"
        if self.widen is not None:
            w = self.widen
            parts = [
                f"{k} {v}"
                for k, v in (("MLP", w.intermediate), ("hidden", w.hidden), ("heads", w.heads), ("kv heads", w.kv_heads))
                if v is not None
            ]
            text += f", widened: {', '.join(parts)} ({w.init})"
        if self.upcycle is not None:
            u = self.upcycle
            text += f", upcycled: {u.count} experts, top-{u.top_k}, {u.router} router"
            if u.shared is not None:
                text += f", shared expert from {u.shared.model}"
            if u.noise or any(e.noise_scale for e in u.sources):
                text += ", noise"
        if self.scales:
            text += " scaled " + ", ".join(f"{f or '*'} x{k:g}" for f, k in self.scales)
        return text


@dataclass
class Ctx:
    plan: Plan
    ckpts: dict[str, Checkpoint]
    index: int
    step: Step
    default_std: float

    @property
    def where(self) -> str:
        return self.plan.step_where(self.index)

    def at(self, *key) -> str:
        return self.plan.doc.where(("steps", self.index, self.step.op) + key)

    def fail(self, what: str, fix: str | None = None, key: tuple = ()) -> SurgeryError:
        return PlanError(Problem(self.at(*key) if key else self.where, what, fix))

    def stack_range(self, rng, n: int, key=("layers",)) -> tuple[int, int]:
        if rng is None:
            return 0, n
        a, b = rng
        if b > n:
            raise self.fail(
                f"layer range [{a}, {b}) is past the end of the current stack, which has {n} layers", f"use a range within [0, {n}]", key
            )
        return a, b


OpFn = Callable[[Step, list[LayerSpec], Ctx], list[LayerSpec]]
BUILTIN_OPS: dict[str, OpFn] = {}  # the built-in steps' operations (registered by surgery.builtins)


def op(name: str):
    def deco(fn: OpFn) -> OpFn:
        BUILTIN_OPS[name] = fn
        return fn

    return deco


def _need_stack(stack, ctx: Ctx):
    if not stack:
        raise ctx.fail(
            f"`{ctx.step.op}` works on the layers built so far, and there are none yet", "start the steps with `take` or `merge`"
        )


@op("take")
def _take(s: Take, stack, ctx: Ctx):
    ck = ctx.ckpts[s.model]
    a, b = s.layers or (0, ck.num_layers)
    if b > ck.num_layers:
        raise ctx.fail(
            f"layer range [{a}, {b}) is past the end of model {s.model!r}, which has {ck.num_layers} layers",
            f"use a range within [0, {ck.num_layers}]",
            ("layers",),
        )
    n = b - a
    scale = conditions_of(s.scale)
    return stack + [
        LayerSpec(((s.model, i),), "take", ctx.where, t=(k / (n - 1) if n > 1 else 1.0), take_scale=scale)
        for k, i in enumerate(range(a, b))
    ]


@op("stack")
def _stack(s: Stack, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    a, b = ctx.stack_range(s.layers, len(stack))
    total = len(stack) + (b - a) * (s.times - 1)
    if total > MAX_LAYERS:
        raise ctx.fail(f"stacking gives {total} layers, over the limit of {MAX_LAYERS}", key=("times",))
    block = stack[a:b]
    repeats = [replace(x, step="stack", where=ctx.where) for _ in range(s.times - 1) for x in block]
    return stack[:b] + repeats + stack[b:]


@op("dus")
def _dus(s: Dus, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    n = len(stack)
    if s.trim is not None:
        m = s.trim
        if m >= n:
            raise ctx.fail(f"trim {m} leaves nothing: the stack has {n} layers", f"use 1 <= trim <= {n - 1}", ("trim",))
    else:
        m = n - s.layers // 2
        if not 1 <= m <= n - 1:
            raise ctx.fail(
                f"cannot reach {s.layers} layers from {n}: depth up-scaling gives s = 2 * (n - m) with "
                f"1 <= m < n, so s is even and 2 <= s <= {2 * (n - 1)}",
                key=("layers",),
            )
    return stack[: n - m] + [replace(x, step="dus", where=ctx.where) for x in stack[m:]]


@op("expand")
def _expand(s: Expand, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    n = len(stack)
    if n % s.groups:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ctx.fail(
            f"{n} layers cannot be split into {s.groups} equal groups",
            f"valid groups for {n} layers: {', '.join(map(str, divisors))}",
            ("groups",),
        )
    if n + s.groups * s.per_group > MAX_LAYERS:
        raise ctx.fail(f"expanding gives more than {MAX_LAYERS} layers")
    size = n // s.groups
    std = (s.std or ctx.default_std) if s.init == "random" else None
    out: list[LayerSpec] = []
    for g in range(s.groups):
        block = stack[g * size : (g + 1) * size]
        out += block
        top = block[-1]
        out += [replace(top, init=s.init, std=std, seed=s.seed, step="expand", where=ctx.where)] * s.per_group
    return out


@op("gstack")
def _gstack(s: Gstack, stack, ctx: Ctx):
    """The paper's operator as the step a user would write by hand (see `Gstack`'s docstring)."""
    _need_stack(stack, ctx)
    n = len(stack)
    if n * s.factor > MAX_LAYERS:
        raise ctx.fail(f"growing {n} layers {s.factor} times gives {n * s.factor}, over the limit of {MAX_LAYERS}", key=("factor",))
    if s.operator == "direct":
        grown = _stack(Stack.model_construct(times=s.factor, layers=None), stack, ctx)
    elif s.operator == "zero":
        grown = _expand(Expand.model_construct(groups=n, per_group=s.factor - 1, init="identity", std=None, seed=s.seed), stack, ctx)
    else:
        grown = _expand(Expand.model_construct(groups=1, per_group=(s.factor - 1) * n, init="random", std=s.std, seed=s.seed), stack, ctx)
    return [replace(x, step=f"gstack {s.operator}: {x.step}") if x.where == ctx.where else x for x in grown]


@op("widen")
def _widen(s: Widen, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    family = ctx.ckpts[stack[0].sources[0][0]].family
    if s.intermediate is not None and not family.mlp_in:
        raise ctx.fail(
            f"width growth is not available for family {family.name}: its architecture entry does not describe its MLP tensors",
            "widen a model of a supported family (llama, mistral, qwen2/3, qwen_moe, gemma, phi3, gpt2, gpt_neox, mixtral, llava), "
            "or add mlp_in/mlp_out to its architecture entry",
            ("intermediate",),
        )
    if (s.heads is not None or s.kv_heads is not None) and not family.attention:
        raise ctx.fail(
            f"head growth is not available for family {family.name}: its architecture entry does not describe its attention",
            "widen a model of a supported family, or add `attention` to its architecture entry",
            ("heads",),
        )
    if s.hidden is not None and not family.hidden_in:
        raise ctx.fail(
            f"hidden-size growth is not available for family {family.name}: its architecture entry does not describe "
            "what reads and writes the residual stream",
            "widen a model of a supported family, or add hidden_in/hidden_out/final_norm to its architecture entry",
            ("hidden",),
        )
    if not family.head_dim_key and (s.heads is not None or s.kv_heads is not None):
        # GPT-2: the attention is exactly the residual stream's width (head size = n_embd / n_head)
        cfg = family.lm_config(ctx.ckpts[stack[0].sources[0][0]].config) if stack else {}
        d = family.head_size(cfg)
        want = (s.hidden // d) if (d and s.hidden is not None and s.hidden % d == 0) else None
        if s.kv_heads is not None or s.hidden is None or (want is not None and s.heads != want):
            raise ctx.fail(
                f"family {family.name} has no separate head size (it is {family.hidden_key} / {family.heads_key}), so its heads "
                "grow only with the hidden size, by the same factor, and it has no key/value heads of their own",
                f"give `hidden` alone (the heads follow: {family.heads_key} = hidden / {d})" if d else "give `hidden` alone",
                ("heads",) if s.kv_heads is None else ("kv_heads",),
            )
    if any(x.widen is not None for x in stack):
        raise ctx.fail("the layers are widened already; give one `widen` step with the final size", key=("intermediate",))
    return [replace(x, widen=s, widen_where=ctx.where) for x in stack]


@op("upcycle")
def _upcycle(s: Upcycle, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    ck = ctx.ckpts[stack[0].sources[0][0]]
    family = ck.family
    spec = family.upcycle
    if not spec:
        have = sorted(n for n, f in __import__("surgery.registry", fromlist=["current"]).current().families.items() if f.upcycle)
        raise ctx.fail(
            f"sparse upcycling is not available for family {family.name}: its architecture entry names no MoE to grow into",
            f"upcycle a model of a family with one ({', '.join(have)}), or add `upcycle` to its architecture entry",
            ("experts",),
        )
    cfg = family.lm_config(ck.config)
    for key, bad in (spec.get("refuse") or {}).items():
        if cfg.get(key) == bad:
            raise ctx.fail(
                f"this {family.name} model has {key}: {bad!r}, which {spec['model_type']} has no place for",
                f"upcycle a model without {key}",
                ("experts",),
            )
    kinds = set(cfg.get("layer_types") or ())
    if spec.get("one_window") and cfg.get("use_sliding_window", True) and len(kinds) > 1:
        raise ctx.fail(
            f"{spec['model_type']} applies one attention window to every layer, and this model mixes {sorted(kinds)} layers",
            "upcycle a model whose layers all attend the same way (use_sliding_window: false, or every layer sliding)",
            ("experts",),
        )
    if any(x.upcycle is not None for x in stack):
        raise ctx.fail("the layers are upcycled already; give one `upcycle` step", key=("experts",))
    if s.shared is not None and not spec.get("shared"):
        raise ctx.fail(
            f"{spec['model_type']} has no shared expert beside its routed ones",
            "drop `shared` (Qwen2-MoE outputs have one: upcycle a Qwen2 model)",
            ("shared",),
        )
    named = [(f"expert {i}", e, ("experts", i, "model")) for i, e in enumerate(s.sources)]
    if s.shared is not None:
        named.append(("the shared expert", s.shared, ("shared", "model")))
    for what, e, key in named:
        other = ctx.ckpts.get(e.model)
        if other is None:
            raise ctx.fail(
                f"{what}'s model {e.model!r} is not one of the plan's models", f"add it under `models:` ({', '.join(ctx.ckpts)})", key
            )
        if other.family.name != family.name:
            raise ctx.fail(
                f"{what}'s model {e.model!r} is a {other.family.name} model; its MLPs cannot be experts of a {family.name}",
                "take every expert from models of the base model's family and shape",
                key,
            )
    if any(x.widen is not None for x in stack):
        raise ctx.fail(
            "upcycle after widen in one plan is not supported", "widen in one plan, upcycle its output in a second", ("experts",)
        )
    a, b = (0, len(stack)) if s.layers is None else ctx.stack_range(s.layers, len(stack))
    if spec.get("every_layer") and (a, b) != (0, len(stack)):
        raise ctx.fail(
            f"{spec['model_type']} has no dense layers: every layer's MLP becomes experts (this plan's stack has {len(stack)})",
            "drop `layers`, or upcycle into a family with dense layers (Qwen-MoE)",
            ("layers",),
        )
    return [replace(x, upcycle=s, upcycle_where=ctx.where) if a <= i < b else x for i, x in enumerate(stack)]


@op("drop")
def _drop(s: Drop, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    a, b = ctx.stack_range(s.layers, len(stack))
    out = stack[:a] + stack[b:]
    if not out:
        raise ctx.fail(f"dropping [{a}, {b}) removes every layer", key=("layers",))
    return out


@op("scale")
def _scale(s: ScaleStep, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    a, b = ctx.stack_range(s.layers, len(stack))
    return stack[:a] + [replace(x, scales=x.scales + ((s.filter, s.factor),)) for x in stack[a:b]] + stack[b:]


def merge_ranges(s: Merge, ckpts) -> list[tuple[int, int]]:
    """Each source's layer range: its own `layers`, else the step's, else the whole model."""
    return [tuple(src.layers or s.layers or (0, ckpts[src.model].num_layers)) for src in s.sources]


@op("merge")
def _merge(s: Merge, stack, ctx: Ctx):
    ranges = merge_ranges(s, ctx.ckpts)
    for j, (src, (a, b)) in enumerate(zip(s.sources, ranges, strict=True)):
        ck = ctx.ckpts[src.model]
        key = ("models", j, "layers") if src.layers is not None else ("layers",)
        if b > ck.num_layers:
            raise ctx.fail(
                f"layer range [{a}, {b}) is past the end of model {src.model!r}, which has {ck.num_layers} layers",
                f"use a range within [0, {ck.num_layers}]",
                key,
            )
    lengths = {b - a for a, b in ranges}
    if len(lengths) != 1:
        desc = ", ".join(f"{src.model} [{a}, {b})" for src, (a, b) in zip(s.sources, ranges, strict=True))
        raise ctx.fail(f"merged ranges have different lengths: {desc}", "every model in a merge contributes the same number of layers")
    n = lengths.pop()
    out = []
    for idx in range(n):
        t = idx / (n - 1) if n > 1 else 1.0
        out.append(
            LayerSpec(tuple((src.model, a + idx) for src, (a, _) in zip(s.sources, ranges, strict=True)), "merge", ctx.where, merge=s, t=t)
        )
    return stack + out


def merge_conditions(m: Merge) -> tuple[dict[str, tuple], list[dict[str, tuple]]]:
    """The merge's parameters as condition lists, most specific first: (shared, per source).
    `t`, `weights`, `normalize` and `overrides` are sugar for `parameters`."""
    shared: dict[str, tuple] = {}
    for name, v in m.parameters.items():
        shared[name] = conditions_of(v)
    if m.t is not None or any(o.t is not None for o in m.overrides):
        shared["t"] = tuple(Cond(o.filter, o.t) for o in m.overrides if o.t is not None) + conditions_of(m.t)
    if m.normalize is not None:
        shared["normalize"] = conditions_of(m.normalize)
    per_source = []
    for i, src in enumerate(m.sources):
        conds = {name: conditions_of(v) for name, v in src.parameters.items()}
        if i < len(m.models) and (m.weights is not None or any(o.weights is not None for o in m.overrides)):
            w = tuple(Cond(o.filter, o.weights[i]) for o in m.overrides if o.weights is not None)
            conds["weight"] = conds.get("weight", ()) + w + (conditions_of(m.weights[i]) if m.weights is not None else ())
        per_source.append(conds)
    return shared, per_source


# ---------------------------------------------------------------------------------------------
# the program
