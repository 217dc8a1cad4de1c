"""Sparse upcycling (`upcycle`; Komatsuzaki et al., ICLR 2023): each chosen layer's dense MLP becomes
E experts behind a router, in the MoE layout the family's data names (`upcycle` in its architecture
entry). The experts are the dense MLP's tensors read again (raw copies, streamed like any copy);
the router is zero (every expert equally likely: with identical experts and renormalised top-k
weights the layer computes the dense MLP exactly) or seeded N(0, std). Where the MoE has a shared
expert beside the routed ones (Qwen2-MoE: out = sum_k w_k E_k(x) + sigmoid(g x) S(x)), the shared
expert is the dense MLP, its gate g zero (sigmoid(0) = 1/2) and the routed experts' down projections
halved, so the sum is the dense MLP again."""

from __future__ import annotations

from surgery.arch import Family
from surgery.compile.tensors import OutTensor, _cast, _read
from surgery.errors import PlanError, Problem
from surgery.recipes import HiddenRouter, PromptRouter, RandomNormal, Scale, Zeros


def upcycle_tensors(tensors: list, stack: list, family: Family, out_code: str, ckpts: dict, base, in_dt: str | None = None) -> list:
    """The output tensors with each upcycled layer's dense MLP replaced by experts, router (and shared expert)."""
    spec = family.upcycle
    by_name = {t.name: t for t in tensors}
    replaced: dict[str, list] = {}  # the dense down projection's name -> the tensors that take the MLP's place
    drop: set[str] = set()
    routers: dict = {}  # one prompt router for every layer (cheap_embed is the same in each)
    for j, layer in enumerate(stack):
        u = layer.upcycle
        if u is None:
            continue
        dense = {k: family.layer_name(j, v) for k, v in spec["dense"].items()}
        missing = [n for n in dense.values() if n not in by_name]
        if missing:
            raise PlanError(
                Problem(
                    layer.upcycle_where,
                    f"layer {j} has no {missing[0]}: upcycling needs the dense MLP's gate, up and down projections",
                )
            )
        recipe = {k: by_name[n].recipe for k, n in dense.items()}
        hidden = recipe["down"].shape[0]
        shared = spec.get("shared")
        out = []
        for e in range(u.count):
            parts = _expert(u, e, recipe, spec, layer, ckpts, out_code, in_dt)
            for k in ("gate", "up", "down"):
                r = parts[k]
                if k == "down" and shared:
                    r = Scale(r, 0.5)  # the shared expert's gate starts at sigmoid(0) = 1/2: the two halves sum to the MLP
                out.append(OutTensor(family.layer_name(j, spec["experts"][k].format(e=e)), r))
        router = family.layer_name(j, spec["router"])
        if u.router in ("random", "uniform_random"):
            # uniform_random (mergekit-moe's): nn.Linear's U(-a, a), a = sqrt(1/hidden), here a normal of its variance a^2 / 3
            std = u.std if u.std is not None else (0.02 if u.router == "random" else (1.0 / (3.0 * hidden)) ** 0.5)
            r = RandomNormal((u.count, hidden), out_code, std, u.seed, router)
        elif u.router == "cheap_embed":
            if u not in routers:
                embedding = _read(ckpts, base.name, family.embeddings[0], in_dt)
                routers[u] = _cast(PromptRouter(embedding, _prompt_batches(u, base, layer.upcycle_where)), out_code)
            r = routers[u]
        elif u.router in ("hidden", "hidden_avg"):
            if u not in routers:
                routers[u] = _prompt_batches(u, base, layer.upcycle_where)
            r = HiddenRouter(str(base.path), layer.sources[0][1], routers[u], u.router == "hidden_avg", hidden, out_code)
        else:
            r = Zeros((u.count, hidden), out_code)
        out.append(OutTensor(router, r))
        if shared:
            for k in ("gate", "up", "down"):
                out.append(OutTensor(family.layer_name(j, shared[k]), recipe[k]))
            out.append(OutTensor(family.layer_name(j, shared["router"]), Zeros((1, hidden), out_code)))
        replaced[dense["down"]] = out
        drop.update(dense.values())
    result = []
    for t in tensors:
        if t.name in replaced:
            result += replaced[t.name]
        elif t.name not in drop:
            result.append(t)
    return result


def _expert(u, e: int, recipe: dict, spec: dict, layer, ckpts, out_code, in_dt) -> dict:
    """Expert e's gate, up and down projections: the layer's own (copies), or those of the same layer
    of expert e's model, of the same shapes (FrankenMoE), its down projection times residual_scale."""
    if not u.sources:
        return recipe
    src = u.sources[e]
    li = layer.sources[0][1]
    ck = ckpts[src.model]
    out = {}
    for k, suffix in spec["dense"].items():
        name = ck.layers[li].get(suffix) if li < len(ck.layers) else None
        if name is None:
            raise PlanError(Problem(layer.upcycle_where, f"expert {e}'s model {src.model!r} has no layer {li} tensor {suffix!r}"))
        r = _cast(_read(ckpts, src.model, name, in_dt), out_code)
        if tuple(r.shape) != tuple(recipe[k].shape):
            raise PlanError(
                Problem(
                    layer.upcycle_where,
                    f"expert {e}'s model {src.model!r} has {suffix} of shape {list(r.shape)}, the base model's is "
                    f"{list(recipe[k].shape)}: experts must have the shape of the MLP they replace",
                    "take experts from models of the base model's size",
                )
            )
        if k == "down" and src.residual_scale is not None:
            r = Scale(r, src.residual_scale)
        out[k] = r
    return out


def _prompt_batches(u, base, where: str) -> tuple:
    """Each expert's positive and negative prompts as mergekit-moe batches them for its prompt gates
    (the BOS text prepended, no other special tokens, padded on the left): ((ids, mask), (ids, mask) or ())."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - the models extra
        raise PlanError(Problem(where, f"router: {u.router} tokenizes prompts, which needs transformers", "pip install 'surgery[models]'"))
    tok = transformers.AutoTokenizer.from_pretrained(base.path, trust_remote_code=False)
    tok.padding_side = "left"  # as mergekit-moe batches them
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    bos = tok.bos_token or ""

    def batch(prompts):
        if not prompts:
            return ()
        enc = tok([bos + p for p in prompts], padding=True, add_special_tokens=False)
        return (tuple(map(tuple, enc["input_ids"])), tuple(map(tuple, enc["attention_mask"])))

    return tuple((batch(e.positive_prompts), batch(e.negative_prompts)) for e in u.sources)


def upcycle_config(config: dict, stack: list, family: Family, changes: list) -> None:
    """config.json rewritten for the MoE (in place): its model_type and architectures, the experts
    and top-k, the expert size, the dense layers left (Qwen-MoE's mlp_only_layers)."""
    ups = [x.upcycle for x in stack if x.upcycle is not None]
    if not ups:
        return
    u, spec = ups[0], family.upcycle
    lm = family.lm_config(config)
    inter = lm.get(family.intermediate_key)
    values = {"experts": u.count, "top_k": u.top_k, "intermediate": inter, "router_aux_loss_coef": u.router_aux_loss_coef}
    before = lm.get("model_type")
    lm["model_type"] = spec["model_type"]
    if "architectures" in spec:
        config["architectures"] = list(spec["architectures"])
    changes.append(f"model_type: {before} -> {spec['model_type']} (upcycled: {u.count} experts, top-{u.top_k}, {u.router} router)")
    for key, v in (spec.get("config") or {}).items():
        lm[key] = values.get(v, v) if isinstance(v, str) else v
    if spec.get("one_window") and "sliding_attention" not in (lm.get("layer_types") or ()) and not lm.get("use_sliding_window"):
        lm["sliding_window"] = None  # the MoE would apply any window it is given to every layer
    if spec.get("dense_layers_key"):
        lm[spec["dense_layers_key"]] = [j for j, x in enumerate(stack) if x.upcycle is None]
