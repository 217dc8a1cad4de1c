"""Plan + checkpoint catalogs -> Program. Reads headers and configs only, never tensor data.

The program holds everything `apply` will do: the layer map (output layer <- source layers and
how it was made), every output tensor's name, dtype, shape and recipe, the output config and the
shard layout. `validate` prints it; the engine executes it. Steps are small functions over the
layer stack registered in `OPS`, so a new operation is one function and one schema class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from . import registry
from .arch import Family
from .lint import lint
from .checkpoint import DTYPE_NAMES, FLOAT_CODES, Checkpoint, dtype_name, open_checkpoint, resolve_ref, small_files
from .errors import CheckpointError, PlanError, Problem, SurgeryError
from .jsonio import read_json
from .plan import MAX_LAYERS, Drop, Dus, Expand, Merge, Plan, ScaleStep, Stack, Step, Take
from .methods import get_method
from .recipes import Cast, External, RandomNormal, Read, Recipe, Scale, Zeros
from .settings import Cond, conditions_of, resolve


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

    @property
    def new(self) -> bool:
        return self.init in ("identity", "zero", "random")

    def source_text(self) -> str:
        srcs = ", ".join(f"{m}[{i}]" for m, i in self.sources)
        if self.merge is not None:
            return f"{self.merge.method}({srcs}) @ t={self.t:.3g}"
        return srcs

    def how(self) -> str:
        text = {"copy": "copy", "identity": "identity (output projections zeroed)", "zero": "zero (norms kept)",
                "random": f"random (std {self.std:g}, seed {self.seed})" if self.std else "random"}[self.init]
        if self.merge is not None and self.init == "copy":
            text = "merge"
        text += f" [{self.step}]"
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
            raise self.fail(f"layer range [{a}, {b}) is past the end of the current stack, which has {n} layers",
                            f"use a range within [0, {n}]", key)
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
        raise ctx.fail(f"`{ctx.step.op}` works on the layers built so far, and there are none yet",
                       "start the steps with `take` or `merge`")


@op("take")
def _take(s: Take, stack, ctx: Ctx):
    ck = ctx.ckpts[s.model]
    a, b = s.layers or (0, ck.num_layers)
    if b > ck.num_layers:
        raise ctx.fail(f"layer range [{a}, {b}) is past the end of model {s.model!r}, which has {ck.num_layers} layers",
                       f"use a range within [0, {ck.num_layers}]", ("layers",))
    n = b - a
    scale = conditions_of(s.scale)
    return stack + [LayerSpec(((s.model, i),), "take", ctx.where, t=(k / (n - 1) if n > 1 else 1.0), take_scale=scale)
                    for k, i in enumerate(range(a, b))]


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
            raise ctx.fail(f"cannot reach {s.layers} layers from {n}: depth up-scaling gives s = 2 * (n - m) with "
                           f"1 <= m < n, so s is even and 2 <= s <= {2 * (n - 1)}", key=("layers",))
    return stack[: n - m] + [replace(x, step="dus", where=ctx.where) for x in stack[m:]]


@op("expand")
def _expand(s: Expand, stack, ctx: Ctx):
    _need_stack(stack, ctx)
    n = len(stack)
    if n % s.groups:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise ctx.fail(f"{n} layers cannot be split into {s.groups} equal groups",
                       f"valid groups for {n} layers: {', '.join(map(str, divisors))}", ("groups",))
    if n + s.groups * s.per_group > MAX_LAYERS:
        raise ctx.fail(f"expanding gives more than {MAX_LAYERS} layers")
    size = n // s.groups
    std = (s.std or ctx.default_std) if s.init == "random" else None
    out: list[LayerSpec] = []
    for g in range(s.groups):
        block = stack[g * size:(g + 1) * size]
        out += block
        top = block[-1]
        out += [replace(top, init=s.init, std=std, seed=s.seed, step="expand", where=ctx.where)] * s.per_group
    return out


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
    for j, (src, (a, b)) in enumerate(zip(s.sources, ranges)):
        ck = ctx.ckpts[src.model]
        key = ("models", j, "layers") if src.layers is not None else ("layers",)
        if b > ck.num_layers:
            raise ctx.fail(f"layer range [{a}, {b}) is past the end of model {src.model!r}, which has {ck.num_layers} layers",
                           f"use a range within [0, {ck.num_layers}]", key)
    lengths = {b - a for a, b in ranges}
    if len(lengths) != 1:
        desc = ", ".join(f"{src.model} [{a}, {b})" for src, (a, b) in zip(s.sources, ranges))
        raise ctx.fail(f"merged ranges have different lengths: {desc}", "every model in a merge contributes the same number of layers")
    n = lengths.pop()
    out = []
    for idx in range(n):
        t = idx / (n - 1) if n > 1 else 1.0
        out.append(LayerSpec(tuple((src.model, a + idx) for src, (a, _) in zip(s.sources, ranges)),
                             "merge", ctx.where, merge=s, t=t))
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

@dataclass(frozen=True)
class OutTensor:
    name: str
    recipe: Recipe

    @property
    def nbytes(self) -> int:
        return self.recipe.nbytes


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Program:
    plan: Plan
    ckpts: dict[str, Checkpoint]
    family: Family
    config_model: str
    tokenizer_model: str
    stack: list[LayerSpec]
    tensors: list[OutTensor]
    shards: list[Shard]
    config: dict
    config_changes: list[str]
    dtype: str
    warnings: list[Problem] = field(default_factory=list)
    tokenizer_merger: object = None  # a plugin's merged tokenizer (tokenizer: union), else None
    chat_template: str | None = None  # written as chat_template.jinja when set

    @property
    def num_layers(self) -> int:
        return len(self.stack)

    @property
    def num_params(self) -> int:
        return sum(t.recipe.numel for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_in(self) -> int:
        """Bytes of source tensor data the program reads (each source tensor counted once)."""
        seen = {}
        for t in self.tensors:
            for i in t.recipe.inputs():
                seen[(i.file, i.name)] = i.nbytes
        return sum(seen.values())

    @property
    def new_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.stack) if s.new]

    def small_files(self) -> list[Path]:
        return small_files(self.ckpts[self.tokenizer_model].path)

    def layer_map(self) -> list[dict]:
        return [{"layer": i, "source": s.source_text(), "how": s.how(), "new": s.new,
                 "sources": [list(x) for x in s.sources], "made": s.init if s.merge is None or s.init != "copy" else "merge",
                 "step": s.step, "where": s.where} for i, s in enumerate(self.stack)]


def open_models(plan: Plan, *, allow_pickle: bool = False, headers_only: bool = False,
                offline: bool = False) -> dict[str, Checkpoint]:
    """Resolve and open every model the plan names; all failures are reported together."""
    ckpts: dict[str, Checkpoint] = {}
    problems: list[Problem] = []
    for name in plan.body.models:
        ref = plan.model_ref(name)
        try:
            path = resolve_ref(ref.path, plan.base_dir, revision=ref.revision, where=plan.where("models", name),
                               headers_only=headers_only, offline=offline)
            ckpts[name] = open_checkpoint(name, ref.path, path, allow_pickle=allow_pickle)
        except SurgeryError as e:
            problems += e.problems
    if problems:
        raise SurgeryError(problems)
    return ckpts


def compile_plan(plan: Plan, *, allow_pickle: bool = False, ckpts: dict[str, Checkpoint] | None = None,
                 headers_only: bool = False, offline: bool = False) -> Program:
    """The plan against its models' headers. `headers_only`: hub models may be header-only views
    (validate); a Program compiled so is for reporting, not for `execute`."""
    ckpts = ckpts if ckpts is not None else open_models(plan, allow_pickle=allow_pickle, headers_only=headers_only,
                                                        offline=offline)
    first = plan.steps[0]
    first_model = first.model if isinstance(first, Take) else first.sources[0].model if isinstance(first, Merge) else None
    if first_model is None:
        raise PlanError(Problem(plan.step_where(0), f"the first step is `{first.op}`, which needs layers to work on",
                                "start with `take` or `merge`"))
    config_model = plan.body.non_layer or first_model
    base = ckpts[config_model]
    default_std = float(base.family.lm_config(base.config).get("initializer_range", 0.02)
                        or base.config.get("initializer_range", 0.02) or 0.02)

    stack: list[LayerSpec] = []
    for i, step in enumerate(plan.steps):
        stack = registry.current().ops[step.op](step, stack, Ctx(plan, ckpts, i, step, default_std))

    family = base.family
    warnings: list = []  # Problems with a code; plain strings (config notes) get the code `config` below
    if family.guessed:
        warnings.append(Problem(plan.where("models", config_model), f"model {config_model!r}: unknown family; {family.notes}",
                                "register an architecture entry (a plugin's api.family) if the guess is wrong",
                                code="unknown-family"))
    out_code = DTYPE_NAMES[plan.body.output.dtype] if plan.body.output.dtype else base.dtype

    tok = plan.body.tokenizer or config_model
    realign = None  # the tokenizer source that realigns token-indexed tensors, decided before shapes are compared
    if tok not in ckpts:  # a tokenizer source from a plugin, e.g. "union"
        realign = tok
    elif plan.body.tokenizer is not None and (plan.body.tokenizer_options is not None
                                              or _vocabularies_differ(plan, ckpts, family, tok)):
        if "model" not in registry.current().tokenizer_sources:
            raise PlanError(Problem(plan.where("tokenizer"), f"the models' vocabularies differ from {tok!r}'s; realigning "
                                    "their embeddings to its tokenizer (as mergekit's tokenizer_source does), or "
                                    "tokenizer_options, needs the mergekit plugin", "pip install -e plugins/surgery-mergekit"))
        realign = "model"
    vocab_rows_free = (set(family.embeddings) | {family.lm_head}) if realign else set()
    tensors: list[OutTensor] = []
    pre, post = _non_layer(plan, ckpts, base, first, out_code, warnings, vocab_rows_free)
    tensors += pre
    problems: list[Problem] = []
    for j, spec in enumerate(stack):
        try:
            tensors += _layer_tensors(j, spec, ckpts, family, base, out_code, warnings,
                                      DTYPE_NAMES[plan.body.input_dtype] if plan.body.input_dtype else None, plan.body.seed)
        except SurgeryError as e:
            problems += e.problems
    if problems:
        raise SurgeryError(problems)
    tensors += post
    if any(s.init == "identity" for s in stack) and family.guessed:
        first_id = next(s for s in stack if s.init == "identity")
        warnings.append(Problem(first_id.where or plan.where(), "identity blocks in a family surgery does not know: output "
                                "projections were guessed by name, so the expansion may not preserve the function",
                                "check `surgery validate --tensors`, or register an architecture entry", code="guessed-identity"))
    config, changes = _output_config(base, ckpts, stack, family, out_code, warnings)
    shards = _schedule(tensors, plan.body.output.shard_size)
    merger = None
    if realign is not None:
        tensors, merger = _realign_vocab(plan, ckpts, family, tensors, realign, config_model,
                                         tok if realign == "model" else None)
        lm = family.lm_config(config)
        old_v = lm.get("vocab_size")
        lm["vocab_size"] = merger.vocab_size
        if old_v != merger.vocab_size:
            changes.append(f"vocab_size: {old_v} -> {merger.vocab_size} (tokenizer: {plan.body.tokenizer})")
        tok = config_model
        shards = _schedule(tensors, plan.body.output.shard_size)
    chat = _chat_template(plan, ckpts, warnings) if plan.body.chat_template else None
    if chat is not None:  # apply rewrites the copied tokenizer_config.json: it must parse now, in validate too
        tc = ckpts[tok].path / "tokenizer_config.json" if merger is None else None
        if tc is not None and tc.is_file() and not isinstance(read_json(tc, error=CheckpointError), dict):
            raise CheckpointError("tokenizer_config.json is not a JSON object", where=str(tc))
    small_files(ckpts[tok].path)  # links leading out of a model folder are refused in validate, not after the shards
    warnings += lint(plan, ckpts, stack, out_code)
    warnings = list(plan.doc.notes) + [w if isinstance(w, Problem) else Problem(plan.where(), w, code="config")
                                       for w in warnings]
    return Program(plan, ckpts, family, config_model, tok, stack, tensors, shards, config, changes, out_code, warnings,
                   merger, chat)


def model_chat_template(path) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, or tokenizer_config.json's (its default)."""
    import json

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        data = read_json(cfg, error=CheckpointError)  # `apply` rewrites this file: a corrupt one fails now
        if not isinstance(data, dict):
            raise CheckpointError("tokenizer_config.json is not a JSON object", where=str(cfg))
        t = data.get("chat_template")
        if isinstance(t, list):  # [{name, template}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def _chat_template(plan: Plan, ckpts, warnings) -> str | None:
    """mergekit's rules: "auto" takes the most common template among the models (first seen wins a
    tie), a string with '{' or a newline is the template itself, anything else names a template."""
    from collections import Counter

    value = plan.body.chat_template
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(c.path) for c in ckpts.values()) if t]
        if not found:
            warnings.append(Problem(plan.where("chat_template"), "chat_template: auto found no chat template in the models; "
                                    "none written", code="chat-template"))
            return None
        return Counter(found).most_common(1)[0][0]
    if "{" in value or "\n" in value or len(value) >= 256:
        return value
    text = registry.current().chat_template(value)
    if text is None:
        raise PlanError(Problem(plan.where("chat_template"), f"unknown chat template name {value!r}",
                                "give the Jinja template itself, `auto`, or a name the mergekit plugin ships "
                                "(chatml, llama3, alpaca, mistral, ...)"))
    return text


def _vocab_models(plan) -> list[str]:
    used = {m for s in plan.steps for m in _step_models(s)}
    if plan.body.tokenizer in plan.body.models:
        used.add(plan.body.tokenizer)
    opts = plan.body.tokenizer_options
    for setting in (opts.tokens.values() if opts is not None else ()):
        src = setting.source
        model = src if isinstance(src, str) else getattr(src, "model", None)
        if model:
            used.add(model)
    return sorted(used, key=list(plan.body.models).index)


def _vocabularies_differ(plan, ckpts, family: Family, tok: str) -> bool:
    """Do the models' token-indexed tensors or tokenizers differ from `tok`'s (so they need realigning)?"""
    names = set(family.embeddings) | {family.lm_head}
    ref = ckpts[tok]
    for m in _vocab_models(plan):
        ck = ckpts[m]
        if any(n in ck.tensors and n in ref.tensors and ck.tensors[n].shape[:1] != ref.tensors[n].shape[:1] for n in names):
            return True
        a, b = ck.path / "tokenizer.json", ref.path / "tokenizer.json"
        if a.is_file() and b.is_file() and (a.stat().st_size != b.stat().st_size or a.read_bytes() != b.read_bytes()):
            return True
    return False


def _realign_vocab(plan, ckpts, family: Family, tensors: list[OutTensor], source: str, config_model: str,
                   model: str | None = None):
    """Rewrite every token-indexed tensor's inputs to the vocabulary of `source` (a tokenizer source
    such as "union"; "model": the tokenizer of plan model `model`, the others realigned to it)."""
    from .recipes import VocabPermute, map_children

    used = _vocab_models(plan)
    first = plan.steps[0]
    base = first.base_model if isinstance(first, Merge) and first.base_model else config_model
    build = registry.current().tokenizer_sources[source]
    paths = {m: ckpts[m].path for m in used}
    opts = plan.body.tokenizer_options
    extra = {"options": opts.model_dump(exclude_none=True)} if opts is not None else {}
    try:
        merger = build(paths, base, model, **extra) if source == "model" else build(paths, base, **extra)
    except SurgeryError:
        raise
    except Exception as e:  # the plugin's tokenizer code (a token that does not exist, ...)
        raise PlanError(Problem(plan.where("tokenizer_options" if opts is not None else "tokenizer"),
                                f"building the output tokenizer failed: {type(e).__name__}: {str(e)[:300]}",
                                "check the tokenizer settings and the models' tokenizer files")) from None
    vocab_names = set(family.embeddings) | {family.lm_head}

    def rewrite(r: Recipe) -> Recipe:
        if isinstance(r, Read) and r.src.name in vocab_names:
            terms = tuple(Read(ckpts[m].tensors[r.src.name], m) for m in used if r.src.name in ckpts[m].tensors)
            ids = tuple(t.model for t in terms)
            return VocabPermute(terms, ids, ids.index(r.model), merger.vocab_size, merger)
        return r if isinstance(r, VocabPermute) else map_children(r, rewrite)

    return [OutTensor(t.name, rewrite(t.recipe)) if t.name in vocab_names else t for t in tensors], merger


def _step_models(s: Step) -> list[str]:
    if isinstance(s, Take):
        return [s.model]
    if isinstance(s, Merge):
        return [src.model for src in s.sources]
    return []


def _cast(r: Recipe, code: str) -> Recipe:
    if r.dtype != code and r.dtype in FLOAT_CODES:
        return Cast(r, code)
    return r


def _merged(m: Merge, names: list[tuple[str, str]], ckpts, out_name: str, t: float, where: str,
            input_dtype: str | None, seed: int | None = None, rows_free: bool = False) -> Recipe:
    """One output tensor of a merge. `names`: (model, input tensor name) per source, in source order.
    `rows_free`: a token-indexed tensor that is realigned to one vocabulary afterwards, so only its
    other dimensions must agree now."""
    reads = [_read(ckpts, model, n, input_dtype) for model, n in names]
    shapes = {r.shape[1:] if rows_free else r.shape for r in reads}
    if len(shapes) != 1:
        desc = ", ".join(f"{model}:{n} {list(r.shape)}" for (model, n), r in zip(names, reads))
        raise PlanError(Problem(where, f"cannot merge tensors of different shapes for {out_name}: {desc}",
                                "merge models of the same architecture and size"))
    for (model, n), r in zip(names, reads):
        if r.dtype not in FLOAT_CODES:
            raise PlanError(Problem(where, f"cannot merge {model}:{n}: dtype {r.dtype} is not floating point"))
    spec = get_method(m.method, where)
    shared_c, per_c = merge_conditions(m)
    base = m.base_model
    models = [model for model, _ in names]
    base_index = models.index(base) if base is not None else None

    def value(p, conds, name):
        v = resolve(conds, name, t, None)
        if v is None:
            if p.required:
                raise PlanError(Problem(where, f"{m.method} needs parameter {p.name!r} for {name}",
                                        f"set `{p.name}` on the merge (or per model)"))
            return p.default
        return v

    shared = {p.name: value(p, shared_c.get(p.name, ()), out_name) for p in spec.shared}
    per_input = []
    for i, (model, n) in enumerate(names):
        per_input.append({p.name: value(p, per_c[i].get(p.name, ()) + shared_c.get(p.name, ()), n)
                          for p in spec.per_input if p.scope == "input" or i != base_index})
    if spec.build is not None:
        return spec.build(reads, base_index, shared, per_input)
    return External(m.method, tuple(reads), tuple(models), base_index, tuple(sorted(shared.items())),
                    tuple(tuple(sorted(p.items())) for p in per_input), out_name, reads[0].dtype, seed, where)


def _read(ckpts, model: str, name: str, input_dtype: str | None) -> Recipe:
    r: Recipe = Read(ckpts[model].tensors[name], model)
    return _cast(r, input_dtype) if input_dtype else r


def _non_layer(plan, ckpts, base: Checkpoint, first: Step, out_code, warnings, rows_free: set[str] = frozenset()):
    """Embeddings, final norm, lm_head: from `non_layer`'s model; or, when the plan names none,
    made like the first step's layers (embeddings) and the first or last step's (`post_from`:
    final norm, lm_head), merged at the gradient's start or scaled, as mergekit does."""
    family = base.family
    in_dt = DTYPE_NAMES[plan.body.input_dtype] if plan.body.input_dtype else None
    makers = [s for s in plan.steps if isinstance(s, (Take, Merge))]
    post_step = makers[-1] if plan.body.post_from == "last" else first
    skip = {family.lm_head} if base.tied else set()
    pre, post = [], []
    for name in base.non_layer:
        if name in skip:
            continue
        is_pre = (name in family.embeddings or any(k in name for k in ("embed", "wte", "wpe"))) and name != family.lm_head
        step = None if plan.body.non_layer is not None else (first if is_pre else post_step)
        where = plan.step_where(list(plan.steps).index(step)) if step is not None else plan.where("non_layer")
        if isinstance(step, Merge):
            missing = [s.model for s in step.sources if name not in ckpts[s.model].tensors]
            if missing:
                raise PlanError(Problem(where, f"cannot merge {name}: models {missing} do not have it"))
            r = _merged(step, [(s.model, name) for s in step.sources], ckpts, name, 0.0, where, in_dt, plan.body.seed,
                        rows_free=name in rows_free)
        elif isinstance(step, Take):
            if name not in ckpts[step.model].tensors:
                raise PlanError(Problem(where, f"model {step.model!r} has no tensor {name!r}"))
            r = _scaled(_read(ckpts, step.model, name, in_dt), conditions_of(step.scale), name, 0.0)
        else:
            r = _read(ckpts, base.name, name, in_dt)
        (pre if is_pre else post).append(OutTensor(name, _cast(r, out_code)))
    return pre, post


def _scaled(r: Recipe, conds: tuple, name: str, t: float) -> Recipe:
    v = resolve(conds, name, t) if conds else None
    return r if v is None else Scale(r, float(v))


def _layer_tensors(j: int, spec: LayerSpec, ckpts, family: Family, base: Checkpoint, out_code: str, warnings,
                   in_dt: str | None = None, seed: int | None = None) -> list[OutTensor]:
    m0, l0 = spec.sources[0]
    src_layer = ckpts[m0].layers[l0]
    ref_layer = base.layers[0]
    if set(src_layer) != set(ref_layer):
        extra = sorted(set(src_layer) ^ set(ref_layer))[:4]
        raise PlanError(Problem(spec.where, f"layer {l0} of {m0!r} does not have the tensors of {base.name!r}'s layers "
                                f"(differs in {extra})", "all layers in one output must come from the same architecture"))
    out: list[OutTensor] = []
    zeroed = 0
    for suffix, name in src_layer.items():
        out_name = family.layer_name(j, suffix)
        if spec.merge is not None:
            names = []
            for m, li in spec.sources:
                n = ckpts[m].layers[li].get(suffix)
                if n is None:
                    raise PlanError(Problem(spec.where, f"cannot merge {out_name}: {m}[{li}] has no tensor '{suffix}'"))
                names.append((m, n))
            r: Recipe = _merged(spec.merge, names, ckpts, out_name, spec.t, spec.where, in_dt, seed)
        else:
            r = _scaled(_read(ckpts, m0, name, in_dt), spec.take_scale, name, spec.t)
        if r.shape != ckpts[base.name].tensors[ref_layer[suffix]].shape:
            raise PlanError(Problem(spec.where, f"{m0}:{name} has shape {list(r.shape)} but the output's layers "
                                    f"({base.name!r}) need {list(base.tensors[ref_layer[suffix]].shape)}",
                                    "all layers in one output must come from models of the same size"))
        if spec.init == "identity" and family.is_output_projection(suffix):
            r, zeroed = Zeros(r.shape, r.dtype), zeroed + 1
        elif spec.init == "zero" and not family.is_norm(suffix):
            r = Zeros(r.shape, r.dtype)
        elif spec.init == "random" and not family.is_norm(suffix):
            r = Zeros(r.shape, r.dtype) if len(r.shape) < 2 else RandomNormal(r.shape, r.dtype, spec.std, spec.seed, out_name)
        for filt, k in spec.scales:
            if filt is None or filt in out_name:
                r = Scale(r, k)
        out.append(OutTensor(out_name, _cast(r, out_code)))
    if spec.init == "identity" and not zeroed:
        raise PlanError(Problem(spec.where, f"identity init: no output projections found in layer {l0} of {m0!r} "
                                f"(family {family.name}); the copy would not be function-preserving",
                                "use init: copy, or register an architecture entry naming the output projections"))
    return out


def _output_config(base: Checkpoint, ckpts, stack: list[LayerSpec], family: Family, out_code: str, warnings):
    full = copy.deepcopy(base.config)
    cfg = family.lm_config(full)  # a VLM's text_config: the layer settings live there
    n_old, n_new = base.num_layers, len(stack)
    changes = []
    for key in {family.num_layers_key} | ({"num_hidden_layers"} & set(cfg)):
        if cfg.get(key) != n_new:
            changes.append(f"{key}: {cfg.get(key)} -> {n_new}")
        cfg[key] = n_new
    declared = set(family.per_layer_config)
    detected = {k for k, v in cfg.items() if isinstance(v, list) and len(v) == n_old and k not in declared
                and k != "architectures" and n_old > 1}
    for key in sorted(declared | detected):
        if not isinstance(cfg.get(key), list):
            continue
        if len(cfg[key]) != n_old:
            warnings.append(f"config {key} has {len(cfg[key])} entries for {n_old} layers; left as it is")
            continue
        new = []
        for spec in stack:
            m, li = spec.sources[0]
            lst = family.lm_config(ckpts[m].config).get(key)
            new.append(lst[li] if isinstance(lst, list) and len(lst) == ckpts[m].num_layers else cfg[key][min(li, n_old - 1)])
        cfg[key] = new
        changes.append(f"{key}: {n_old} entries -> {n_new}, following the layer map")
        if key in detected:
            warnings.append(f"config {key!r} has one entry per layer, so it was remapped with the layers (not declared for family {family.name})")
    for key in family.layer_threshold_config:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        below = [spec.sources[0][1] < v for spec in stack]
        if all(below):
            new_v = v if v >= n_new else n_new  # every layer stays below the threshold
        else:
            new_v = below.index(False)
            if any(below[new_v:]):
                warnings.append(f"config {key}={v}: after surgery the layers below it are no longer a prefix; set to {new_v}")
        if new_v != v:
            changes.append(f"{key}: {v} -> {new_v}")
        cfg[key] = new_v
    for key in family.position_dependent_config:
        if cfg.get(key):
            warnings.append(f"config {key} is set: layers behave differently at different depths, so moved copies are not exact copies of their function")
    tname = dtype_name(out_code)
    for c in ([full, cfg] if cfg is not full else [full]):
        for key in ("dtype", "torch_dtype"):
            if key in c and c[key] != tname:
                changes.append(f"{key}: {c[key]} -> {tname}")
                c[key] = tname
    if "dtype" not in full and "torch_dtype" not in full:
        full["dtype"] = tname
    return full, changes


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _schedule(tensors: list[OutTensor], shard_size: int) -> list[Shard]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [Shard(shard_name(i, n), tuple(g)) for i, g in enumerate(groups)]
