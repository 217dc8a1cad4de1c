"""Merge methods: a small registry of specs that say which parameters a method takes, how many
inputs and whether a base, and how to build the recipe for one output tensor.

Native methods (linear, slerp, nuslerp) are implemented by surgery's engine. Plugins register
more through `surgery.plugins.PluginAPI` (the mergekit plugin registers every mergekit method, run through
mergekit's own kernels); the core never imports a plugin's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from surgery import registry
from surgery.errors import SurgeryError
from surgery.recipes import Linear, Nuslerp, Recipe, Slerp


@dataclass(frozen=True)
class Param:
    name: str
    default: Any = None
    required: bool = False
    scope: str = "shared"  # shared | input (every input) | non_base (every input but the base)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    base: str = "none"  # required | optional | ignored (accepted, plays no role) | none
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    # build(inputs, base_index, shared params, per-input params) -> Recipe
    build: Callable[..., Recipe] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    origin: str = "surgery"
    summary: str = ""

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)

    @property
    def shared(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "shared")

    @property
    def per_input(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope != "shared")


# mergekit's methods, for a helpful error when the plugin that runs them is not installed
MERGEKIT_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "karcher",
    "multislerp",
    "sce",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
)


def method_names() -> list[str]:
    return registry.current().method_names()


def get_method(name: str, where: str | None = None) -> MethodSpec:
    spec = registry.current().resolve_method(name)
    if spec is not None:
        return spec
    if name in MERGEKIT_METHODS:
        raise SurgeryError(
            f"merge method {name!r} runs through mergekit's kernels, and the mergekit plugin is not installed",
            where=where,
            fix="install the surgery-mergekit plugin, which brings mergekit 0.1.5 "
            "(from a source checkout: pip install -e plugins/surgery-mergekit)",
        )
    raise SurgeryError(
        f"unknown merge method {name!r}",
        where=where,
        fix=f"available: {', '.join(method_names())}; mergekit's others ({', '.join(MERGEKIT_METHODS[:4])}, …) "
        "come with the mergekit plugin",
    )


def _linear(inputs, base_index, shared, per_input):
    return Linear(tuple(inputs), tuple(float(p["weight"]) for p in per_input), bool(shared["normalize"]))


def _slerp(inputs, base_index, shared, per_input):
    b = 1 - base_index
    return Slerp(inputs[base_index], inputs[b], float(shared["t"]))


def _nuslerp(inputs, base_index, shared, per_input):
    non_base = [i for i in range(len(inputs)) if i != base_index]
    weights = [float(per_input[i]["weight"]) for i in non_base]
    return Nuslerp(
        inputs[non_base[0]],
        inputs[non_base[1]],
        inputs[base_index] if base_index is not None else None,
        tuple(weights),
        bool(shared["nuslerp_row_wise"]),
        bool(shared["nuslerp_flatten"]),
    )


BUILTIN_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "linear",
        (Param("weight", required=True, scope="input"), Param("normalize", True)),
        base="ignored",
        min_inputs=1,
        build=_linear,
        summary="sum_i w_i x_i (/ sum_i w_i when normalize): a model soup",
    ),
    MethodSpec(
        "slerp",
        (Param("t", required=True),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        build=_slerp,
        summary="spherical interpolation from the base (t = 0) to the other model (t = 1)",
    ),
    MethodSpec(
        "nuslerp",
        (Param("weight", required=True, scope="non_base"), Param("nuslerp_row_wise", False), Param("nuslerp_flatten", True)),
        base="optional",
        min_inputs=2,
        max_inputs=3,
        build=_nuslerp,
        summary="slerp by relative weights; with a base, of the two task vectors (mergekit's nuslerp)",
    ),
)
