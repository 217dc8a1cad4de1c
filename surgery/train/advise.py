"""Gstack's guideline for when to grow (Du et al., 2024, "Stacking Your Transformers").

For a target model of N parameters trained on D tokens (C = 6 N D FLOPs), train a model g = 4
times shallower for d tokens, stack it 4x (G_direct) and continue:

    log10(d) = 0.88 * log10(N) + 163.27 / log10(C) - 5.74

The paper's table: Llama2-7B at 2T tokens -> d ~ 11.11B; Llama3-8B at 15T -> d ~ 6.58B.
"""

from __future__ import annotations

import math

GROWTH_FACTOR = 4
A, B, C0 = 0.88, 163.27, -5.74
FITTED_PARAMS = (410e6, 3e9)  # the paper fitted the formula on N = 410M, 1.1B and 3B (§4.2, Fig. 8)


def gstack_growth_tokens(params: float, tokens: float) -> float:
    """d, the tokens to train the small model before stacking it."""
    if params <= 0 or tokens <= 0:
        raise ValueError("params and tokens must be positive")
    flops = 6.0 * params * tokens
    if flops <= 10:
        raise ValueError("6*N*D must exceed 10 FLOPs for the formula to mean anything")
    return 10 ** (A * math.log10(params) + B / math.log10(flops) + C0)


def advice(params: float, tokens: float, layers: int | None = None) -> dict:
    d = gstack_growth_tokens(params, tokens)
    out = {
        "params": params,
        "tokens": tokens,
        "flops": 6.0 * params * tokens,
        "growth_tokens": d,
        "growth_factor": GROWTH_FACTOR,
        "growth_fraction": d / tokens,
    }
    if layers is not None:
        out["layers"] = layers
        out["small_layers"] = max(1, layers // GROWTH_FACTOR)
    warnings = []
    lo, hi = FITTED_PARAMS
    if not lo <= params <= hi:
        warnings.append(
            f"N = {human(params)} is outside the {human(lo)}-{human(hi)} parameters the formula was fitted on: d is an extrapolation"
        )
    if d >= tokens:
        warnings.append(
            f"d = {human(d)} tokens is not below the budget D = {human(tokens)}: the formula gives no usable growth point here, "
            "so no `grow:` block is suggested; choose at_tokens yourself, below D"
        )
    out["warnings"] = warnings
    out["snippet"] = d < tokens
    return out


def human(n: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= v:
            return f"{n / v:.2f}{unit}"
    return f"{n:.0f}"


def advice_text(a: dict) -> str:
    lines = [
        f"target: {human(a['params'])} parameters, {human(a['tokens'])} tokens (C = 6ND = {a['flops']:.3g} FLOPs)",
        f"Gstack: grow by g = {a['growth_factor']} (G_direct: stack the whole small model {a['growth_factor']} times)",
        f"  after d = {human(a['growth_tokens'])} tokens ({a['growth_tokens']:,.0f}; {a['growth_fraction']:.4%} of the budget)",
        "  log10(d) = 0.88*log10(N) + 163.27/log10(C) - 5.74",
    ]
    lines += [f"warning: {w}" for w in a.get("warnings", [])]
    if not a.get("snippet", True):
        return "\n".join(lines)
    if "layers" in a:
        lines.append(f"  the small model has {a['small_layers']} layers (the target has {a['layers']}); in a training config:")
    else:
        lines.append("  the small model has 1/4 of the target's layers; in a training config:")
    lines += [
        "",
        "    grow:",
        f"      at_tokens: {human(a['growth_tokens'])}",
        "      plan: {models: {small: TRAINED}, steps: [{take: {model: small}}, {stack: {times: 4}}]}",
        f"    tokens: {human(a['tokens'])}",
    ]
    return "\n".join(lines)
