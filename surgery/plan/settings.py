"""Parameter settings, with mergekit's semantics.

A setting is a scalar, a gradient (a list of numbers interpolated over the layers of a merge),
or a list of conditions `{filter: substring, value: scalar or gradient}` of which the first
whose filter is a substring of the tensor name wins (no filter, or `*`, matches everything).
Settings from several scopes (a model in a merge, the merge step, the plan) are concatenated
into one condition list, most specific first: that is exactly mergekit's precedence, where a
scope whose filters all miss falls through to the next.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional


class Cond(NamedTuple):
    filter: Optional[str]
    value: Any  # a scalar or a gradient (tuple of numbers)


def is_condition_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and bool(v) and all(isinstance(c, (dict, Cond)) for c in v)


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def as_conditions(v: Any) -> tuple[Cond, ...]:
    """Any setting as a tuple of conditions."""
    if v is None:
        return ()
    if is_condition_list(v):
        return tuple(c if isinstance(c, Cond) else Cond(c.get("filter"), _freeze(c.get("value"))) for c in v)
    return (Cond(None, _freeze(v)),)


def conditions_of(*settings: Optional[Any]) -> tuple[Cond, ...]:
    """Concatenate settings, most specific first."""
    out: tuple[Cond, ...] = ()
    for s in settings:
        out += as_conditions(s)
    return out


def gradient_at(v: Any, t: float) -> Any:
    """A scalar, or a list interpolated at t in [0, 1] (mergekit's `evaluate_setting`): numbers
    interpolate linearly between neighbours; other values are picked at floor(t * (n - 1))."""
    if not isinstance(v, tuple):
        return v
    if not v:
        return None
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
        return v[int(t * (len(v) - 1))]
    scaled = t * (len(v) - 1)
    i0 = int(scaled)
    i1 = min(len(v) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * v[i0] + frac * v[i1]


def resolve(conds: tuple[Cond, ...], tensor_name: str, t: float, default: Any = None) -> Any:
    """The value of the first condition that matches `tensor_name`, at position t; else `default`."""
    for c in conds:
        if c.filter is None or c.filter == "*" or (tensor_name and c.filter in tensor_name):
            v = gradient_at(c.value, t)
            if v is not None:
                return v
    return default


def to_mergekit(*settings: Optional[Any]) -> Any:
    """Settings (most specific first) in mergekit's YAML form: a plain value when one unfiltered
    value is all there is, else a list of {filter, value}; None when there is nothing."""
    items = []
    for c in conditions_of(*settings):
        value = list(c.value) if isinstance(c.value, tuple) else c.value
        items.append({"filter": c.filter, "value": value} if c.filter is not None else {"value": value})
    if not items:
        return None
    if len(items) == 1 and "filter" not in items[0]:
        return items[0]["value"]
    return items
