"""What trains: `trainable` (all, new-layers, new-params, name patterns) resolved to parameter names
against the model and its surgery.json, and everything else frozen."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from surgery.errors import PlanError


def select_trainable(model, spec, model_dir: Path, where: str, allow_dead: bool = False) -> tuple[set[str], list[str]]:
    """Names (every alias, so tied weights count once) of the parameters that train, and notes."""
    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    notes = []
    if spec == "all":
        return {n for names in aliases.values() for n in names}, notes
    exact = False
    if spec in ("new-layers", "new-params"):
        from surgery.io.provenance import read_provenance

        prov = read_provenance(model_dir)
        if prov is None:
            what = "the layer map" if spec == "new-layers" else "the widened tensors"
            raise PlanError(
                f"trainable: {spec} reads {what} from surgery.json, and {model_dir} has none",
                where=where,
                fix="train a `surgery apply` output, or name parameters with patterns",
            )
    if spec == "new-layers":
        new = prov.new_layers
        if not new:
            raise PlanError(
                f"{model_dir / 'surgery.json'}: the plan added no new layers (copies and merges only), so nothing would train",
                where=where,
                fix="use trainable: all, or patterns",
            )
        dead = prov.zero_layers
        if dead and not allow_dead:
            raise PlanError(
                f"{model_dir / 'surgery.json'}: new layers {dead[:8]} were made all zero (`init: zero`): no gradient reaches "
                "their weights, so `trainable: new-layers` would train nothing",
                where=where,
                fix="regrow with `init: identity` (the paper's G_zero) or `init: random`; or set `allow_dead: true` to train anyway",
            )
        from surgery.io.checkpoint import open_checkpoint

        prefix = open_checkpoint("model", str(model_dir), model_dir).family.layer_prefix
        patterns = [f"{prefix}{i}.*" for i in new]
        notes.append(f"new layers {new} (from surgery.json)")
    elif spec == "new-params":
        # a widened matrix holds old and new units side by side; requires_grad freezes whole tensors,
        # so `new-params` trains every tensor that grew (old units in it too) and freezes the rest
        if prov.widened is None:
            raise PlanError(
                f"trainable: new-params reads the widened tensors from surgery.json; {model_dir} has none (no `widen` step)",
                where=where,
                fix="train a `surgery apply` output of a plan with `widen`, or use all / patterns",
            )
        patterns, exact = list(prov.widened.tensors), True
        notes.append(f"{len(patterns)} widened tensors train (whole tensors: their old units too)")
    else:
        patterns = [spec] if isinstance(spec, str) else list(spec)
        parts = moe_parts(model) if any(x in ("routers", "experts") for x in patterns) else {}
        for kw in ("routers", "experts"):
            if kw in patterns:
                if not parts.get(kw):
                    raise PlanError(
                        f"trainable: {kw} names a mixture of experts' {kw}, and this model has none (no MoE layer)",
                        where=where,
                        fix="upcycle it first (`upcycle` step), or name parameters with patterns",
                    )
                patterns.remove(kw)
                patterns += sorted(parts[kw])
                notes.append(f"{len(parts[kw])} {kw} tensors train")
    chosen = set()
    wanted = set(patterns) if exact else None  # tensor names from surgery.json are names, never patterns
    for names in aliases.values():
        if any((n in wanted) if exact else fnmatchcase(n, pat) for n in names for pat in patterns):
            chosen.update(names)
    if not chosen:
        some = ", ".join(list(n for names in aliases.values() for n in names)[:6])
        raise PlanError(f"trainable patterns {patterns} match no parameter", where=where, fix=f"parameter names look like: {some}, ...")
    return chosen, notes


def moe_parts(model) -> dict[str, set[str]]:
    """The parameter names of every MoE block's routers (its `gate` and a shared expert's gate) and of
    its experts (routed and shared), found by the block's shape in transformers' MoE models (a
    module with `experts`), so every layout (per-expert or fused tensors) is covered."""
    import torch

    out: dict[str, set[str]] = {"routers": set(), "experts": set()}
    for name, mod in model.named_modules():
        if not isinstance(getattr(mod, "experts", None), torch.nn.Module):
            continue
        for pn, _ in mod.named_parameters(remove_duplicate=False):
            full = f"{name}.{pn}" if name else pn
            if pn.startswith(("gate.", "shared_expert_gate.")):
                out["routers"].add(full)
            elif pn.startswith(("experts.", "shared_expert.", "shared_experts.")):
                out["experts"].add(full)
    return out


def apply_freezing(model, trainable: set[str], freeze_embeddings: bool, where: str) -> tuple[int, int]:
    if freeze_embeddings:
        emb = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        emb_ids = {id(p) for p in emb}
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if n in trainable and id(p) not in emb_ids}
    n_train = n_all = 0
    for n, p in model.named_parameters():  # deduplicated: a tied weight is one parameter
        on = n in trainable
        p.requires_grad_(on)
        n_all += p.numel()
        n_train += p.numel() if on else 0
    if n_train == 0:
        raise PlanError("nothing trains: every parameter is frozen", where=where, fix="check `trainable` and `freeze_embeddings`")
    return n_train, n_all
