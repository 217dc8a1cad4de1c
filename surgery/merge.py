"""The merge arithmetic surgery computes itself, as pure functions on tensors (mergekit keeps each
method's math next to its spec the same way; the specs are in surgery.methods).

Each follows mergekit 0.1.5's operation order so results agree to the last bit where the
arithmetic allows; where surgery differs (slerp's statistics in float64, gathered chunk by
chunk), the README's compatibility table says so.
"""

from __future__ import annotations

SLERP_DOT_THRESHOLD = 0.9995  # mergekit's DOT_THRESHOLD: above it, slerp is a lerp
SLERP_EPS = 1e-8


def slerp_coefficients(sum_aa: float, sum_bb: float, sum_ab: float, t: float, float64: bool = False):
    """(coef_a, coef_b) with slerp(a, b, t) = coef_a * a + coef_b * b, from the whole tensors'
    sums of squares and dot product; computed as mergekit 0.1.5 does, in float32 (float64 for
    float64 inputs), on the host so every device gets the same two numbers."""
    import torch

    na, nb = sum_aa**0.5, sum_bb**0.5
    na = na if na > SLERP_EPS else 1.0
    nb = nb if nb > SLERP_EPS else 1.0
    cd = torch.float64 if float64 else torch.float32
    dot = torch.tensor(sum_ab / (na * nb), dtype=cd).clamp(-1, 1)
    tt = torch.tensor(t, dtype=cd)
    linear = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, torch.zeros((), dtype=cd), dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def nuslerp(a, b, base, weights: tuple[float, float], row_wise: bool, flatten: bool):
    """nuslerp in the inputs' (promoted) dtype on whole tensors, with mergekit 0.1.5's operation
    order so results agree to the last bit where the arithmetic allows."""
    import torch

    dt = a.dtype
    for x in (b, base):
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    a, b = a.to(dt), b.to(dt)
    w0, w1 = weights
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    if base is not None:
        base = base.to(dt)
        a, b = a - base, b - base
    shape = a.shape
    dim = 0 if row_wise else -1
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    unit_a = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(unit_a * unit_b, dim=-1, keepdim=True).clamp(-1, 1)
    straight = (1 - cos.square()) <= 1e-8**2
    theta = torch.acos(torch.where(straight, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(straight, (1 - t) * a + t * b, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    out = out.reshape(shape)
    return base + out if base is not None else out


def widen(x, r):
    """The widened tensor of a `surgery.recipes.Widen` recipe `r` from the whole input `x` (G_direct
    in width, Net2Net's split, for `split`; G_zero and G_random for the others)."""
    import torch

    sizes = r.sizes
    blocks = x.split([o for o, _ in sizes], dim=r.dim) if len(sizes) > 1 else (x,)
    out = []
    for b, (blk, (old, new_size)) in enumerate(zip(blocks, sizes, strict=True)):
        extra = new_size - old
        if r.init == "split":
            src = [j % old for j in range(new_size)]  # output unit -> the unit it is (a copy of)
            grown = torch.cat([blk, blk.index_select(r.dim, torch.tensor(src[old:], dtype=torch.long, device=x.device))], dim=r.dim)
            if r.role == "out":  # the columns reading a unit and its copies share its weight
                scale = torch.tensor(split_shares(src, old, r.shares, r.seed, r.share_key), dtype=torch.float64, device=x.device)
                shape = [1] * grown.dim()
                shape[r.dim] = -1
                grown = (grown.double() * scale.reshape(shape)).to(blk.dtype)
        else:
            shape = list(blk.shape)
            shape[r.dim] = extra
            if r.init == "zero":
                new = torch.zeros(shape, dtype=blk.dtype, device=x.device)
            else:
                g = torch.Generator().manual_seed(_seed(r.seed, f"{r.key}#{b}"))
                new = torch.empty(shape, dtype=torch.float32).normal_(0.0, r.std, generator=g).to(blk.dtype).to(x.device)
            grown = torch.cat([blk, new], dim=r.dim)
        out.append(grown)
    return torch.cat(out, dim=r.dim) if len(out) > 1 else out[0]


def split_shares(src, old: int, mode: str, seed: int, kind: str) -> tuple[float, ...]:
    """What each output unit j (a copy of unit src[j]) takes of the weights that read its unit: 1 /
    copies (`even`), or seeded shares in proportion to uniform(0.5, 1.5) draws, summing to 1 over
    each unit's copies (`random`: the function is the same, the copies are no longer symmetric).
    Keyed by the kind of unit, so every reader of one kind, and LiGO's start, use the same shares."""
    counts = [0] * old
    for s in src:
        counts[s] += 1
    if mode == "even":
        return tuple(1.0 / counts[s] for s in src)
    import random

    rng = random.Random(_seed(seed, f"shares:{kind}:{old}:{len(src)}"))
    draw = [rng.uniform(0.5, 1.5) for _ in src]
    total = [0.0] * old
    for d, s in zip(draw, src, strict=True):
        total[s] += d
    return tuple(d / total[s] for d, s in zip(draw, src, strict=True))


def _seed(seed: int, key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def gather(x, r):
    """A `surgery.recipes.Gather`: slices of `x` along r.dim by r.index, each times r.scale[i] plus
    r.add[i] (in float64, then back to x's dtype)."""
    import torch

    out = x.index_select(r.dim, torch.tensor(r.index, dtype=torch.long, device=x.device))
    if r.scale is None and r.add is None:
        return out
    shape = [1] * out.dim()
    shape[r.dim] = -1
    y = out.double()
    if r.scale is not None:
        y = y * torch.tensor(r.scale, dtype=torch.float64, device=x.device).reshape(shape)
    if r.add is not None:
        y = y + torch.tensor(r.add, dtype=torch.float64, device=x.device).reshape(shape)
    return y.to(x.dtype)
