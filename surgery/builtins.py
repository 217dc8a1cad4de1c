"""What surgery itself registers: its plan steps with their stack operations, its merge methods
and the architecture families in `surgery/architectures/`. Called once by `registry.load()`."""

from __future__ import annotations

from surgery.registry import Registry


def register(reg: Registry) -> None:
    from surgery.arch import builtin_families
    from surgery.compile import BUILTIN_OPS
    from surgery.methods import BUILTIN_METHODS
    from surgery.plan import BUILTIN_STEPS

    for schema in BUILTIN_STEPS:
        reg.add_step(schema, BUILTIN_OPS[schema.op])
    for spec in BUILTIN_METHODS:
        reg.add_method(spec)
    for family, origin in builtin_families():
        reg.add_family(family, origin)
