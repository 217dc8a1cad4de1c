"""A third-party plugin, as a test would ship it: one merge method (with a native build) and one step."""

from __future__ import annotations

from typing import ClassVar

from surgery.methods import MethodSpec, Param
from surgery.plan import Step
from surgery.recipes import Linear


class Reverse(Step):
    op: ClassVar[str] = "reverse_layers"
    summary: ClassVar[str] = "reverse the order of the layer stack"


def _reverse(step, stack, ctx):
    return list(reversed(stack))


def _midpoint(inputs, base_index, shared, per_input):
    return Linear(tuple(inputs), (shared["alpha"], 1 - shared["alpha"]), False)


def register(api):
    api.merge_method(MethodSpec("test_midpoint", (Param("alpha", 0.5),), min_inputs=2, max_inputs=2, build=_midpoint))
    api.step(Reverse, _reverse)


def broken(api):
    raise AssertionError("never called")


class Take2(Step):
    op: ClassVar[str] = "take"  # clashes with the built-in step
    summary: ClassVar[str] = "a clash"


def clashing(api):
    api.merge_method(MethodSpec("test_midpoint2", (Param("alpha", 0.5),), min_inputs=2, max_inputs=2, build=_midpoint))
    api.step(Take2, _reverse)
