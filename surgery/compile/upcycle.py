"""Sparse upcycling (`upcycle`; Komatsuzaki et al., ICLR 2023): each chosen layer's dense MLP becomes
E experts behind a router, in the MoE layout the family's data names (`upcycle` in its architecture
entry). The experts are the dense MLP's tensors read again (raw copies, streamed like any copy) or
other models' MLPs (FrankenMoE), optionally with seeded noise N(0, noise) added and a residual
scale on the down projection (noise first, mergekit-moe's order); the router is zero (every expert
equally likely: with identical experts and renormalised top-k weights the layer computes the dense
MLP exactly), seeded N(0, std), or set from prompts (token embeddings, or the base model's hidden
states). Where the MoE has a shared expert beside the routed ones (Qwen2-MoE: out = sum_k w_k E_k(x)
+ sigmoid(g x) S(x)), it is by default the dense MLP, its gate g zero (sigmoid(0) = 1/2) and the
routed experts' down projections halved, so the sum is the dense MLP again; a `shared:` expert is
taken as given instead (mergekit-moe's Qwen MoE), its gate from its prompts."""

from __future__ import annotations

from surgery.arch import Family
from surgery.compile.tensors import OutTensor, _cast, _read
from surgery.errors import PlanError, Problem
from surgery.recipes import HiddenRouter, Linear, PromptRouter, RandomNormal, Scale, Zeros


def upcycle_tensors(tensors: list, stack: list, family: Family, out_code: str, ckpts: dict, base, in_dt: str | None = None) -> list:
    """The output tensors with each upcycled layer's dense MLP replaced by experts, router (and shared expert)."""
    spec = family.upcycle
    by_name = {t.name: t for t in tensors}
    replaced: dict[str, list] = {}  # the dense down projection's name -> the tensors that take the MLP's place
    drop: set[str] = set()
    prompts: dict = {}  # the prompt batches, tokenized once for every layer
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
        # the dense MLP as the shared expert, its gate at sigmoid(0) = 1/2: the routed halves and it sum to the MLP
        halve = bool(shared) and u.shared is None
        if u.router in ("cheap_embed", "hidden", "hidden_avg") and u not in prompts:
            gated = list(u.sources) + ([u.shared] if u.shared is not None and u.shared.positive_prompts else [])
            prompts[u] = _prompt_batches(u, gated, base, layer.upcycle_where)
        out = []
        for e in range(u.count):
            names = {k: family.layer_name(j, spec["experts"][k].format(e=e)) for k in ("gate", "up", "down")}
            parts = _mlp(u, u.sources[e] if u.sources else None, f"expert {e}", names, recipe, spec, layer, ckpts, out_code, in_dt)
            out += [OutTensor(names[k], Scale(parts[k], 0.5) if k == "down" and halve else parts[k]) for k in names]
        gate = _Gate(u, family, j, layer, ckpts, base, hidden, out_code, in_dt, prompts.get(u))
        out.append(OutTensor(family.layer_name(j, spec["router"]), gate.routers()))
        if shared:
            names = {k: family.layer_name(j, shared[k]) for k in ("gate", "up", "down")}
            parts = recipe
            if u.shared is not None:
                parts = _mlp(u, u.shared, "the shared expert", names, recipe, spec, layer, ckpts, out_code, in_dt)
            out += [OutTensor(names[k], parts[k]) for k in names]
            name = family.layer_name(j, shared["router"])
            out.append(OutTensor(name, gate.shared(name)))
        replaced[dense["down"]] = out
        drop.update(dense.values())
    result = []
    for t in tensors:
        if t.name in replaced:
            result += replaced[t.name]
        elif t.name not in drop:
            result.append(t)
    return result


class _Gate:
    """One layer's router (and shared-expert gate) as the step's `router` makes them."""

    def __init__(self, u, family, j, layer, ckpts, base, hidden, out_code, in_dt, batches):
        self.u, self.layer, self.ckpts, self.base = u, layer, ckpts, base
        self.hidden, self.out_code, self.in_dt, self.batches = hidden, out_code, in_dt, batches
        self.name = family.layer_name(j, family.upcycle["router"])
        self.embeddings = family.embeddings[0]

    def _std(self) -> float:
        u = self.u
        # uniform_random (mergekit-moe's): nn.Linear's U(-a, a), a = sqrt(1/hidden), here a normal of its variance a^2 / 3
        return u.std if u.std is not None else (0.02 if u.router == "random" else (1.0 / (3.0 * self.hidden)) ** 0.5)

    def _from_prompts(self, rows: tuple[int, int]):
        u = self.u
        # every layer's router and the shared gate are rows of one prompt set, which the engine computes once per run
        if u.router == "cheap_embed":
            embedding = _read(self.ckpts, self.base.name, self.embeddings, self.in_dt)
            return _cast(PromptRouter(embedding, self.batches, rows), self.out_code)
        layer = self.layer.sources[0][1]
        return HiddenRouter(str(self.base.path), layer, self.batches, u.router == "hidden_avg", self.hidden, self.out_code, rows)

    def routers(self):
        u = self.u
        if u.router in ("random", "uniform_random"):
            return RandomNormal((u.count, self.hidden), self.out_code, self._std(), u.seed, self.name)
        if u.router in ("cheap_embed", "hidden", "hidden_avg"):
            return self._from_prompts((0, u.count))
        return Zeros((u.count, self.hidden), self.out_code)

    def shared(self, name: str):
        """The shared expert's gate: zero (sigmoid(0) = 1/2) unless a `shared` expert's prompts or a random router set it."""
        u = self.u
        if u.shared is None:
            return Zeros((1, self.hidden), self.out_code)
        if u.router in ("random", "uniform_random"):
            return RandomNormal((1, self.hidden), self.out_code, self._std(), u.seed, name)
        if u.router in ("cheap_embed", "hidden", "hidden_avg") and u.shared.positive_prompts:
            return self._from_prompts((u.count, u.count + 1))
        return Zeros((1, self.hidden), self.out_code)


def _mlp(u, src, what: str, names: dict, recipe: dict, spec: dict, layer, ckpts, out_code, in_dt) -> dict:
    """An expert's gate, up and down projections: the layer's own (copies, src None), or those of
    the same layer of `src`'s model, of the same shapes (FrankenMoE); noise added (seeded by the
    step's seed and the tensor's name), then its down projection times residual_scale (mergekit-moe's order)."""
    noise = src.noise_scale if src is not None and src.noise_scale is not None else u.noise
    if src is None:
        out = dict(recipe)
    else:
        li = layer.sources[0][1]
        ck = ckpts[src.model]
        out = {}
        for k, suffix in spec["dense"].items():
            name = ck.layers[li].get(suffix) if li < len(ck.layers) else None
            if name is None:
                raise PlanError(Problem(layer.upcycle_where, f"{what}'s model {src.model!r} has no layer {li} tensor {suffix!r}"))
            r = _cast(_read(ckpts, src.model, name, in_dt), out_code)
            if tuple(r.shape) != tuple(recipe[k].shape):
                raise PlanError(
                    Problem(
                        layer.upcycle_where,
                        f"{what}'s model {src.model!r} has {suffix} of shape {list(r.shape)}, the base model's is "
                        f"{list(recipe[k].shape)}: experts must have the shape of the MLP they replace",
                        "take experts from models of the base model's size",
                    )
                )
            out[k] = r
    for k, r in out.items():
        if noise:
            out[k] = r = Linear((r, RandomNormal(tuple(r.shape), r.dtype, noise, u.seed, names[k])), (1.0, 1.0), False)
        if k == "down" and src is not None and src.residual_scale is not None:
            out[k] = Scale(r, src.residual_scale)
    return out


def _prompt_batches(u, experts: list, base, where: str) -> tuple:
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

    return tuple((batch(e.positive_prompts), batch(e.negative_prompts)) for e in experts)


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
