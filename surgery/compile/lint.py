"""Warnings about plans that are valid but probably not what was meant.

Each warning is a `Problem` with a stable `code`, so CI can fail on them (`validate --strict`)
and ignore the ones a team has decided are fine (`--ignore duplicated-layers`):

- `duplicated-layers`: layers copied more than once (SOLAR, Gstack) do not compute the original
  function; that is intended before continued pretraining, not when function preservation was expected;
- `vocab-mismatch`, `rope-mismatch`: a merge of models with different vocabularies or RoPE settings;
- `narrowing-dtype`: the output dtype is narrower (or of another range) than an input's;
- `gradient-too-long`: a gradient list with more anchors than the layers it spans;
- `dead-parameters`: new parameters that no gradient can reach (`dead_parameters`): an all-zero
  block (`expand: {init: zero}`), zero units in width (`widen: {init: zero}`);
- (from compile) `unknown-family`, `guessed-identity`, `config`, `chat-template`.
"""

from __future__ import annotations

from surgery.io.safetensors import DTYPES, FLOAT_CODES, dtype_name
from surgery.errors import Problem

CODES = (
    "duplicated-layers",
    "vocab-mismatch",
    "rope-mismatch",
    "narrowing-dtype",
    "gradient-too-long",
    "unknown-family",
    "guessed-identity",
    "config",
    "chat-template",
    "unused-parameter",
    "approximate-growth",
    "dead-parameters",
)
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rotary_pct", "rotary_emb_base")


def lint(plan, ckpts, stack, out_code: str) -> list[Problem]:
    from surgery.compile.stack import merge_ranges
    from surgery.plan import Merge

    out: list[Problem] = []
    up = next((x for x in stack if x.upcycle is not None), None)
    if up is not None and up.upcycle.router in ("zero", "uniform") and up.upcycle.top_k < up.upcycle.count:
        u = up.upcycle
        out.append(
            Problem(
                up.upcycle_where,
                f"a {u.router} router gives every expert the same logit, and top-{u.top_k} of equal logits picks the same "
                f"{u.top_k} experts for every token: the other {u.count - u.top_k} get no tokens and no gradient until the "
                "load-balancing loss has moved the router" + (", and the experts start identical" if not u.sources and not u.noise else ""),
                "use `router: random` (with identical experts any routing computes the dense function too, and tokens "
                "spread from the first step), or train with the router loss on (the default)",
                code="symmetric-experts",
            )
        )
    # layers made the same way twice (plain copies, or copies of one merged layer), reported at the
    # step that made the second one
    seen: dict[tuple, int] = {}
    dup_at: dict[str, list[str]] = {}
    for j, s in enumerate(stack):
        if s.init != "copy":
            continue
        key = (s.sources, id(s.merge) if s.merge is not None else None, round(s.t, 12), s.scales, s.take_scale)
        if key in seen:
            dup_at.setdefault(s.where, []).append(f"{j} = {s.source_text()} (also layer {seen[key]})")
        else:
            seen[key] = j
    for where, items in dup_at.items():
        shown = "; ".join(items[:3]) + (f"; and {len(items) - 3} more" if len(items) > 3 else "")
        out.append(
            Problem(
                where,
                f"{len(items)} output layer(s) repeat a layer as a plain copy ({shown}): the grown model "
                "does not compute what the original did until it is trained further",
                "intended for SOLAR / Gstack, which train further; to keep the function use `expand` with "
                "`init: identity`; `--ignore duplicated-layers` silences this",
                code="duplicated-layers",
            )
        )
    for i, step in enumerate(plan.steps):
        if not isinstance(step, Merge):
            continue
        names = [m.model for m in step.sources]
        where = plan.step_where(i)
        vocab = {n: ckpts[n].family.lm_config(ckpts[n].config).get("vocab_size") for n in names}
        toks = {n: _tokenizer_digest(ckpts[n].path) for n in names}
        if plan.body.tokenizer is not None:
            pass  # a tokenizer source is set: differing vocabularies are realigned to it (compile)
        elif len(set(vocab.values())) > 1:
            out.append(
                Problem(
                    where,
                    "merge of models with different vocabularies: " + ", ".join(f"{n} {v}" for n, v in vocab.items()),
                    "token ids do not line up; use `tokenizer: union` (mergekit plugin) or models from one release",
                    code="vocab-mismatch",
                )
            )
        elif None not in toks.values() and len(set(toks.values())) > 1:
            out.append(
                Problem(
                    where,
                    f"merge of models whose tokenizers differ ({', '.join(names)}: tokenizer.json differs) "
                    "although the vocabulary sizes match",
                    "the same id may be a different token in each model; "
                    "check that they share a tokenizer, or use `tokenizer: union` (mergekit plugin)",
                    code="vocab-mismatch",
                )
            )
        ropes = {n: rope_settings(ckpts[n].family.lm_config(ckpts[n].config)) for n in names}
        for key in sorted({k for r in ropes.values() for k in r}):
            vals = {n: r.get(key) for n, r in ropes.items()}
            if len({repr(v) for v in vals.values()}) > 1:
                out.append(
                    Problem(
                        where,
                        f"merge of models with different {key}: " + ", ".join(f"{n} {v!r}" for n, v in vals.items()),
                        "their position encodings differ, so merged attention weights disagree about positions",
                        code="rope-mismatch",
                    )
                )
        a, b = merge_ranges(step, ckpts)[0]  # compile checked that every source's range has this length
        span = b - a
        grads = [(("t",), step.t)] + [(("overrides", k, "t"), o.t) for k, o in enumerate(step.overrides)]
        grads += [(("parameters", k), v) for k, v in step.parameters.items()]
        for key, g in grads:
            if isinstance(g, tuple) and g and all(isinstance(x, (int, float)) for x in g) and len(g) > max(span, 1):
                out.append(
                    Problem(
                        plan.where("steps", i, "merge", *key),
                        f"gradient has {len(g)} values for the {span} "
                        "layer(s) this merge spans; the extra anchors only reshape the interpolation",
                        f"give at most {span} values (one per layer) or fewer anchors",
                        code="gradient-too-long",
                    )
                )
    out += [Problem(where, text, fix, code="dead-parameters") for where, text, fix in dead_parameters(stack, ckpts)]
    input_floats = {t.dtype for ck in ckpts.values() for t in ck.tensors.values() if t.dtype in FLOAT_CODES}
    narrower = sorted(c for c in input_floats if _narrows(c, out_code))
    if narrower:
        where = plan.where("output", "dtype") if plan.body.output.dtype else plan.where()
        out.append(
            Problem(
                where,
                f"output dtype {dtype_name(out_code)} is narrower than the inputs' "
                f"{', '.join(dtype_name(c) for c in narrower)}: values are rounded"
                + (" and may overflow" if any(c == "BF16" and out_code == "F16" for c in narrower) else ""),
                f"set `output: {{dtype: {dtype_name(_widest(narrower))}}}` to keep the inputs' precision",
                code="narrowing-dtype",
            )
        )
    return out


def _tokenizer_digest(folder) -> str | None:
    """The tokenizer's vocabulary (model section of tokenizer.json), hashed; None when absent."""
    import hashlib
    import json

    f = folder / "tokenizer.json"
    if not f.is_file() or f.stat().st_size > 64 * 2**20:
        return None
    try:
        model = json.loads(f.read_text(encoding="utf-8")).get("model", {})
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return hashlib.sha256(json.dumps(model.get("vocab"), sort_keys=True).encode()).hexdigest()


def rope_settings(cfg: dict) -> dict:
    """RoPE settings whichever way the config spells them (top-level keys, transformers 5's
    `rope_parameters`, or `rope_scaling`)."""
    out = {k: cfg[k] for k in ROPE_KEYS if k in cfg and k not in ("rope_parameters", "rope_scaling") and cfg[k] is not None}
    for key in ("rope_parameters", "rope_scaling"):
        v = cfg.get(key)
        if isinstance(v, dict):
            for k, x in v.items():
                out.setdefault(k if k in ("rope_theta",) else f"rope.{k}", x)
    return out


def _narrows(src: str, out: str) -> bool:
    if src == out or out not in FLOAT_CODES:
        return False
    a, b = DTYPES[src][1], DTYPES[out][1]
    return b < a or (a == b == 2)  # float16 <-> bfloat16: one loses range, the other precision


def _widest(codes) -> str:
    return max(codes, key=lambda c: (DTYPES[c][1], c == "F32"))


def dead_parameters(stack, ckpts) -> list[tuple[str, str, str]]:
    """(where, what, fix) for new parameters that training can never move.

    Depth: a block whose every weight but its norms is zero (`expand: {init: zero}`): its values are
    0, so o_proj gets no gradient and q/k/v none through o_proj = 0; its MLP computes act(0) * 0, so
    gate, up and down get none either (with biases only the output biases move, feeding nothing back).
    Width, the paper's G_zero (`widen: {init: zero}`) without growing the stream: a new unit's
    writers are zero (O) and only its readers random, which trains where one factor is enough (a
    GELU MLP, the values of new heads) but not where two zero factors meet: new heads' queries and
    keys (q k^T: each one's gradient is the other) and a gated MLP's new units (act(gate) * up). When
    the stream grows too, its new units become non-zero as training moves O, and through the random
    C blocks everything moves."""
    out: list[tuple[str, str, str]] = []
    zero = [i for i, s in enumerate(stack) if s.new and s.init == "zero"]
    if zero:
        shown = ", ".join(map(str, zero[:8])) + (f" and {len(zero) - 8} more" if len(zero) > 8 else "")
        out.append(
            (
                stack[zero[0]].where,
                f"layers {shown} are zero but for their norms: no gradient reaches any of their weights (values 0 give o_proj "
                "none, act(0) * 0 gives the MLP none), so they never train and the grown model trains like the one without them",
                "use `init: identity` (LLaMA Pro, the Gstack paper's G_zero: only the output projections zero) or "
                "`init: random` with grow.mask_steps; or `gstack: {operator: zero, factor: N}`",
            )
        )
    w = stack[0].widen if stack else None
    if w is not None and w.init == "zero" and w.hidden is None:
        ck = ckpts[stack[0].sources[0][0]]
        fam = ck.family
        roles = [fam.mlp_role(sfx) for sfx in (ck.layers[0] if ck.layers else {})]
        gated = sum(r[2] for r in roles if r is not None and r[0] == "in") >= 2  # gate and up (or a fused gate_up)
        dead = ["new heads' query and key rows (q k^T: each one's gradient is the other, both zero)"] if w.heads or w.kv_heads else []
        dead += ["the gated MLP's new units (act(gate) * up with both zero)"] if w.intermediate is not None and gated else []
        if dead:
            out.append(
                (
                    stack[0].widen_where,
                    f"widen with init: zero (the paper's G_zero) without growing `hidden`: {' and '.join(dead)} never receive a "
                    "gradient; their readers (o_proj, down_proj) train, but these units stay off",
                    "grow `hidden` too (as the paper does: its new stream units move first and free the rest), or use "
                    "`init: random` with grow.mask_steps, or `init: split` with `shares: random`",
                )
            )
    return out
