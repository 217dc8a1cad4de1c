"""Write the mergekit config equivalent to a plan, wherever mergekit can express it.

Consecutive plain copies become passthrough slices; an identity, zero or scaled layer becomes a
one-layer slice whose `scale` parameter has one condition per affected tensor (filters are the
tensors' full layer-relative names, so they never match embeddings or norms); merges become
slices with their parameters. mergekit has one `merge_method` per config, takes embeddings from
the first slice and the final norm and lm_head from the last, and cannot draw random weights:
a plan that needs otherwise is refused, naming the step and the reason.
"""

from __future__ import annotations

from typing import Any

import yaml

from surgery.io.safetensors import dtype_name
from surgery.compile.program import Program
from surgery.compile.stack import LayerSpec, merge_conditions
from surgery.errors import PlanError, Problem
from surgery.plan.settings import to_mergekit as setting_yaml


def _ref(program: Program, model: str) -> str:
    ck = program.ckpts[model]
    ref = ck.ref
    return ref if not ref.startswith((".", "/", "~")) and not (program.plan.base_dir / ref).exists() else str(ck.path)


def _layer_scales(program: Program, spec: LayerSpec, index: int) -> dict[str, float]:
    """layer-relative tensor name -> factor, for the tensors this layer does not copy as they are."""
    fam = program.family
    out: dict[str, float] = {}
    for suffix in program.ckpts[spec.sources[0][0]].layers[spec.sources[0][1]]:
        f = 1.0
        if (spec.init == "identity" and fam.is_output_projection(suffix)) or (spec.init == "zero" and not fam.is_norm(suffix)):
            f = 0.0
        out_name = fam.layer_name(index, suffix)
        for flt, k in spec.scales:
            if flt is None or flt in out_name:
                f *= k
        if f != 1.0:
            out[suffix] = f
    return out


def to_mergekit(program: Program) -> dict:
    plan = program.plan
    stack = program.stack
    problems: list[Problem] = []
    methods = sorted({s.merge.method for s in stack if s.merge is not None})
    copies = [s for s in stack if s.merge is None]
    if len(methods) > 1:
        problems.append(Problem(plan.source, f"the plan merges with {', '.join(methods)}; a mergekit config has one merge_method"))
    if methods and copies:
        problems.append(
            Problem(
                copies[0].where,
                f"this step copies layers while another merges them ({methods[0]}); "
                "a mergekit config applies one merge_method to every slice",
            )
        )
    for s in stack:
        if s.init == "random":
            problems.append(Problem(s.where, "init: random has no mergekit equivalent (mergekit cannot draw new weights)"))
        if s.widen is not None and not any(p.where == s.widen_where for p in problems):
            problems.append(Problem(s.widen_where, "widen has no mergekit equivalent (mergekit keeps every tensor's shape)"))
        if s.take_scale and (s.init != "copy" or s.scales):
            problems.append(
                Problem(
                    s.where, "a take's own `scale` combined with other changes to the same layer cannot be written as one mergekit slice"
                )
            )
    if plan.body.non_layer is not None:
        problems.append(
            Problem(
                plan.where("non_layer"),
                "mergekit takes embeddings from the first slice and lm_head from the last; `non_layer` cannot be expressed",
                "drop `non_layer` and order the steps accordingly",
            )
        )
    if plan.body.post_from != "last" and program.stack:
        first_m, last_m = stack[0].sources[0][0], stack[-1].sources[0][0]
        if first_m != last_m and not methods:
            problems.append(
                Problem(
                    plan.source,
                    f"final norm and lm_head come from {first_m!r} here, but mergekit takes them from the last slice ({last_m!r})",
                    "set `post_from: last` in the plan to match mergekit",
                )
            )
    if problems:
        raise PlanError(problems)

    cfg: dict[str, Any] = {}
    slices: list[dict] = []
    if methods:
        i = 0
        while i < len(stack):
            m = stack[i].merge
            j = i
            while j < len(stack) and stack[j].merge is m:
                j += 1
            block = stack[i:j]
            if any(b.sources != tuple((src, li + k) for src, li in block[0].sources) for k, b in enumerate(block)) or [
                b.t for b in block
            ] != [(k / (len(block) - 1) if len(block) > 1 else 1.0) for k in range(len(block))]:
                raise PlanError(
                    Problem(
                        block[0].where,
                        "this merge's layers were reordered or cut by later steps; mergekit interpolates gradients over whole slices",
                    )
                )
            shared, per_source = merge_conditions(m)
            sources = []
            for k, (model, li) in enumerate(block[0].sources):
                src: dict[str, Any] = {"model": _ref(program, model), "layer_range": [li, li + len(block)]}
                params = {name: setting_yaml(c) for name, c in per_source[k].items() if c}
                if params:
                    src["parameters"] = params
                sources.append(src)
            sl: dict[str, Any] = {"sources": sources}
            if shared:
                sl["parameters"] = {name: setting_yaml(c) for name, c in shared.items()}
            slices.append(sl)
            i = j
        cfg["merge_method"] = methods[0]
        bases = {s.merge.base_model for s in stack}
        if len(bases) == 1 and None not in bases:
            cfg["base_model"] = _ref(program, bases.pop())
        elif len(bases) > 1:
            for sl, s in zip(slices, [x for k, x in enumerate(stack) if k == 0 or x.merge is not stack[k - 1].merge], strict=True):
                if s.merge.base_model:
                    sl["base_model"] = _ref(program, s.merge.base_model)
    else:
        cfg["merge_method"] = "passthrough"
        i = 0
        while i < len(stack):
            s = stack[i]
            model, li = s.sources[0]
            scales = _layer_scales(program, s, i)
            j = i + 1
            if not scales and not s.take_scale:
                while (
                    j < len(stack)
                    and stack[j].sources[0] == (model, li + (j - i))
                    and not stack[j].take_scale
                    and not _layer_scales(program, stack[j], j)
                ):
                    j += 1
            src: dict[str, Any] = {"model": _ref(program, model), "layer_range": [li, li + (j - i)]}
            if scales:
                src["parameters"] = {"scale": [{"filter": suffix, "value": f} for suffix, f in scales.items()]}
            elif s.take_scale:
                src["parameters"] = {"scale": setting_yaml(s.take_scale)}
            slices.append({"sources": [src]})
            i = j
    cfg = {"slices": slices, **cfg}
    if plan.body.input_dtype:
        cfg["dtype"] = plan.body.input_dtype
    cfg["out_dtype"] = dtype_name(program.dtype)
    if plan.body.tokenizer:
        cfg["tokenizer_source"] = _ref(program, plan.body.tokenizer)
    return cfg


# the surgery routers mergekit-moe has as gate modes, under the same names (its random: N(0, 1))
MOE_GATE_MODES = frozenset({"cheap_embed", "hidden", "hidden_avg", "random", "uniform_random"})
MOE_ARCH = {"mixtral": "mixtral", "qwen2_moe": "qwen", "qwen3_moe": "qwen3"}


def to_mergekit_moe(program: Program) -> dict:
    """The mergekit-moe config of a plan that upcycles one base model as it is (`take` of the whole
    model, then `upcycle`): its experts, gate mode, shared expert and top-k. What mergekit-moe cannot
    express (other changes to the layers, some layers left dense, a zero router, a random router of
    another scale, Qwen2-MoE's halved copies) is a located problem."""
    stack, plan = program.stack, program.plan
    first = next(x for x in stack if x.upcycle is not None)
    u, where = first.upcycle, first.upcycle_where
    base = stack[0].sources[0][0]
    spec = program.ckpts[base].family.upcycle
    problems: list[Problem] = []
    if any(x.upcycle is not u for x in stack):
        problems.append(
            Problem(where, "mergekit-moe turns every layer's MLP into experts; this plan keeps some layers dense", "drop `layers`")
        )
    whole = len(stack) == len(program.ckpts[base].layers) and all(
        x.sources == ((base, i),) and x.init == "copy" and not x.scales and not x.take_scale and x.merge is None and x.widen is None
        for i, x in enumerate(stack)
    )
    if not whole or plan.body.non_layer is not None:
        problems.append(
            Problem(
                stack[0].where,
                "mergekit-moe upcycles one base model's layers as they are; this plan changes or reorders them first",
                "apply those steps in a first plan and upcycle its output in a second",
            )
        )
    if u.router not in MOE_GATE_MODES or (u.router == "random" and u.std != 1.0):
        std = u.std if u.std is not None else 0.02
        what = (
            f"mergekit-moe's random gate is N(0, 1), this router's std is {std:g}"
            if u.router == "random"
            else (f"mergekit-moe has no {u.router} router: its gates are hidden, hidden_avg, cheap_embed, random and uniform_random")
        )
        problems.append(Problem(where, what, "router: cheap_embed, hidden, or random with std: 1.0"))
    if u.router == "uniform_random" and not u.sources:
        problems.append(
            Problem(
                where,
                "mergekit-moe's uniform_random gate needs positive_prompts for every expert",
                "give experts as a list of {model, positive_prompts}",
            )
        )
    if spec.get("shared") and u.shared is None:
        problems.append(
            Problem(
                where,
                "without `shared`, the Qwen2-MoE's shared expert is the dense MLP with its routed copies halved; "
                "mergekit-moe takes the shared expert from its config",
                "give `shared: {model, positive_prompts}`",
            )
        )
    elif spec.get("shared") and not u.shared.positive_prompts and u.router not in ("random", "uniform_random"):
        problems.append(
            Problem(
                where,
                "mergekit-moe refuses a Qwen MoE whose shared expert has no prompts (surgery starts its gate at zero)",
                "give the shared expert positive_prompts, or use router: random with std: 1.0",
            )
        )
    if u.shared is not None and u.shared.model != base and all(e.model != u.shared.model for e in u.sources):
        problems.append(
            Problem(
                where,
                f"mergekit-moe 0.1.5 opens only the base model and the routed experts' models; the shared expert's "
                f"model {u.shared.model!r} is neither, so it would fail on it",
                "take the shared expert from the base model or from a routed expert's model",
            )
        )
    if plan.body.tokenizer and plan.body.tokenizer != base:
        problems.append(
            Problem(plan.where("tokenizer"), "mergekit-moe copies the base model's tokenizer; this plan takes another", "drop `tokenizer`")
        )
    if problems:
        raise PlanError(problems)

    def expert(src) -> dict:
        e: dict[str, Any] = {"source_model": _ref(program, src.model if src is not None else base)}
        if src is not None:
            for key in ("positive_prompts", "negative_prompts"):
                if getattr(src, key):
                    e[key] = list(getattr(src, key))
            if src.residual_scale is not None:
                e["residual_scale"] = src.residual_scale
        noise = src.noise_scale if src is not None and src.noise_scale is not None else u.noise
        if noise:
            e["noise_scale"] = noise  # mergekit-moe draws it unseeded
        return e

    cfg: dict[str, Any] = {
        "base_model": _ref(program, base),
        "architecture": MOE_ARCH[spec["model_type"]],
        "gate_mode": u.router,
        "dtype": dtype_name(program.dtype),
        "experts_per_token": u.top_k,
        "experts": [expert(e) for e in u.sources] or [expert(None) for _ in range(u.count)],
    }
    if u.shared is not None:
        cfg["shared_experts"] = [expert(u.shared)]
    return cfg


def to_mergekit_yaml(program: Program) -> str:
    """mergekit-yaml's config of the plan, or mergekit-moe's where the plan upcycles."""
    moe = any(x.upcycle is not None for x in program.stack)
    tool = "mergekit-moe" if moe else "mergekit"
    head = f"# {tool} 0.1.5 config written by `surgery export --mergekit` from {program.plan.source}\n"
    if moe:
        u = next(x.upcycle for x in program.stack if x.upcycle is not None)
        if u.router != "random" and len({e.model for e in u.sources}) <= 1:  # mergekit-moe refuses one model's experts without it
            head += "# run: mergekit-moe THIS.yml OUT --i-understand-this-is-not-useful-without-training\n"
    return head + yaml.safe_dump(to_mergekit_moe(program) if moe else to_mergekit(program), sort_keys=False, default_flow_style=None)
