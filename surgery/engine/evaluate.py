"""Evaluating recipes chunk by chunk (elementwise recipes) or on whole tensors (nuslerp, plugin
kernels, vocabulary realignment). The merge arithmetic itself is in surgery.merge."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.io.safetensors import itemsize
from surgery.errors import OutputError
from surgery.recipes import (
    Cast,
    External,
    Gather,
    Linear,
    Nuslerp,
    HiddenRouter,
    PromptRouter,
    RandomNormal,
    Read,
    Recipe,
    Scale,
    Slerp,
    VocabPermute,
    Widen,
    Zeros,
)

if TYPE_CHECKING:
    import torch

# torch is imported only when a recipe needs computing: copy-only plans (slicing, stacking,
# depth up-scaling) never pay its import time.

from surgery.engine.read import Sources, torch_dtype
from surgery.merge import gather, nuslerp, slerp_coefficients, widen


SLERP_KEEP_PER_ELEMENT = 24  # slerp inputs up to 24 bytes x chunk (96 MB by default) are read once, kept from pass 1


class Evaluator:
    """Evaluates recipes chunk by chunk (elements [e0, e1) of the flattened tensor)."""

    def __init__(self, sources: Sources):
        self.src = sources
        self._slerp: dict = {}  # Slerp -> (coef_a, coef_b)
        self._kept: dict = {}  # (Slerp, e0, e1) -> its input chunks from pass 1, when the tensor is small enough
        self._full: dict = {}  # whole-tensor results, for this output tensor

    def chunk(self, r: Recipe, e0: int, e1: int) -> "torch.Tensor":
        """Elements [e0, e1) of the flattened output of `r`, in r's dtype."""
        import torch

        if r.whole_tensor:
            return self.full(r).reshape(-1)[e0:e1]
        if isinstance(r, Read):
            if self.src.device == "cpu" and self.src.io is None:
                return self.src.read(r.src, e0, e1)
            return self.src.read_device(r.src, e0, e1)
        if isinstance(r, Zeros):
            return torch.zeros(e1 - e0, dtype=torch_dtype(r.dtype), device=self.src.device)
        if isinstance(r, Cast):
            return self.chunk(r.inner, e0, e1).to(torch_dtype(r.dtype))
        if isinstance(r, Scale):
            return self.chunk(r.inner, e0, e1) * r.factor
        if isinstance(r, Linear):
            first = torch_dtype(r.terms[0].dtype)
            cd = torch.float64 if first == torch.float64 else torch.float32
            w = torch.tensor(r.weights, dtype=cd, device=self.src.device)
            acc = torch.zeros(e1 - e0, dtype=cd, device=self.src.device)
            for term, wi in zip(r.terms, w.unbind(0), strict=True):
                acc.addcmul_(self.chunk(term, e0, e1), wi.reshape(1))
            if r.normalize:
                acc.div_(w.sum())
            return acc.to(first)
        if isinstance(r, Slerp):
            coef_a, coef_b = self._slerp_coefs(r)
            cd = coef_a.dtype
            kept = self._kept.pop((r, e0, e1), None)  # the inputs pass 1 already read
            x, y = kept if kept is not None else (self.chunk(r.a, e0, e1), self.chunk(r.b, e0, e1))
            return (coef_a * x.to(cd) + coef_b * y.to(cd)).to(torch_dtype(r.dtype))
        if isinstance(r, RandomNormal):
            return self._random(r, e0, e1)
        raise AssertionError(f"no evaluator for {type(r).__name__}")

    def full(self, r: Recipe) -> "torch.Tensor":
        """The whole output of `r`, shaped. Recipes that need whole input tensors (nuslerp, plugin
        kernels, vocabulary realignment) are computed once per output tensor and cached."""
        if r in self._full:
            return self._full[r]
        if isinstance(r, Nuslerp):
            out = nuslerp(
                self.full(r.a), self.full(r.b), self.full(r.base) if r.base is not None else None, r.weights, r.row_wise, r.flatten
            )
        elif isinstance(r, External):
            from surgery.registry import current as _registry

            inputs = [self.full(t) for t in r.terms]
            try:
                out = _registry().kernel(r.method)(inputs, r).to(torch_dtype(r.dtype))
            except Exception as e:  # the plugin's kernel refused its parameters (e.g. della's epsilon)
                params = ", ".join(f"{k}={v}" for k, v in r.shared)
                raise OutputError(
                    f"merge method {r.method} failed on {r.name} ({params or 'no shared parameters'}): {type(e).__name__}: {str(e)[:300]}",
                    where=r.where,
                    fix=f"check the {r.method} parameters against its documentation",
                ) from None
        elif isinstance(r, Gather):
            out = gather(self.full(r.inner), r).to(torch_dtype(r.dtype))
        elif isinstance(r, HiddenRouter):
            # every layer's gates from one pass of the base model (transformers' loading sets
            # process-wide defaults, so the run's lock also keeps it to one at a time)
            gates = self.src.once(("hidden", r.model, r.counts, r.average), lambda: _hidden_gates(r, str(self.src.device)))
            a, b = r.rows or (0, len(r.counts))
            out = gates[r.layer][a:b].to(torch_dtype(r.dtype))
        elif isinstance(r, PromptRouter):
            gates = self.src.once(("prompt", r.inner, r.counts), lambda: prompt_router(self.full(r.inner), r.counts))
            a, b = r.rows or (0, len(r.counts))
            out = gates[a:b].to(torch_dtype(r.dtype))
        elif isinstance(r, Widen):
            out = widen(self.full(r.inner), r).to(torch_dtype(r.dtype))
        elif isinstance(r, VocabPermute):
            key = ("vocab", r.terms, r.ids)
            if key not in self._full:
                self._full[key] = r.merger.permute({i: self.full(t) for i, t in zip(r.ids, r.terms, strict=True)})
            out = self._full[key][r.ids[r.index]].to(torch_dtype(r.dtype))
        else:
            return self.chunk(r, 0, r.numel).reshape(r.shape)
        assert tuple(out.shape) == tuple(r.shape), (type(r).__name__, out.shape, r.shape)
        self._full[r] = out
        return out

    def _slerp_coefs(self, r: Slerp):
        import torch

        if r in self._slerp:
            return self._slerp[r]
        # Pass 1: whole-tensor statistics in float64, chunk by chunk.
        ssa = ssb = sab = 0.0
        n = r.numel
        step = self.src.chunk_elements
        # a tensor whose inputs fit the budget keeps pass 1's chunks for pass 2: read once, not twice
        keep = n * (itemsize(r.a.dtype) + itemsize(r.b.dtype)) <= self.src.chunk_elements * SLERP_KEEP_PER_ELEMENT
        for e0 in range(0, n, step):
            e1 = min(n, e0 + step)
            xa, yb = self.chunk(r.a, e0, e1), self.chunk(r.b, e0, e1)
            if keep:
                self._kept[(r, e0, e1)] = (xa, yb)
            x, y = xa.to(torch.float64), yb.to(torch.float64)
            ssa += float(torch.dot(x, x))
            ssb += float(torch.dot(y, y))
            sab += float(torch.dot(x, y))
        coef_a, coef_b = slerp_coefficients(ssa, ssb, sab, r.t, float64=r.a.dtype == "F64")
        coef_a, coef_b = coef_a.to(self.src.device), coef_b.to(self.src.device)
        self._slerp[r] = (coef_a, coef_b)
        return coef_a, coef_b

    def _random(self, r: RandomNormal, e0: int, e1: int) -> "torch.Tensor":
        import torch

        B = RandomNormal.BLOCK
        parts = []
        for b in range(e0 // B, (e1 - 1) // B + 1):
            lo, hi = b * B, min(r.numel, (b + 1) * B)
            g = torch.Generator().manual_seed(r.block_seed(b))
            block = torch.empty(hi - lo, dtype=torch.float32).normal_(0.0, r.std, generator=g)
            parts.append(block[max(e0, lo) - lo : min(e1, hi) - lo])
        # drawn on the host: the same values whatever the device
        return torch.cat(parts).to(torch_dtype(r.dtype)).to(self.src.device)


def prompt_router(embed, counts) -> "torch.Tensor":
    """mergekit-moe's cheap_embed gate (`get_cheap_embedding`), from the prompts' padded token ids and
    masks: per expert, n(n(sum of its positive prompts' token embeddings) - n(sum of its negative
    prompts')), n(v) = v / max(|v|, 1e-8), summed over positions and then prompts as mergekit-moe
    sums them (an embedding row is what its one-hot product gives, exactly)."""
    import torch

    e = embed.float()

    def summed(batch):
        ids, mask = (torch.tensor(x, dtype=torch.long, device=e.device) for x in batch)
        h = e[ids]  # (prompts, positions, hidden)
        v = (h * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)

    rows = []
    for pos, neg in counts:
        h = summed(pos)
        if neg:
            h = h - summed(neg)
        rows.append(h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.cat(rows, dim=0)


def _hidden_gates(r, device: str = "cpu") -> "torch.Tensor":
    """mergekit-moe's hidden-state gates (its `get_hidden_states`, bfloat16), every layer's:
    (layers, experts, hidden). Per expert, the hidden states entering each layer over its prompts, at
    the last position (or averaged over positions), averaged over prompts, less the negative
    prompts', normalised, in the order mergekit-moe's reductions run. The base model is streamed one
    decoder layer at a time on `device` (engine/layerwise.py): memory is one layer and the prompts'
    states, not the model."""
    from pathlib import Path

    import torch
    import transformers

    from surgery.engine.layerwise import LayerwiseModel, run_layer
    from surgery.io.checkpoint import open_checkpoint

    path = Path(r.model)
    ck = open_checkpoint("base", str(path), path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    config.use_cache = False
    model = LayerwiseModel(ck, config, device, torch.bfloat16)
    sets = [(k, j, batch) for k, pair in enumerate(r.counts) for j, batch in enumerate(pair) if batch]
    inputs = [
        {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long)}
        for _, _, (ids, mask) in sets
    ]

    def reduce(h):  # (prompts, positions, hidden) -> (hidden)
        h = h.sum(dim=1) / h.shape[1] if r.average else h[:, -1, :]
        return h.sum(dim=0) / h.shape[0]

    try:
        states, calls = model.capture(inputs)
        per_layer = []  # layer -> {(expert, positive/negative): vector}
        with torch.no_grad():
            for i in range(len(model)):
                per_layer.append({(k, j): reduce(h) for (k, j, _), h in zip(sets, states, strict=True)})
                if i + 1 < len(model):
                    with model.layer(i) as layer:
                        states = [run_layer(layer, h, calls[n][i]) for n, h in enumerate(states)]
    finally:
        model.close()
    vecs = []
    for k in range(len(r.counts)):
        h = torch.stack([layer[(k, 0)] for layer in per_layer])  # (layers, hidden)
        if (k, 1) in per_layer[0]:
            h -= torch.stack([layer[(k, 1)] for layer in per_layer])
        h /= h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vecs.append(h.cpu())
    return torch.stack(vecs, dim=0).permute(1, 0, 2)  # (layers, experts, hidden)
