"""Masked growth (the Gstack paper's G_random, after MSG: Yao et al. 2024, "Masked Structural Growth
for 2x Faster Language Model Pre-training", ICLR): what the growth added is multiplied by a mask
m(step) = min(1, step / steps), so the grown model starts from the small model's function and the
new parameters fade in. The masks are forward hooks set from the Trainer's global step before every
step, so a resumed run continues the ramp exactly; at m = 1 every hook returns its module's own
output, bit for bit.

What is masked (new = what the growth appended; the plan's surgery.json and the two configs say
which):
- new layers (depth: `expand`, `gstack: {operator: random}`): x + f(x) becomes x + m f(x);
- new MLP units (width, `widen {intermediate}` with init zero or random): their activations times
  m before the projection that reads them (down_proj);
- new attention heads (`widen {heads}`): with `masks: msg` (the default, MSG's and the Gstack
  paper's code's way, tongxuluo/prts `msg.py`) their queries, keys and values times m (at m = 0
  their values are zero, so they write nothing; their attention pattern fades in with them); with
  `masks: together` (ours) their outputs times m before o_proj;
- new units of the residual stream (`widen {hidden}` with init zero or random): everything that
  writes the stream (the embeddings, o_proj, down_proj) has its new units times m, and every norm
  over the stream computes its statistics with the new units weighted by m (MSG's masked
  normalisation: mean_c(x) = sum_i c_i x_i / sum_i c_i, c_i = 1 for old units and m for new ones)
  and its new outputs times m. At m = 0 the new units are zero everywhere and every norm sees the
  small model's statistics: the small model's function (within float rounding). A mixture of
  experts whose weights transformers fuses is masked at the experts' combined output; its new MLP
  units (inside the fused weights) cannot be, and are refused.

When the masks ramp: with `masks: msg` in MSG's stages, one after the other, each over `steps`
steps: the MLP's new units (and new layers) first, then the stream's, then the heads' (prts
`MsgMask`: 3 x grow_step); stages for what did not grow are skipped. With `masks: together` every
mask ramps over the same `steps`. Departure kept in both: the norms' masked statistics weight the
new units' squares by m (exact at every m, LayerNorm included), where prts normalises x * m and
rescales by sqrt(sum m / width) (m^2 weights; the same at m = 0 and m = 1).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from surgery.errors import PlanError


MASK_STYLES = ("msg", "together")
STAGES = ("intermediate", "hidden", "heads")  # MSG's order (prts msg.py): MLP units, the stream, heads


def mask_stages(sizes: dict, new_layers: bool, style: str) -> dict:
    """{what: stage} for what a growth added: "layers", and the widen's named sizes ("intermediate",
    "hidden", "heads"; key/value heads go with the heads). A stage starts when the one before it has
    fully faded in; `together`: every mask in stage 0. The plan alone decides (provenance's widened
    sizes), so a run checks its length before training."""
    kinds = [k for k in STAGES if sizes.get(k) is not None or (k == "heads" and sizes.get("kv_heads") is not None)]
    if style == "together":
        out = {k: 0 for k in kinds}
    else:
        out = {k: i for i, k in enumerate(kinds)}
    if new_layers:
        out["layers"] = 0  # prts: new blocks ramp from the start (MsgBlock's full mask)
    return out


class LayerMask:
    """m(step) = min(1, step / steps); a new layer's output x + f(x) becomes x + m f(x)."""

    def __init__(self, steps: int = 0):
        self.steps, self.value = steps, 0.0

    def hook(self, module, args, kwargs, output):
        if self.value >= 1.0:
            return output  # fully faded in: the layer's own output, bit for bit
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        mixed = x + self.value * (y - x)
        return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed


def _unit_scale(x, old: int, value: float):
    """Over the last dimension: 1 for units < old, `value` for the new ones."""
    import torch

    scale = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    scale[old:] = value
    return scale


class UnitMask:
    """Width growth's mask on activations: units >= old (new MLP units, new heads' outputs) are
    multiplied by m before the projection that reads them, so they contribute nothing at m = 0."""

    def __init__(self, old: int):
        self.old, self.value = old, 0.0

    def hook(self, module, args):
        if self.value >= 1.0:
            return None  # fully faded in: the projection's own input, bit for bit
        x = args[0]
        return (x * _unit_scale(x, self.old, self.value),) + tuple(args[1:])


class HeadMask:
    """New heads' queries, keys and values times m (MSG): `scale` is over the projection's output
    units (a fused q|k|v projection's too), 1 for old units, 0 where m applies."""

    def __init__(self, new):
        self.new, self.value = new, 0.0

    def hook(self, module, args, output):
        if self.value >= 1.0:
            return None
        y = output[0] if isinstance(output, tuple) else output
        new = self.new.to(device=y.device)
        y = y * (1.0 - new.to(y.dtype) * (1.0 - self.value))
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y


def _head_units(role: str, a: int, a2: int, k: int, k2: int, d: int):
    """Which of a query/key/value projection's output units belong to new heads (a bool vector)."""
    import torch

    def tail(old, new):
        v = torch.zeros(new * d, dtype=torch.bool)
        v[old * d :] = True
        return v

    if role == "q":
        return tail(a, a2)
    if role in ("k", "v"):
        return tail(k, k2)
    if role == "qkv":
        return torch.cat([tail(a, a2), tail(k, k2), tail(k, k2)])
    v = torch.zeros(a2, 3, d, dtype=torch.bool)  # qkv_per_head: [head][q|k|v][head size]
    v[a:] = True
    return v.reshape(-1)


class StreamMask:
    """The residual stream's new units (>= old) in what a module writes to it, times m."""

    def __init__(self, old: int):
        self.old, self.value = old, 0.0

    def hook(self, module, args, output):
        if self.value >= 1.0:
            return None
        y = output[0] if isinstance(output, tuple) else output
        y = y * _unit_scale(y, self.old, self.value)
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y


class NormMask:
    """A norm over the widened stream with MSG's masked statistics: RMS (or mean and variance, for a
    LayerNorm) over the units weighted by c (1 old, m new), and its new outputs times m. RMS-type
    norms (x * rsqrt(mean x^2 + eps) * gain, any gain form) are corrected by the ratio of the two
    RMS values; a LayerNorm is recomputed from its input."""

    def __init__(self, old: int):
        self.old, self.value = old, 0.0

    def hook(self, module, args, output):
        if self.value >= 1.0:
            return None
        import torch

        x = args[0].float()
        y = output.float()
        c = _unit_scale(x, self.old, self.value)
        total = c.sum()
        if isinstance(module, torch.nn.LayerNorm):
            mean = (x * c).sum(-1, keepdim=True) / total
            var = (((x - mean) ** 2) * c).sum(-1, keepdim=True) / total
            z = (x - mean) * torch.rsqrt(var + module.eps)
            if module.weight is not None:
                z = z * module.weight.float()
            if module.bias is not None:
                z = z + module.bias.float()
        else:
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            plain = x.pow(2).mean(-1, keepdim=True)
            masked = (x.pow(2) * c).sum(-1, keepdim=True) / total
            z = y * torch.sqrt(plain + eps) * torch.rsqrt(masked + eps)
        return (z * c).to(output.dtype)


def _lm_config(config_dir: Path, fam) -> dict:
    return fam.lm_config(json.loads((Path(config_dir) / "config.json").read_text()))


def _sizes(cfg: dict, fam) -> dict:
    """hidden, intermediate and attention width (heads x head size) of a language-model config."""
    a, d = cfg.get(fam.heads_key), fam.head_size(cfg)
    return {"hidden": cfg.get(fam.hidden_key), "intermediate": fam.mlp_size(cfg), "attention": a * d if isinstance(a, int) and d else None}


def _modules(model, fam, patterns) -> list:
    """The layer modules whose weight (or bias) name matches one of `patterns`."""
    regs = [re.compile(p) for p in patterns]
    out = []
    for name, module in model.named_modules():
        if not name.startswith(fam.layer_prefix):
            continue
        rest = name[len(fam.layer_prefix) :]
        if "." not in rest:
            continue
        suffix = rest.split(".", 1)[1]
        if any(r.fullmatch(suffix + ".weight") or r.fullmatch(suffix + ".bias") for r in regs):
            out.append(module)
    return out


class _Hooks:
    """The masks of one grown model, each hooked on its modules with the stage it ramps in."""

    def __init__(self, model, fam, ck, stages: dict, where: str):
        self.model, self.fam, self.stages, self.where = model, fam, stages, where
        self.masks: list = []  # (mask, its stage)
        self.suffixes = {s[1] for s in map(ck.family.split, ck.tensors) if s is not None}  # what the checkpoint holds

    def present(self, pattern: str) -> bool:
        return any(re.fullmatch(pattern, x) for x in self.suffixes)

    def hook_all(self, modules, mask, what: str, pre: bool = False, stage: str = "hidden"):
        if not modules:
            raise PlanError(
                f"grow.mask_steps: no module of this {self.fam.name} model {what} (fused mixture-of-experts weights are not "
                "hookable); masks for width growth cover dense models",
                where=self.where,
                fix="drop mask_steps for this model",
            )
        for m in modules:
            (m.register_forward_pre_hook if pre else m.register_forward_hook)(mask.hook)
        self.masks.append((mask, self.stages.get(stage, 0)))

    def layers(self, new: list, steps: int) -> None:
        """x + f(x) -> x + m f(x) on each new layer."""
        layers = self.model.get_submodule(self.fam.layer_prefix.rstrip("."))
        mask = LayerMask(steps)
        self.masks.append((mask, self.stages["layers"]))
        for i in new:
            layers[i].register_forward_hook(mask.hook, with_kwargs=True)

    def mlp(self, old_units: int, small_cfg: dict) -> None:
        """New MLP units times m before each MLP's down projection (experts, shared expert, dense: each its own size)."""
        fam = self.fam
        for entry in fam.mlp_out:
            if not self.present(entry.pattern):
                continue
            key = entry.size_key or fam.intermediate_key
            old = old_units if key == fam.intermediate_key else small_cfg.get(key)
            what = f"takes the new MLP units of {entry.pattern!r} as its input"
            self.hook_all(_modules(self.model, fam, [entry.pattern]), UnitMask(old), what, True, "intermediate")

    def heads(self, style: str, old_width: int, small_cfg: dict, grown_cfg: dict) -> None:
        """New heads: their q, k, v times m (msg), or their outputs before o_proj (together)."""
        fam = self.fam
        stage = "heads" if "heads" in self.stages else "hidden"  # heads grown with the stream's head size (GPT-2) ramp with it
        if style != "msg":
            outs = [p for role, p in fam.attention if role == "o"]
            reads = [x if isinstance(x, str) else x[0] for p in outs for x in ([p] if isinstance(p, str) else p)]
            self.hook_all(_modules(self.model, fam, reads), UnitMask(old_width), "takes the new heads as its input", True, stage)
            return
        a, a2 = small_cfg.get(fam.heads_key), grown_cfg.get(fam.heads_key)
        k = (small_cfg.get(fam.kv_heads_key) if fam.kv_heads_key else None) or a
        k2 = (grown_cfg.get(fam.kv_heads_key) if fam.kv_heads_key else None) or a2
        if not a2 or not k2 or a2 // k2 != a // k:
            raise PlanError(
                f"grow.mask_steps: new heads are masked at their queries, keys and values, and this growth changes the "
                f"query heads per key/value head ({a}/{k} -> {a2}/{k2}): new heads would read old values",
                where=self.where,
                fix="keep the heads / kv_heads ratio, or `masks: together` (new heads' outputs masked before o_proj)",
            )
        for role, p in fam.attention:
            if role != "o":
                pats = [x if isinstance(x, str) else x[0] for x in ([p] if isinstance(p, str) else p)]
                mask = HeadMask(_head_units(role, a, a2, k, k2, fam.head_size(grown_cfg)))
                self.hook_all(_modules(self.model, fam, pats), mask, f"computes the {role} of the new heads", False, stage)

    def stream(self, h: int, width: int) -> None:
        """The stream's new units times m in everything that writes it; MSG's masked norm statistics."""
        model, fam = self.model, self.fam
        writers: list = []
        for pattern, _dim in fam.hidden_out:  # every kind of writer the checkpoint has must be a hookable module
            found = _modules(model, fam, [pattern])
            if not found and self.present(pattern):
                found = _fused_experts(model, fam)  # the experts' down projections: their combined output
                if not found:
                    self.hook_all([], None, f"holds the stream's writer {pattern!r}")
            writers += [m for m in found if all(m is not w for w in writers)]
        writers += [m for m in (_owner(model, n) for n in list(fam.embeddings) + list(fam.position_embeddings)) if m is not None]
        # a VLM's projector: its inner layer and its output are as wide as the stream (new units times m)
        others = [re.compile(p) for p, _d, role in fam.hidden_other if role == "out"]
        writers += [m for n, m in model.named_modules() if any(r.fullmatch(n + ".weight") for r in others)]
        self.hook_all(writers, StreamMask(h), "writes the residual stream")
        norms = [
            m
            for n, m in model.named_modules()
            if n.startswith(fam.layer_prefix)
            and fam.is_norm(n[len(fam.layer_prefix) :].split(".", 1)[-1] + ".weight")
            and getattr(m, "weight", None) is not None
            and tuple(m.weight.shape) == (width,)
        ]
        final = _owner(model, fam.final_norm) if fam.final_norm else None
        self.hook_all(norms + ([final] if final is not None else []), NormMask(h), "normalises the residual stream")


def require_new(layers: bool, units: bool, where: str) -> None:
    """Masks fade in new layers or new units: refused when growth made neither (the run checks this
    at its start; fade_in_new_layers again when called on its own)."""
    if not layers and not units:
        raise PlanError(
            "grow.mask_steps fades in new layers or new units, and the grow plan adds neither (stacked copies and split "
            "units are not new: they already compute the small model's function)",
            where=where,
            fix="grow with `expand` or `gstack: {operator: random}`, or `widen` with init: random|zero; or drop mask_steps",
        )


def fade_in_new_layers(model, model_dir: Path, steps: int, where: str, small_dir: Path | None = None, style: str = "msg"):
    """Hook what the growth added with masks that ramp from 0 to 1 over `steps` steps each (in MSG's
    stages, or together), and return the callback that sets them from the global step before every
    step (see the module's text)."""
    import transformers

    from surgery.io.checkpoint import open_checkpoint
    from surgery.io.provenance import read_provenance

    prov = read_provenance(model_dir)
    new = prov.new_layers if prov is not None else []
    widened = prov.widened_dict() if prov is not None else {}
    ck = open_checkpoint("model", str(model_dir), model_dir)
    fam = _module_layout(model, ck.family)
    grew: dict = {}
    if widened.get("init") in ("zero", "random"):
        if small_dir is None:
            raise PlanError("grow.mask_steps on width growth needs the small model's config", where=where)
        small_cfg, grown_cfg = _lm_config(small_dir, fam), _lm_config(model_dir, fam)
        before, after = _sizes(small_cfg, fam), _sizes(grown_cfg, fam)
        grew = {k: before[k] for k in before if isinstance(before[k], int) and isinstance(after[k], int) and after[k] > before[k]}
    require_new(bool(new), bool(grew), where)
    hooks = _Hooks(model, fam, ck, mask_stages(widened.get("sizes") or {}, bool(new), style), where)
    if new:
        hooks.layers(new, steps)
    if "intermediate" in grew:
        hooks.mlp(grew["intermediate"], small_cfg)
    if "attention" in grew:
        hooks.heads(style, grew["attention"], small_cfg, grown_cfg)
    if "hidden" in grew:
        hooks.stream(grew["hidden"], grown_cfg.get(fam.hidden_key))

    def set_all(step: int) -> None:
        for m, stage in hooks.masks:
            m.value = min(1.0, max(0.0, (step - stage * steps) / steps))

    class Fade(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            set_all(state.global_step)

        def on_step_end(self, args, state, control, **kw):  # evaluations and the end of training see the new value
            set_all(state.global_step)

        def on_train_begin(self, args, state, control, **kw):
            set_all(state.global_step)

    return Fade()


def _fused_experts(model, fam) -> list:
    """The modules holding a mixture of experts' fused weights, one per layer (transformers 5 keeps
    every expert's down projection in one [experts, hidden, units] parameter): their output is the
    experts' combined write to the stream, so its new units can be masked there. [] when the layers
    do not all have one."""
    layers = model.get_submodule(fam.layer_prefix.rstrip("."))
    found = [
        m
        for n, m in model.named_modules()
        if n.startswith(fam.layer_prefix) and n.endswith(".experts") and any(p.dim() == 3 for p in m.parameters(recurse=False))
    ]
    return found if len(found) == len(layers) else []


def _module_layout(model, fam):
    """The family in the layout of the loaded model's module names, which may differ from the
    checkpoint's tensor names (a LLaVA saved before transformers 4.52 is loaded into today's
    modules): the checkpoint's own layout, or the family's current one, or one of its variants."""
    import dataclasses

    from surgery.registry import current

    base = current().families.get(fam.name, fam)
    candidates = [fam, base] + [
        dataclasses.replace(base, **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}, name_variants=())
        for v in base.name_variants
    ]
    for cand in candidates:
        try:
            model.get_submodule(cand.layer_prefix.rstrip("."))
            return cand
        except AttributeError:
            continue
    return fam


def _owner(model, tensor_name: str):
    """The module that holds a checkpoint tensor (e.g. model.embed_tokens for model.embed_tokens.weight)."""
    path = tensor_name.rsplit(".", 1)[0]
    for candidate in (path, path.split(".", 1)[-1] if "." in path else path):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None
