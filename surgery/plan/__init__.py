"""Plans: YAML read with the line of every value, checked against the step schemas, settings
resolved per tensor, mergekit configs translated, and the JSON schema of it all.

    yamlio.py    safe YAML with locations (bounded: aliases, nesting, size)
    steps.py     the plan and step schemas (pydantic), load_plan / plan_from_text
    settings.py  parameter settings: scalars, gradients over layers, filtered conditions
    mergekit.py  a mergekit 0.1.5 config -> an equivalent plan, located at the config's lines
    schema.py    the JSON schema of plans and reports (`surgery schema`)
"""

from surgery.plan.steps import (
    BUILTIN_STEPS,
    MAX_LAYERS,
    Drop,
    Dus,
    Expand,
    Gstack,
    Merge,
    MergeSource,
    ModelRef,
    Output,
    Override,
    Plan,
    PlanBody,
    ScaleStep,
    Stack,
    Step,
    Strict,
    Take,
    TokenizerOptions,
    Upcycle,
    Widen,
    _problems,
    load_plan,
    parse_size,
    plan_from_doc,
    plan_from_text,
    step_types,
)

__all__ = [
    "BUILTIN_STEPS",
    "MAX_LAYERS",
    "Drop",
    "Dus",
    "Expand",
    "Gstack",
    "Merge",
    "MergeSource",
    "ModelRef",
    "Output",
    "Override",
    "Plan",
    "PlanBody",
    "ScaleStep",
    "Stack",
    "Step",
    "Strict",
    "Take",
    "TokenizerOptions",
    "Upcycle",
    "Widen",
    "_problems",
    "load_plan",
    "parse_size",
    "plan_from_doc",
    "plan_from_text",
    "step_types",
]
