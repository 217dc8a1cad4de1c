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
    chosen = set()
    wanted = set(patterns) if exact else None  # tensor names from surgery.json are names, never patterns
    for names in aliases.values():
        if any((n in wanted) if exact else fnmatchcase(n, pat) for n in names for pat in patterns):
            chosen.update(names)
    if not chosen:
        some = ", ".join(list(n for names in aliases.values() for n in names)[:6])
        raise PlanError(f"trainable patterns {patterns} match no parameter", where=where, fix=f"parameter names look like: {some}, ...")
    return chosen, notes


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
