"""Output tensors and their recipes: layer tensors from the layer map, non-layer tensors (embeddings,
final norm, lm_head, a VLM's vision tower) made like the first or last step, merges resolved to
recipes per tensor, and token-indexed tensors realigned to one vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, replace

from surgery import registry
from surgery.arch import Family
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors import DTYPE_NAMES, FLOAT_CODES
from surgery.errors import PlanError, Problem, SurgeryError
from surgery.plan import Merge, Step, Take
from surgery.methods import get_method
from surgery.merge import split_shares
from surgery.recipes import Cast, External, Gather, RandomNormal, Read, Recipe, Scale, Widen, Zeros
from surgery.plan.settings import conditions_of, resolve


from surgery.compile.stack import LayerSpec, merge_conditions


@dataclass(frozen=True)
class OutTensor:
    name: str
    recipe: Recipe

    @property
    def nbytes(self) -> int:
        return self.recipe.nbytes


def _vocab_models(plan) -> list[str]:
    used = {m for s in plan.steps for m in step_models(s)}
    if plan.body.tokenizer in plan.body.models:
        used.add(plan.body.tokenizer)
    opts = plan.body.tokenizer_options
    for setting in opts.tokens.values() if opts is not None else ():
        src = setting.source
        model = src if isinstance(src, str) else getattr(src, "model", None)
        if model:
            used.add(model)
    return sorted(used, key=list(plan.body.models).index)


def vocabularies_differ(plan, ckpts, family: Family, tok: str) -> bool:
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


def realign_vocab(plan, ckpts, family: Family, tensors: list[OutTensor], source: str, config_model: str, model: str | None = None):
    """Rewrite every token-indexed tensor's inputs to the vocabulary of `source` (a tokenizer source
    such as "union"; "model": the tokenizer of plan model `model`, the others realigned to it)."""
    from surgery.recipes import VocabPermute, map_children

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
        raise PlanError(
            Problem(
                plan.where("tokenizer_options" if opts is not None else "tokenizer"),
                f"building the output tokenizer failed: {type(e).__name__}: {str(e)[:300]}",
                "check the tokenizer settings and the models' tokenizer files",
            )
        ) from None
    vocab_names = set(family.embeddings) | {family.lm_head}

    def rewrite(r: Recipe) -> Recipe:
        if isinstance(r, Read) and r.src.name in vocab_names:
            terms = tuple(Read(ckpts[m].tensors[r.src.name], m) for m in used if r.src.name in ckpts[m].tensors)
            ids = tuple(t.model for t in terms)
            return VocabPermute(terms, ids, ids.index(r.model), merger.vocab_size, merger)
        return r if isinstance(r, VocabPermute) else map_children(r, rewrite)

    return [OutTensor(t.name, rewrite(t.recipe)) if t.name in vocab_names else t for t in tensors], merger


def step_models(s: Step) -> list[str]:
    if isinstance(s, Take):
        return [s.model]
    if isinstance(s, Merge):
        return [src.model for src in s.sources]
    return []


def _cast(r: Recipe, code: str) -> Recipe:
    if r.dtype != code and r.dtype in FLOAT_CODES:
        return Cast(r, code)
    return r


def _merged(
    m: Merge,
    names: list[tuple[str, str]],
    ckpts,
    out_name: str,
    t: float,
    where: str,
    input_dtype: str | None,
    seed: int | None = None,
    rows_free: bool = False,
) -> Recipe:
    """One output tensor of a merge. `names`: (model, input tensor name) per source, in source order.
    `rows_free`: a token-indexed tensor that is realigned to one vocabulary afterwards, so only its
    other dimensions must agree now."""
    reads = [_read(ckpts, model, n, input_dtype) for model, n in names]
    shapes = {r.shape[1:] if rows_free else r.shape for r in reads}
    if len(shapes) != 1:
        desc = ", ".join(f"{model}:{n} {list(r.shape)}" for (model, n), r in zip(names, reads, strict=True))
        raise PlanError(
            Problem(
                where, f"cannot merge tensors of different shapes for {out_name}: {desc}", "merge models of the same architecture and size"
            )
        )
    for (model, n), r in zip(names, reads, strict=True):
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
                raise PlanError(
                    Problem(where, f"{m.method} needs parameter {p.name!r} for {name}", f"set `{p.name}` on the merge (or per model)")
                )
            return p.default
        return v

    shared = {p.name: value(p, shared_c.get(p.name, ()), out_name) for p in spec.shared}
    per_input = []
    for i, (model, n) in enumerate(names):
        per_input.append(
            {
                p.name: value(p, per_c[i].get(p.name, ()) + shared_c.get(p.name, ()), n)
                for p in spec.per_input
                if p.scope == "input" or i != base_index
            }
        )
    if spec.build is not None:
        return spec.build(reads, base_index, shared, per_input)
    return External(
        m.method,
        tuple(reads),
        tuple(models),
        base_index,
        tuple(sorted(shared.items())),
        tuple(tuple(sorted(p.items())) for p in per_input),
        out_name,
        reads[0].dtype,
        seed,
        where,
    )


def _read(ckpts, model: str, name: str, input_dtype: str | None) -> Recipe:
    r: Recipe = Read(ckpts[model].tensors[name], model)
    return _cast(r, input_dtype) if input_dtype else r


def non_layer_tensors(plan, ckpts, base: Checkpoint, first: Step, out_code, warnings, rows_free: set[str] = frozenset()):
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
            r = _merged(
                step, [(s.model, name) for s in step.sources], ckpts, name, 0.0, where, in_dt, plan.body.seed, rows_free=name in rows_free
            )
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


def _widened(r: Recipe, spec: LayerSpec, family: Family, base: Checkpoint, suffix: str, out_name: str) -> Recipe:
    role = family.mlp_role(suffix)
    if role is None or spec.widen.intermediate is None:
        return r
    kind, dim, parts = role
    old, new = r.shape[dim] // parts, spec.widen.intermediate
    key = family.mlp_size_key(suffix)  # another MLP of the model (a shared expert, a dense layer) grows by the same ratio
    new = family.mlp_sizes_after(family.lm_config(base.config), new).get(key, new)
    if new < old:
        raise PlanError(
            Problem(
                spec.widen_where or spec.where,
                f"widen to {new} units: the MLP already has {old}; width growth only adds units",
                f"use intermediate >= {old}",
            )
        )
    if new == old:
        return r
    w, std = spec.widen, _init_std(spec.widen, family, base)
    init = paper_fill(w.init, reads=kind == "out")  # down_proj reads the MLP's units; gate/up write them
    return Widen(r, kind, dim, parts, old, new, init, std, w.seed, out_name, shares=w.shares, share_key=f"mlp:{key}")


def has_layer_norm(family: Family, base: Checkpoint) -> bool:
    """Whether the model's norms over the stream are LayerNorms (a final norm with a bias: GPT-2, NeoX)
    rather than RMS norms."""
    return bool(family.final_norm_bias) and family.final_norm_bias in base.tensors


def per_head_norms(family: Family, base: Checkpoint, hidden: int) -> bool:
    """Whether a layer has norms other than over the residual stream (Qwen3's and Gemma 3's per-head
    q/k norms), which share the config's epsilon."""
    layer = base.layers[0] if base.layers else {}
    return any(base.tensors[n].shape != (hidden,) for suffix, n in layer.items() if family.is_norm(suffix))


def paper_fill(init: str, reads: bool) -> str:
    """How the new entries of one grown dimension are filled. `zero` is the Gstack paper's G_zero in
    width (Du et al. 2024, App. A.4, Eq. 14; prts `zero.py`): W' = [[W, A], [O, C]], what a new unit
    takes from the old units is zero (O) and whatever reads a new unit is random (A, C), so new
    units start at 0 (the same function) yet every new weight is reachable by a gradient. A tensor
    that writes the grown units gets zero rows, one that reads them random columns."""
    if init != "zero":
        return init
    return "random" if reads else "zero"


def _init_std(w, family: Family, base: Checkpoint) -> float:
    """The std of `init: random` units: the step's own, or the model's initializer_range (0.02)."""
    return w.std or float(family.lm_config(base.config).get("initializer_range") or 0.02)


def _new_hidden_units(tensors: list[OutTensor], spec: LayerSpec, family: Family, base: Checkpoint, h_old: int, new: int) -> list:
    """G_zero / G_random in width for the residual stream: units h_old .. new are new, appended.

    zero (the paper's G_zero, App. A.4): what writes the stream (embeddings, o/down projections)
    gets zero new rows (E' = [E, O]; [O, C] under W), what reads it random new columns (A, C of
    Eq. 14), so the new units are 0 and stay out of every old unit's computation; each RMS norm
    over the stream has its old gains times alpha = sqrt(h_old / new) (Eq. 33: the RMS now runs over
    new zero units too) and a gain of 1 for the new units (the paper's xi; prts zeroes it, which
    would leave the new units without a gradient). The function is kept exactly for RMS norms; a
    LayerNorm's mean also runs over the zeros, so LayerNorm families keep it only approximately
    (compile warns). random (G_random): every new entry normal(0, std), norms a neutral gain;
    function-preserving only under MSG's masks in training (`grow.mask_steps`)."""
    import math

    w = spec.widen
    std = _init_std(w, family, base)
    alpha = math.sqrt(h_old / new) if w.init == "zero" and not has_layer_norm(family, base) else 1.0
    # G_zero scales the config's rms_norm_eps by h_old / new (outconfig) so the stream's norms are exact;
    # a per-head q/k norm shares that epsilon: its projection is scaled by sqrt(h_old / new), and since
    # norm(c q) = q / sqrt(ms(q) + eps' / c^2) it computes exactly what it did
    qk_scale = alpha if alpha != 1.0 and per_head_norms(family, base, h_old) else 1.0
    emb = set(family.embeddings) | set(family.position_embeddings) | {family.lm_head}
    keep = tuple(range(h_old)) + (0,) * (new - h_old)
    # Gemma multiplies its embedding by sqrt(hidden size): the old units are divided by the growth of
    # that factor so they keep their magnitude (as `split` does); a tied head then reads them through
    # the final norm, whose old gains carry the inverse
    s = math.sqrt(h_old / new) if family.embed_scaled else 1.0

    def neutral(r: Recipe, gain: bool, old_scale: float = 1.0) -> Recipe:  # old units as they are (or scaled), new ones 1 (a gain) or 0
        one = 1.0 if gain and not family.norm_plus_one else 0.0
        add = (old_scale - 1.0) if family.norm_plus_one else 0.0  # 1 + w' = (1 + w) c
        return Gather(r, 0, keep, (old_scale,) * h_old + (0.0,) * (new - h_old), (add,) * h_old + (one,) * (new - h_old))

    def grown(r: Recipe, dim: int, reads: bool, key: str) -> Recipe:
        fill = paper_fill(w.init, reads)
        inner, cast = (r.inner, r) if isinstance(r, Cast) else (r, None)
        if fill == "zero" and isinstance(inner, Widen) and inner.init == "random" and inner.dim != dim:
            # a writer of the stream whose other dimension grew first with random columns (o_proj over new
            # heads, down_proj over new MLP units): its new rows are zero under the old columns only, so the
            # rows grow first and the columns after, over them too (C random, as Eq. 14 has it)
            g = replace(inner, inner=Widen(inner.inner, "in", dim, 1, h_old, new, fill, std, w.seed, key))
            return replace(cast, inner=g) if cast is not None else g
        return Widen(r, "in", dim, 1, h_old, new, fill, std, w.seed, key)

    out = []
    for t in tensors:
        r, name, g = t.recipe, t.name, None
        split = family.split(name)
        if split is not None:
            role = family.hidden_role(split[1])
            if role is not None:
                g = grown(r, role[1], role[0] == "in", f"{name}|hidden")
                entry = family.attention_entry(split[1])
                if qk_scale != 1.0 and entry is not None and entry[0] in ("q", "k"):
                    g = Scale(g, qk_scale)
            elif qk_scale != 1.0 and (family.attention_entry(split[1]) or ("",))[0] in ("q", "k"):  # a q/k bias
                g = Scale(r, qk_scale)
            elif len(r.shape) == 1 and r.shape[0] == h_old and family.is_norm(split[1]):
                gain = not split[1].endswith(".bias")
                g = neutral(r, gain, alpha if gain else 1.0)
        elif name in emb and len(r.shape) == 2 and r.shape[1] == h_old:
            g = grown(r, 1, name == family.lm_head and name not in family.embeddings, f"{name}|hidden")
            if s != 1.0 and name in family.embeddings:
                g = Gather(g, 1, tuple(range(new)), (s,) * h_old + (1.0,) * (new - h_old))
        elif family.final_norm and name == family.final_norm:
            g = neutral(r, True, alpha * (1.0 / s if base.tied else 1.0))
        elif family.final_norm_bias and name == family.final_norm_bias:
            g = neutral(r, False)
        elif family.other_roles(name):  # a VLM's projector: new units on every hidden-sized dim
            g = r
            for kind, dim in family.other_roles(name):
                g = grown(g, dim, kind == "in", f"{name}|hidden{dim}")
        if g is None and len(r.shape) == 2 and r.shape[1] == h_old:
            raise _undescribed(spec, family, name, r)
        out.append(OutTensor(name, g) if g is not None else t)
    return out


def _undescribed(spec: LayerSpec, family: Family, name: str, r: Recipe) -> PlanError:
    """A matrix reading the residual stream that the family's data does not describe: refused."""
    return PlanError(
        Problem(
            spec.widen_where,
            f"widen hidden: {name} {list(r.shape)} has the hidden size in its shape but family {family.name} does not say how it grows",
            "report this family's layout",
        )
    )


def head_counts(family: Family, base: Checkpoint, w) -> tuple[int, int, int, int, int] | None:
    """(A, K, A', K', head_dim) for a `widen` with heads/kv_heads, or None; the ratio A/K is kept."""
    if w is None or (w.heads is None and w.kv_heads is None and not (w.hidden is not None and not family.head_dim_key)):
        return None
    cfg = family.lm_config(base.config)
    d = family.head_size(cfg)
    a, k = cfg.get(family.heads_key), cfg.get(family.kv_heads_key) or cfg.get(family.heads_key)
    if w.heads is None and w.kv_heads is None:  # no head size in the config: the heads grow with the hidden size
        h = cfg.get(family.hidden_key)
        if d and isinstance(h, int) and isinstance(a, int) and h % a == 0 and w.hidden % d == 0:
            w = w.model_copy(update={"heads": w.hidden // d})
    if not (isinstance(a, int) and isinstance(k, int) and isinstance(d, int) and k and a % k == 0):
        raise PlanError(Problem(None, "widen heads: the config does not give num_attention_heads, num_key_value_heads and the head size"))
    g = a // k
    a2 = w.heads if w.heads is not None else w.kv_heads * g
    k2 = w.kv_heads if w.kv_heads is not None else (a2 // g if a2 % g == 0 else None)
    if k2 is None or a2 != k2 * g or a2 < a or k2 < k:
        raise PlanError(
            Problem(
                None,
                f"widen heads: {a} heads share {k} key/value heads ({g} per group); the new counts "
                f"must keep that ratio and not shrink (got heads {a2}, kv_heads {k2})",
                f"e.g. heads: {2 * a}, kv_heads: {2 * k}",
            )
        )
    return a, k, a2, k2, d


def _heads(
    r: Recipe,
    family: Family,
    counts,
    suffix: str,
    init: str = "split",
    std: float = 0.0,
    seed: int = 0,
    key: str = "",
    shares: str = "even",
) -> Recipe:
    entry = family.attention_entry(suffix)
    if counts is None or entry is None:
        return r
    role, hdim = entry
    a, k, a2, k2, d = counts
    at = 0 if hdim is None else hdim  # q, k, v, qkv: rows are heads (GPT-2's Conv1D: columns)
    if init != "split":
        # G_zero / G_random: new heads appended (query heads a..a2, key/value heads k..k2: query head
        # h still reads key/value head h // g), their rows zero or normal(0, std); what reads them
        # (o_proj's new columns) too, so `zero` adds heads that contribute nothing yet
        blocks = {
            "q": ((a * d, a2 * d),),
            "k": ((k * d, k2 * d),),
            "v": ((k * d, k2 * d),),
            "qkv": ((a * d, a2 * d), (k * d, k2 * d), (k * d, k2 * d)),
            "qkv_per_head": ((3 * a * d, 3 * a2 * d),),  # NeoX: whole heads (q|k|v each) appended
            "o": ((a * d, a2 * d),),
        }.get(role)
        if blocks is None:
            return r
        dim = (1 if hdim is None else hdim) if role == "o" else at
        fill = paper_fill(init, reads=role == "o")  # o_proj reads the heads; q/k/v write them
        return Widen(r, "in", dim, 1, blocks[0][0], blocks[0][1], fill, std, seed, f"{key}|heads", blocks if len(blocks) > 1 else None)
    g = a // k
    kv_src = [j % k for j in range(k2)]
    q_src = [kv_src[h // g] * g + h % g for h in range(a2)]

    def rows(src):
        return [s * d + e for s in src for e in range(d)]

    if role == "q":
        return Gather(r, at, tuple(rows(q_src)))
    if role in ("k", "v"):
        return Gather(r, at, tuple(rows(kv_src)))
    if role == "qkv":
        idx = rows(q_src) + [a * d + i for i in rows(kv_src)] + [(a + k) * d + i for i in rows(kv_src)]
        return Gather(r, at, tuple(idx))
    if role == "qkv_per_head":  # NeoX: head h's q, k and v side by side, 3 x head_dim rows (no GQA)
        return Gather(r, at, tuple(s * 3 * d + e for s in q_src for e in range(3 * d)))
    if role == "o":  # what reads the heads (columns; GPT-2's Conv1D: rows): a copied head's share is divided among its copies
        share = split_shares(q_src, a, shares, seed, "heads")
        return Gather(r, 1 if hdim is None else hdim, tuple(rows(q_src)), tuple(x for x in share for _ in range(d)))
    return r


def layer_tensors(
    j: int,
    spec: LayerSpec,
    ckpts,
    family: Family,
    base: Checkpoint,
    out_code: str,
    warnings,
    in_dt: str | None = None,
    seed: int | None = None,
) -> list[OutTensor]:
    m0, l0 = spec.sources[0]
    src_layer = ckpts[m0].layers[l0]
    ref_layer = base.layers[0]
    if set(src_layer) != set(ref_layer):
        extra = sorted(set(src_layer) ^ set(ref_layer))[:4]
        raise PlanError(
            Problem(
                spec.where,
                f"layer {l0} of {m0!r} does not have the tensors of {base.name!r}'s layers (differs in {extra})",
                "all layers in one output must come from the same architecture",
            )
        )
    out: list[OutTensor] = []
    zeroed = 0
    try:  # the head counts are the same for every tensor of the layer: worked out once
        heads = head_counts(family, base, spec.widen)
    except PlanError as e:
        raise PlanError(Problem(spec.widen_where, e.problems[0].what, e.problems[0].fix)) from None
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
            raise PlanError(
                Problem(
                    spec.where,
                    f"{m0}:{name} has shape {list(r.shape)} but the output's layers "
                    f"({base.name!r}) need {list(base.tensors[ref_layer[suffix]].shape)}",
                    "all layers in one output must come from models of the same size",
                )
            )
        if spec.init == "identity" and family.is_output_projection(suffix):
            r, zeroed = Zeros(r.shape, r.dtype), zeroed + 1
        elif spec.init == "zero" and not family.is_norm(suffix):
            r = Zeros(r.shape, r.dtype)
        elif spec.init == "random" and not family.is_norm(suffix):
            r = Zeros(r.shape, r.dtype) if len(r.shape) < 2 else RandomNormal(r.shape, r.dtype, spec.std, spec.seed, out_name)
        if spec.widen is not None:
            w = spec.widen
            r = _widened(r, spec, family, base, suffix, out_name)
            r = _heads(r, family, heads, suffix, w.init, _init_std(w, family, base), w.seed, out_name, w.shares)
        for filt, k in spec.scales:
            if filt is None or filt in out_name:
                r = Scale(r, k)
        out.append(OutTensor(out_name, _cast(r, out_code)))
    if spec.init == "identity" and not zeroed:
        raise PlanError(
            Problem(
                spec.where,
                f"identity init: no output projections found in layer {l0} of {m0!r} "
                f"(family {family.name}); the copy would not be function-preserving",
                "use init: copy, or register an architecture entry naming the output projections",
            )
        )
    return out


def widen_hidden(tensors: list[OutTensor], spec: LayerSpec, family: Family, base: Checkpoint) -> list[OutTensor]:
    """The residual stream grown to `hidden` units, unit j a copy of unit j mod H: what writes it
    (embeddings, o_proj, down_proj, norms) is copied, what reads it (q/k/v, gate/up, lm_head) is
    divided by each unit's number of copies. For a whole multiple k every unit has k copies, a
    duplicated vector keeps its RMS and the function is exact; otherwise norms see another RMS and
    it is kept approximately (compile warns: `approximate-growth`). Gemma's embedding scale
    sqrt(hidden) grows by sqrt(new / old): its embedding is divided by that. A tied lm_head cannot be
    both copied and divided: the final norm's gain carries the division instead."""
    import math

    h_old = family.lm_config(base.config).get(family.hidden_key)
    new = spec.widen.hidden
    if not isinstance(h_old, int) or new < h_old:
        raise PlanError(
            Problem(
                spec.widen_where,
                f"widen hidden to {new}: the hidden size is {h_old}; width growth only adds units",
                f"use hidden >= {h_old}",
            )
        )
    if new == h_old:
        return tensors
    if spec.widen.init != "split":
        return _new_hidden_units(tensors, spec, family, base, h_old, new)
    if base.tied and family.embed_scaled and new % h_old:
        raise PlanError(
            Problem(
                spec.widen_where,
                f"widen hidden to {new}: a non-multiple of {h_old} with Gemma's tied, scaled embedding is not supported",
                f"use a multiple of {h_old}",
            )
        )
    src = tuple(j % h_old for j in range(new))
    share = split_shares(src, h_old, spec.widen.shares, spec.widen.seed, "stream")
    emb_scale = math.sqrt(h_old / new) if family.embed_scaled else 1.0
    emb = set(family.embeddings)
    out = []
    for t in tensors:
        r, name = t.recipe, t.name
        g = None
        split = family.split(name)
        if split is not None:
            role = family.hidden_role(split[1])
            if role is not None:
                kind, dim = role
                g = Gather(r, dim, src, share if kind == "in" else None)
            elif len(r.shape) == 1 and r.shape[0] == h_old and family.is_norm(split[1]):
                g = Gather(r, 0, src)
        elif name in emb:
            g = Gather(r, 1, src, (emb_scale,) * new if emb_scale != 1 else None)
        elif name in family.position_embeddings:  # added to the token embedding: copied the same way
            g = Gather(r, 1, src)
        elif name == family.lm_head:
            g = Gather(r, 1, src, share)
        elif name == family.final_norm:
            if not base.tied:
                g = Gather(r, 0, src)
            else:  # logits = E' n': E' is the copied (and scaled) embedding, so n' carries the division
                c = tuple(x / emb_scale for x in share)  # sum over a unit's copies of c * emb_scale = 1
                g = Gather(r, 0, src, c, tuple(x - 1 for x in c) if family.norm_plus_one else None)
        elif family.final_norm_bias and name == family.final_norm_bias:
            # a LayerNorm's bias (GPT-2's ln_f) goes with its gain: copied, or divided for a tied head
            g = Gather(r, 0, src, share if base.tied else None)
        elif family.other_roles(name):  # a VLM's projector: what writes the stream copied, what reads it divided
            g = r
            for kind, dim in family.other_roles(name):
                g = Gather(g, dim, src, share if kind == "in" else None)
        if g is None and len(r.shape) == 2 and r.shape[1] == h_old:  # an unknown matrix reading the stream
            raise _undescribed(spec, family, name, r)
        out.append(OutTensor(name, g) if g is not None else t)
    return out
