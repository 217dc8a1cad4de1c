"""The output config.json: a pure function of the base config, the layer map and the family (layer
counts, per-layer lists from each output layer's own source, layer thresholds, dtype)."""

from __future__ import annotations

import copy

from surgery.arch import Family
from surgery.io.checkpoint import Checkpoint
from surgery.errors import Problem
from surgery.io.safetensors import dtype_name


from surgery.compile.stack import LayerSpec


def output_config(base: Checkpoint, ckpts, stack: list[LayerSpec], family: Family, out_code: str, warnings):
    full = copy.deepcopy(base.config)
    cfg = family.lm_config(full)  # a VLM's text_config: the layer settings live there
    n_old, n_new = base.num_layers, len(stack)
    changes = []
    # where a config note points: the first step that moved a layer (else the first step)
    moved = next((spec for j, spec in enumerate(stack) if spec.sources[0][1] != j or spec.new), stack[0] if stack else None)
    at = moved.where if moved is not None else None

    def note(msg: str, spec: LayerSpec | None = None) -> None:
        warnings.append(Problem((spec.where if spec is not None else at), msg, code="config"))

    for key in {family.num_layers_key} | ({"num_hidden_layers"} & set(cfg)):
        if cfg.get(key) != n_new:
            changes.append(f"{key}: {cfg.get(key)} -> {n_new}")
        cfg[key] = n_new
    declared = set(family.per_layer_config)
    detected = {
        k for k, v in cfg.items() if isinstance(v, list) and len(v) == n_old and k not in declared and k != "architectures" and n_old > 1
    }
    for key in sorted(declared | detected):
        if not isinstance(cfg.get(key), list):
            continue
        if len(cfg[key]) != n_old:
            note(f"config {key} has {len(cfg[key])} entries for {n_old} layers; left as it is")
            continue
        new = []
        for spec in stack:
            m, li = spec.sources[0]
            lst = family.lm_config(ckpts[m].config).get(key)
            new.append(lst[li] if isinstance(lst, list) and len(lst) == ckpts[m].num_layers else cfg[key][min(li, n_old - 1)])
        cfg[key] = new
        changes.append(f"{key}: {n_old} entries -> {n_new}, following the layer map")
        if key in detected:
            note(f"config {key!r} has one entry per layer, so it was remapped with the layers (not declared for family {family.name})")
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
                stray = stack[new_v + below[new_v:].index(True)]
                note(f"config {key}={v}: after surgery the layers below it are no longer a prefix; set to {new_v}", stray)
        if new_v != v:
            changes.append(f"{key}: {v} -> {new_v}")
        cfg[key] = new_v
    w = stack[0].widen if stack else None
    hk, ak, kk, dk = family.hidden_key, family.heads_key, family.kv_heads_key, family.head_dim_key
    if w is not None and w.hidden is not None:
        h_old = cfg.get(hk)
        if isinstance(h_old, int) and w.hidden != h_old:
            head_dim, units = family.head_size(cfg), family.mlp_size(cfg)  # both at the old width
            changes.append(f"{hk}: {h_old} -> {w.hidden} (widen)")
            cfg[hk] = w.hidden
            if dk and head_dim and cfg.get(dk) != head_dim:
                changes.append(f"{dk}: {cfg.get(dk)} -> {head_dim} (kept: the heads keep their size)")
                cfg[dk] = head_dim
            eps = cfg.get("rms_norm_eps")
            if w.init == "zero" and isinstance(eps, (int, float)) and not isinstance(eps, bool):
                # the paper's G_zero: RMS'(x') = RMS(x) sqrt(h_old / new) over the new zero units, exactly when
                # the epsilon under the root scales the same way (per-head q/k norms, which share it, are
                # compensated in the tensors: compile.tensors.per_head_norms)
                cfg["rms_norm_eps"] = eps * h_old / w.hidden
                changes.append(f"rms_norm_eps: {eps} -> {cfg['rms_norm_eps']:.6g} (G_zero: the norms' statistics run over new zero units)")
            ik = family.intermediate_key
            if cfg.get(ik) is None and w.intermediate is None and units is not None:  # GPT-2: n_inner null = 4 x hidden
                cfg[ik] = units
                changes.append(f"{ik}: null -> {cfg[ik]} (written: the MLP keeps its {cfg[ik]} units)")
    from surgery.compile.tensors import head_counts

    counts = head_counts(family, base, w) if w is not None else None
    if counts is not None:
        a, k, a2, k2, d = counts
        pairs = [(ak, a, a2)] + ([(kk, k, k2)] if kk else []) + ([(dk, cfg.get(dk), d)] if dk else [])
        for key, old, new in pairs:
            if cfg.get(key) != new:
                changes.append(f"{key}: {old} -> {new} (widen)")
                cfg[key] = new
    if w is not None and (w.heads is not None or w.kv_heads is not None or w.hidden is not None):
        h, a = cfg.get(hk), cfg.get(ak)
        if isinstance(h, int) and isinstance(a, int) and a and h % a and _transformers_missing():
            warnings.append(
                Problem(
                    stack[0].widen_where,
                    f"hidden_size {h} is not a multiple of num_attention_heads {a}: "
                    "transformers' Llama and Gemma configs refuse to load that (Qwen2/3 and Phi-3 load it)",
                    f"choose heads that divide {h}, or grow hidden too",
                    code="config",
                )
            )
    if w is not None and w.intermediate is not None and family.mlp_in:
        key, new_i = family.intermediate_key, w.intermediate
        primary = cfg.get(key)
        for other, grown in family.mlp_sizes_after(cfg, new_i).items():  # a shared expert, dense layers: the same ratio
            if other != key and grown != cfg.get(other):
                changes.append(f"{other}: {cfg.get(other)} -> {grown} (widen, x{new_i / primary:g} as {key})")
                cfg[other] = grown
        if cfg.get(key) != new_i:
            changes.append(f"{key}: {cfg.get(key)} -> {new_i} (widen)")
            cfg[key] = new_i
        experts = any("experts" in e[0] for e in family.mlp_in)
        if experts and new_i % 8:
            warnings.append(
                Problem(
                    stack[0].widen_where,
                    f"{key} {new_i}: transformers runs fused experts with grouped matrix products that need rows of a "
                    "multiple of 16 bytes (8 units in bf16, 4 in float32); this model may load and then fail to run",
                    f"use a multiple of 8, e.g. {new_i + (-new_i) % 8}",
                    code="config",
                )
            )
    if w is not None:  # every widened config is asked of transformers: an output it cannot load is not an output
        refused = _refused_by_transformers(full)
        if refused is not None:
            from surgery.errors import PlanError

            h, a = cfg.get(hk), cfg.get(ak)
            uneven = isinstance(h, int) and isinstance(a, int) and a and h % a
            raise PlanError(
                Problem(
                    stack[0].widen_where,
                    f"transformers refuses the widened config: {refused}",
                    f"choose heads that divide {hk} {h}, or grow {hk} too" if uneven else "choose sizes the model's config accepts",
                )
            )
    for key in family.position_dependent_config:
        if cfg.get(key):
            note(
                f"config {key} is set: layers behave differently at different depths, "
                "so moved copies are not exact copies of their function"
            )
    tname = dtype_name(out_code)
    for c in [full, cfg] if cfg is not full else [full]:
        for key in ("dtype", "torch_dtype"):
            if key in c and c[key] != tname:
                changes.append(f"{key}: {c[key]} -> {tname}")
                c[key] = tname
    if "dtype" not in full and "torch_dtype" not in full:
        full["dtype"] = tname
    return full, changes


def _transformers_missing() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is None


def _refused_by_transformers(full: dict) -> str | None:
    """Why transformers' own config class for this model type refuses `full`, or None (accepted, or
    transformers absent, or a model type it does not know). Asked only for a widened model: its sizes
    are the user's, and some configs check them (Llama: hidden a multiple of heads)."""
    if _transformers_missing() or not isinstance(full.get("model_type"), str):
        return None
    import transformers

    kwargs = {k: v for k, v in full.items() if k != "model_type"}
    try:
        transformers.AutoConfig.for_model(full["model_type"], **kwargs)
    except Exception as e:  # ValueError, or a config class's own validation (huggingface_hub's strict dataclasses)
        if isinstance(e, ValueError) and "Unrecognized model" in str(e):
            return None  # a model type transformers does not know: not ours to judge
        return " ".join(str(e).split())[:300]
    return None
