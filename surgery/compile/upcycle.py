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
from surgery.errors import PlanError, Problem
from surgery.recipes import RandomNormal, Scale, Zeros


def upcycle_tensors(tensors: list, stack: list, family: Family, out_code: str) -> list:
    """The output tensors with each upcycled layer's dense MLP replaced by experts, router (and shared expert)."""
    from surgery.compile.tensors import OutTensor

    spec = family.upcycle
    by_name = {t.name: t for t in tensors}
    replaced: dict[str, list] = {}  # the dense down projection's name -> the tensors that take the MLP's place
    drop: set[str] = set()
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
        for e in range(u.experts):
            for k in ("gate", "up", "down"):
                r = recipe[k]
                if k == "down" and shared:
                    r = Scale(r, 0.5)  # the shared expert's gate starts at sigmoid(0) = 1/2: the two halves sum to the MLP
                out.append(OutTensor(family.layer_name(j, spec["experts"][k].format(e=e)), r))
        router = family.layer_name(j, spec["router"])
        if u.router == "random":
            std = u.std if u.std is not None else 0.02
            r = RandomNormal((u.experts, hidden), out_code, std, u.seed, router)
        else:
            r = Zeros((u.experts, hidden), out_code)
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


def upcycle_config(config: dict, stack: list, family: Family, changes: list) -> None:
    """config.json rewritten for the MoE (in place): its model_type and architectures, the experts
    and top-k, the expert size, the dense layers left (Qwen-MoE's mlp_only_layers)."""
    ups = [x.upcycle for x in stack if x.upcycle is not None]
    if not ups:
        return
    u, spec = ups[0], family.upcycle
    lm = family.lm_config(config)
    inter = lm.get(family.intermediate_key)
    values = {"experts": u.experts, "top_k": u.top_k, "intermediate": inter, "router_aux_loss_coef": u.router_aux_loss_coef}
    before = lm.get("model_type")
    lm["model_type"] = spec["model_type"]
    if "architectures" in spec:
        config["architectures"] = list(spec["architectures"])
    changes.append(f"model_type: {before} -> {spec['model_type']} (upcycled: {u.experts} experts, top-{u.top_k}, {u.router} router)")
    for key, v in (spec.get("config") or {}).items():
        lm[key] = values.get(v, v) if isinstance(v, str) else v
    if spec.get("one_window") and "sliding_attention" not in (lm.get("layer_types") or ()) and not lm.get("use_sliding_window"):
        lm["sliding_window"] = None  # the MoE would apply any window it is given to every layer
    if spec.get("dense_layers_key"):
        lm[spec["dense_layers_key"]] = [j for j, x in enumerate(stack) if x.upcycle is None]
