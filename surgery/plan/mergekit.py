"""Run mergekit configs unchanged: translate a mergekit 0.1.5 YAML into a surgery plan.

Recognised by its `merge_method` key. The translation follows mergekit's semantics:

- `slices` are stacked in order; each slice's `sources` are merged layer by layer over their
  `layer_range` (half-open), with gradients interpolated within the slice (idx / (n - 1));
  a `passthrough` slice is a `take` (with mergekit's per-input `scale`);
- `models` is a whole-model merge; a `base_model` not among the models is added as an input;
- `parameters` at the source, slice and top level keep mergekit's precedence (source > slice >
  top, a level whose filters all miss falls through), and per-input parameters are matched
  against the input tensor's name;
- embeddings are made like the first slice's layers, final norm and lm_head like the last
  slice's, at t = 0;
- `dtype` casts every input before merging, `out_dtype` (else `dtype`) is the output dtype;
- `tokenizer_source: base` or a model picks whose tokenizer files are copied.

No mergekit import happens here; methods other than passthrough, linear, slerp and nuslerp
need the mergekit plugin, and say so. Local model paths are relative to the working
directory, as in mergekit. Every error points at the config's own lines.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from surgery import registry
from surgery.errors import PlanError, Problem
from surgery.plan.settings import to_mergekit
from surgery.plan.yamlio import Located

TOP_KEYS = {
    "merge_method",
    "slices",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "name",
    "modules",
}


class Input(NamedTuple):
    """One model entry of a mergekit slice (or of `models`): its plan name, its parameters, where it
    is in the config, and its layer range (None for a whole-model `models:` entry)."""

    model: str
    params: dict
    path: tuple
    layers: list | None = None


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _ref(v: Any, where: str) -> tuple[str, str | None]:
    """A mergekit model reference: 'path-or-id', 'id@revision', or {model: {path, revision}}."""
    if isinstance(v, dict):
        inner = v.get("model", v)
        if isinstance(inner, dict) and "path" in inner:
            if inner.get("lora") or v.get("lora"):
                raise PlanError(
                    "LoRA model references are not supported",
                    where=where,
                    fix="merge the LoRA into its base first (e.g. with peft's merge_and_unload)",
                )
            return str(inner["path"]), inner.get("revision")
        raise PlanError(f"cannot read model reference {v!r}", where=where)
    if not isinstance(v, str) or not v:
        raise PlanError(f"a model reference must be a path or hub id, got {v!r}", where=where)
    if "+" in v:
        raise PlanError(
            f"LoRA model references ({v!r}) are not supported",
            where=where,
            fix="merge the LoRA into its base first (e.g. with peft's merge_and_unload)",
        )
    if "@" in v and not Path(v).exists():
        path, rev = v.rsplit("@", 1)
        return path, rev
    return v, None


def _name_for(path: str, taken: dict[str, str]) -> str:
    base = re.sub(r"[^\w.-]", "_", Path(path.rstrip("/")).name or "model") or "model"
    if not re.match(r"[A-Za-z_]", base):
        base = "m_" + base
    name, k = base, 2
    while name in taken and taken[name] != path:
        name, k = f"{base}_{k}", k + 1
    return name


def translate(doc: Located) -> Located:
    """A mergekit config (as located YAML) -> an equivalent surgery plan (located at the config's lines)."""
    data = doc.data
    at = doc.where
    problems: list[Problem] = []
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise PlanError(
            f"unknown mergekit key {unknown[0]!r}", where=at((unknown[0],)), fix=f"mergekit 0.1.5 keys: {', '.join(sorted(TOP_KEYS))}"
        )
    for key, why in (("modules", "multi-module (vision-language) configs"),):
        if data.get(key) is not None:
            problems.append(
                Problem(
                    at((key,)),
                    f"{why} are not supported by surgery yet",
                    "run this config with mergekit itself (`surgery mergekit CONFIG OUT` with the plugin)",
                )
            )
    method = data["merge_method"]
    if not isinstance(method, str):
        raise PlanError("merge_method must be a string", where=at(("merge_method",)))
    slices, models = data.get("slices"), data.get("models")
    if (slices is None) == (models is None):
        raise PlanError(
            "a mergekit config has exactly one of `slices` or `models`",
            where=at(),
            fix="use `slices:` (stacked layer ranges) or `models:` (whole-model merge)",
        )
    names: dict[str, str] = {}  # plan name -> path
    revisions: dict[str, str | None] = {}
    lines: dict[tuple, int] = {}

    def name(ref: Any, path: tuple) -> str:
        p, rev = _ref(ref, at(path))
        n = next((k for k, v in names.items() if v == p), None) or _name_for(p, names)
        names[n] = p
        revisions[n] = rev or revisions.get(n)
        return n

    def line(path: tuple) -> int:
        return doc.lines.get(path) or doc.lines.get(path[:-1]) or doc.lines.get(()) or 1

    spec = registry.current().resolve_method(method) if method != "passthrough" else None
    known = {"scale"} if method == "passthrough" else ({p.name for p in spec.params} if spec is not None else None)

    def params(v: Any, path: tuple) -> dict:
        """A `parameters:` mapping, less the parameters the method does not use: mergekit resolves only
        the parameters a method declares and ignores the rest; surgery does the same and says so."""
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise PlanError(
                f"`parameters` must be a mapping of name: value, got {type(v).__name__} {v!r}"[:200],
                where=at(path),
                fix="write e.g. `parameters: {weight: 0.5}`",
            )
        if known is None:  # an unknown method: the plan's check names it
            return v
        for k in v:
            if k not in known:
                doc.notes.append(
                    Problem(
                        at(path + (k,)),
                        f"{method} does not use parameter {k!r}; mergekit ignores it, and so does surgery",
                        f"remove it ({method}'s parameters: {', '.join(sorted(known)) or 'none'})",
                        code="unused-parameter",
                    )
                )
        return {k: x for k, x in v.items() if k in known}

    top = params(data.get("parameters"), ("parameters",))
    base = name(data["base_model"], ("base_model",)) if data.get("base_model") else None
    steps: list[dict] = []
    if models is not None:
        if not isinstance(models, list) or not models:
            raise PlanError("`models` must be a non-empty list", where=at(("models",)))
        items = []
        for i, m in enumerate(models):
            if not isinstance(m, dict) or "model" not in m:
                raise PlanError("each entry of `models` is {model: ..., parameters: ...}", where=at(("models", i)))
            items.append(
                Input(name(m["model"], ("models", i, "model")), params(m.get("parameters"), ("models", i, "parameters")), ("models", i))
            )
        slice_defs = [(items, {}, base, ("models",))]
    else:
        if not isinstance(slices, list) or not slices:
            raise PlanError("`slices` must be a non-empty list", where=at(("slices",)))
        slice_defs = []
        for i, sl in enumerate(slices):
            if not isinstance(sl, dict) or "sources" not in sl:
                raise PlanError("each slice is {sources: [...], parameters: ..., base_model: ...}", where=at(("slices", i)))
            srcs = []
            if not isinstance(sl["sources"], list) or not sl["sources"]:
                raise PlanError(
                    f"`sources` must be a non-empty list, got {sl['sources']!r}"[:200],
                    where=at(("slices", i, "sources")),
                    fix="write `sources: [{model: ..., layer_range: [start, end]}]`",
                )
            for j, src in enumerate(sl["sources"]):
                p = ("slices", i, "sources", j)
                if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                    raise PlanError("each source is {model: ..., layer_range: [start, end]}", where=at(p))
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2):
                    raise PlanError(f"layer_range must be [start, end], got {lr!r}", where=at(p + ("layer_range",)))
                srcs.append(Input(name(src["model"], p + ("model",)), params(src.get("parameters"), p + ("parameters",)), p, lr))
            sb = name(sl["base_model"], ("slices", i, "base_model")) if sl.get("base_model") else base
            slice_defs.append((srcs, params(sl.get("parameters"), ("slices", i, "parameters")), sb, ("slices", i)))

    for srcs, slice_params, sbase, spath in slice_defs:
        if method == "passthrough":
            if len(srcs) != 1:
                problems.append(
                    Problem(
                        at(spath),
                        f"passthrough takes exactly one source per slice, got {len(srcs)}",
                        "split the slice, or use a merge method",
                    )
                )
                continue
            src = srcs[0]
            step: dict[str, Any] = {"model": src.model}
            if src.layers is not None:
                step["layers"] = src.layers
            scale = to_mergekit(src.params.get("scale"), slice_params.get("scale"), top.get("scale"))
            if scale is not None:
                step["scale"] = scale
            steps.append({"take": step})
            lines[("steps", len(steps) - 1)] = line(spath)
            lines[("steps", len(steps) - 1, "take", "layers")] = line(src.path + ("layer_range",))
            continue
        mitems = []
        for src in srcs:
            item: dict[str, Any] = {"model": src.model}
            if src.layers is not None:
                item["layers"] = src.layers
            given = {k: to_mergekit(v) for k, v in src.params.items()}
            if given:
                item["parameters"] = given
            mitems.append(item)
        shared = {k: to_mergekit(slice_params.get(k), top.get(k)) for k in set(slice_params) | set(top)}
        step = {"method": method, "models": mitems}
        if sbase is not None:
            step["base"] = sbase
        if shared:
            step["parameters"] = shared
        steps.append({"merge": step})
        k = len(steps) - 1
        lines[("steps", k)] = line(spath)
        for j, src in enumerate(srcs):
            lines[("steps", k, "merge", "models", j)] = line(src.path)
            lines[("steps", k, "merge", "models", j, "layers")] = line(src.path + ("layer_range",))
    if problems:
        raise PlanError(problems)

    plan: dict[str, Any] = {
        "models": {n: ({"path": p, "revision": revisions[n]} if revisions.get(n) else p) for n, p in names.items()},
        "steps": steps,
        "post_from": "last",  # mergekit: final norm and lm_head come from the last slice
    }
    if data.get("name"):
        plan["name"] = data["name"]
    if data.get("chat_template"):
        plan["chat_template"] = data["chat_template"]
    if data.get("dtype"):
        plan["input_dtype"] = data["dtype"]
    out_dtype = data.get("out_dtype") or data.get("dtype")
    if out_dtype:
        plan["output"] = {"dtype": out_dtype}
    ts = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if block is not None:
        if ts is not None:
            raise PlanError("give the tokenizer once: `tokenizer_source:` or the `tokenizer:` block", where=at(("tokenizer",)))
        if not isinstance(block, dict) or not set(block) <= {"source", "tokens", "pad_to_multiple_of"}:
            raise PlanError(
                "the `tokenizer:` block is {source, tokens, pad_to_multiple_of}",
                where=at(("tokenizer",)),
                fix="see mergekit's docs/tokenizer (TokenizerConfig)",
            )
        ts = block.get("source", "union")
        opts: dict[str, Any] = {}
        if block.get("pad_to_multiple_of") is not None:
            opts["pad_to_multiple_of"] = block["pad_to_multiple_of"]
        tokens = block.get("tokens") or {}
        if not isinstance(tokens, dict):
            raise PlanError("`tokens` is a mapping of token: {source, force}", where=at(("tokenizer", "tokens")))
        opts["tokens"] = {}
        for tok, setting in tokens.items():
            p = ("tokenizer", "tokens", tok)
            if not isinstance(setting, dict):
                raise PlanError("a token's setting is {source: ..., force: true|false}", where=at(p))
            setting = dict(setting)
            src = setting.get("source")
            if isinstance(src, dict) and src.get("kind") == "model_token" and "model" in src:
                setting["source"] = {**src, "model": name(src["model"], p + ("source", "model"))}
            elif src is not None and not isinstance(src, dict):
                setting["source"] = name(src, p + ("source",))
            opts["tokens"][str(tok)] = setting
        plan_opts = opts
    else:
        plan_opts = None
    if ts is not None:
        plan["tokenizer"] = "union" if ts == "union" else base if ts == "base" else name(ts, ("tokenizer_source",))
        if plan["tokenizer"] is None:
            raise PlanError("tokenizer_source: base needs a base_model", where=at(("tokenizer_source",)))
        plan["models"] = {n: ({"path": p, "revision": revisions[n]} if revisions.get(n) else p) for n, p in names.items()}
    if plan_opts is not None:
        plan["tokenizer_options"] = plan_opts
        lines[("tokenizer_options",)] = line(("tokenizer",))
        for tok in plan_opts.get("tokens", {}):
            lines[("tokenizer_options", "tokens", tok)] = line(("tokenizer", "tokens", tok))
    # every path of the translated plan points at the config's lines
    for key in ("models", "input_dtype", "output", "tokenizer", "name", "chat_template"):
        lines[(key,)] = line(
            (
                {
                    "input_dtype": "dtype",
                    "output": "out_dtype" if data.get("out_dtype") else "dtype",
                    "tokenizer": "tokenizer" if block is not None else "tokenizer_source",
                }.get(key, key),
            )
        )
    for n in names:
        lines[("models", n)] = lines[("models",)]
    return Located(plan, doc.source, lines, notes=list(doc.notes))


MOE_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
MOE_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
MOE_GATES = {
    "cheap_embed": "cheap_embed",
    "random": "random",
    "uniform_random": "random",
    "hidden": "hidden",
    "hidden_last": "hidden",
    "hidden_avg": "hidden_avg",
}


# mergekit-moe's output for a base model's type (its first architecture that takes the config)
MOE_OUTPUTS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen", "qwen3": "qwen3"}


def _local_model_type(path: str, base_dir: Path) -> str | None:
    """The model_type of a local model folder's config.json (None for a hub id or an unreadable one:
    the plan's compile checks the family then)."""
    from surgery.errors import SurgeryError
    from surgery.io.paths import resolve_path
    from surgery.jsonio import read_json

    try:
        f = resolve_path(path, base_dir) / "config.json"  # relative to the config file, as models are
        if not f.is_file():
            return None
        cfg = read_json(f)
    except (SurgeryError, OSError, ValueError, RecursionError):
        return None  # a hostile or broken config: the plan's compile reports it, located
    t = cfg.get("model_type") if isinstance(cfg, dict) else None
    return t if isinstance(t, str) else None


def _moe_output_problems(data: dict, at, model_type: str | None) -> list[Problem]:
    """What mergekit-moe would write that surgery does not: DeepSeek outputs (remote code), more than
    one shared expert, Qwen2-MoE from Llama/Mistral models, an `architecture` the base model cannot make."""
    arch = data.get("architecture")
    shared = data.get("shared_experts") or []
    out = arch
    if out is None and model_type in ("llama", "mistral") and shared:  # Mixtral takes no shared expert
        gated = isinstance(shared[0], dict) and shared[0].get("positive_prompts")
        out = "qwen" if gated else "deepseek"  # mergekit-moe's DeepSeek output takes no gated one
    out = out or MOE_OUTPUTS.get(model_type or "")
    key = ("architecture",) if arch else ("shared_experts",) if shared else ("base_model",)
    if out == "deepseek":
        return [
            Problem(
                at(key),
                "mergekit-moe writes this as a DeepSeek MoE (model_type 'deepseek'), which transformers loads only with "
                "remote code (deepseek-ai's modeling file); surgery writes no model that needs remote code",
                "drop shared_experts for a Mixtral output, or upcycle Qwen2 models (Qwen2-MoE has a shared expert)",
            )
        ]
    if out is not None and out not in ("mixtral", "qwen", "qwen3"):
        return [Problem(at(key), f"architecture {out!r} is not one of mergekit-moe's outputs", "mixtral, qwen or qwen3")]
    if model_type in MOE_OUTPUTS and out != MOE_OUTPUTS[model_type]:
        what = "a Qwen2-MoE with zero attention biases" if out == "qwen" else f"a {out} MoE"
        return [
            Problem(
                at(key),
                f"mergekit-moe would write {what} from this {model_type} base model; surgery upcycles {model_type} models "
                f"into {MOE_OUTPUTS[model_type]} only",
                f"architecture: {MOE_OUTPUTS[model_type]} (drop shared_experts), or take Qwen2 models for a Qwen2-MoE",
            )
        ]
    if len(shared) > 1:
        return [Problem(at(("shared_experts",)), f"{len(shared)} shared experts: mergekit-moe's outputs hold at most one", "keep one")]
    if shared and out in ("mixtral", "qwen3"):
        return [Problem(at(("shared_experts",)), f"a {out} MoE has no shared expert", "drop shared_experts, or upcycle Qwen2 models")]
    return []


def is_mergekit_moe(data: Any) -> bool:
    """A mergekit-moe config: `base_model` and a list of `experts` (and no merge_method)."""
    return isinstance(data, dict) and "merge_method" not in data and "base_model" in data and isinstance(data.get("experts"), list)


def translate_moe(doc: Located) -> Located:
    """A mergekit-moe config -> the surgery plan that builds the same MoE: the base model's layers,
    then `upcycle` with one expert per entry (its model's MLP, prompts, residual_scale), top-k from
    experts_per_token and the router from gate_mode. What mergekit-moe does that surgery does not is
    a located error (DeepSeek outputs, which need remote code; Qwen2-MoE from Llama models)."""
    data, at = doc.data, doc.where
    unknown = sorted(set(data) - MOE_KEYS)
    if unknown:
        raise PlanError(
            f"unknown mergekit-moe key {unknown[0]!r}",
            where=at((unknown[0],)),
            fix=f"mergekit-moe 0.1.5 keys: {', '.join(sorted(MOE_KEYS))}",
        )
    problems: list[Problem] = []
    kinds = {"experts": (list, "a list of experts"), "shared_experts": (list, "a list of (at most one) experts")}
    kinds.update({k: (str, "a name") for k in ("gate_mode", "dtype", "architecture")})
    kinds["experts_per_token"] = (int, "a whole number of experts")
    for key, (kind, what) in kinds.items():
        v = data.get(key)
        if v is not None and (not isinstance(v, kind) or isinstance(v, bool)):
            problems.append(Problem(at((key,)), f"{key} is {what}, got {type(v).__name__} {str(v)[:40]!r}"))
        elif kind is list and v is not None and not all(isinstance(e, dict) for e in v):
            problems.append(Problem(at((key,)), f"each of {key} is a mapping: {{source_model, positive_prompts, ...}}"))
    if problems:
        raise PlanError(problems)
    gate = data.get("gate_mode", "hidden")
    if gate not in MOE_GATES:
        problems.append(
            Problem(
                at(("gate_mode",)),
                f"gate_mode {gate!r} is not one of mergekit-moe's",
                f"one of: {', '.join(MOE_GATES)}",
            )
        )
    base_path, _ = _ref(data["base_model"], at(("base_model",)))
    model_type = _local_model_type(base_path, Path(doc.source).parent)
    problems += _moe_output_problems(data, at, model_type)
    if model_type == "qwen2" and not data.get("shared_experts"):
        doc.notes.append(
            Problem(
                at(("base_model",)),
                "mergekit-moe refuses a Qwen MoE without a shared expert; surgery makes the dense MLP the shared expert "
                "(gate zero, routed experts' down projections halved)",
                "give shared_experts: [{source_model, positive_prompts}] for mergekit-moe's Qwen MoE",
                code="dense-shared-expert",
            )
        )
    names: dict[str, str] = {"base": base_path}

    def expert(e: Any, p: tuple) -> dict:
        if not isinstance(e, dict) or "source_model" not in e:
            raise PlanError("each expert is {source_model, positive_prompts, negative_prompts, ...}", where=at(p))
        bad = sorted(set(e) - MOE_EXPERT_KEYS)
        if bad:
            raise PlanError(
                f"unknown expert key {bad[0]!r}", where=at(p + (bad[0],)), fix=f"expert keys: {', '.join(sorted(MOE_EXPERT_KEYS))}"
            )
        if e.get("noise_scale"):
            doc.notes.append(
                Problem(
                    at(p + ("noise_scale",)),
                    "mergekit-moe draws this noise unseeded (every run differs); surgery draws it from the step's seed (0)",
                    "no change needed: the noise has the same scale, and surgery's is reproducible",
                    code="seeded-noise",
                )
            )
        path, _ = _ref(e["source_model"], at(p + ("source_model",)))
        n = next((k for k, v in names.items() if v == path), None) or _name_for(path, names)
        names[n] = path
        entry: dict[str, Any] = {"model": n}
        for key in ("positive_prompts", "negative_prompts", "residual_scale", "noise_scale"):
            if e.get(key) is not None:
                entry[key] = e[key]
        return entry

    experts = [expert(e, ("experts", i)) for i, e in enumerate(data["experts"])]
    shared = [expert(e, ("shared_experts", i)) for i, e in enumerate(data.get("shared_experts") or [])]
    if problems:
        raise PlanError(problems)
    step: dict[str, Any] = {"experts": experts, "top_k": data.get("experts_per_token", 2), "router": MOE_GATES[gate]}
    if shared:
        step["shared"] = shared[0]
        if gate not in ("random", "uniform_random") and not shared[0].get("positive_prompts"):
            doc.notes.append(
                Problem(
                    at(("shared_experts", 0)),
                    "mergekit-moe refuses a Qwen MoE whose shared expert has no prompts; surgery starts its gate at zero "
                    "(sigmoid(0) = 1/2: the shared expert always half on)",
                    "give the shared expert positive_prompts to set its gate from them",
                    code="ungated-shared-expert",
                )
            )
    if gate == "random":
        step["std"] = 1.0  # mergekit-moe: torch.randn
    elif gate == "uniform_random":
        h_note = "uniform_random is drawn as a seeded normal with the variance of mergekit-moe's U(-a, a), a = sqrt(1/hidden)"
        doc.notes.append(
            Problem(at(("gate_mode",)), h_note, "use gate_mode: random or cheap_embed for an exact equivalent", code="approximate-gate")
        )
        step["std"] = None  # set from the hidden size when compiled: 1 / sqrt(3 hidden)
        step["router"] = "uniform_random"
    plan: dict[str, Any] = {"models": dict(names), "steps": [{"take": {"model": "base"}}, {"upcycle": step}]}
    if data.get("dtype"):
        plan["output"] = {"dtype": data["dtype"]}
    lines: dict[tuple, int] = {}

    def line(path: tuple) -> int:
        return doc.lines.get(path) or doc.lines.get(path[:-1]) or doc.lines.get(()) or 1

    lines[("models",)] = line(("base_model",))
    for n in names:
        lines[("models", n)] = line(("base_model",))
    lines[("steps",)] = lines[("steps", 0)] = lines[("steps", 0, "take")] = line(("base_model",))
    lines[("steps", 1)] = lines[("steps", 1, "upcycle")] = line(("experts",))
    for key, src in (("top_k", "experts_per_token"), ("router", "gate_mode"), ("std", "gate_mode")):
        lines[("steps", 1, "upcycle", key)] = line((src,))
    for i in range(len(experts)):
        lines[("steps", 1, "upcycle", "experts", i)] = line(("experts", i))
        for key in ("model", "positive_prompts", "negative_prompts", "residual_scale", "noise_scale"):
            src = "source_model" if key == "model" else key
            lines[("steps", 1, "upcycle", "experts", i, key)] = line(("experts", i, src))
    if shared:
        lines[("steps", 1, "upcycle", "shared")] = line(("shared_experts", 0))
        for key in ("model", "positive_prompts", "negative_prompts", "residual_scale", "noise_scale"):
            src = "source_model" if key == "model" else key
            lines[("steps", 1, "upcycle", "shared", key)] = line(("shared_experts", 0, src))
    lines[("output",)] = line(("dtype",))
    return Located(plan, doc.source, lines, notes=list(doc.notes))
