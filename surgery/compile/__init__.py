"""Compile: a plan and its models' headers -> a Program (the layer map, every output tensor's
recipe, the output config, the shard layout). Reads headers and configs only, never tensor data.

    stack.py      the layer stack and each step's operation on it (pure list transforms)
    tensors.py    output tensors and their recipes (merges resolved per tensor, vocabularies realigned)
    outconfig.py  the output config.json (a pure function of the base config and the layer map)
    program.py    compile_plan: the above in order, plus the shard layout and chat template
    lint.py       coded warnings (validate)
    export.py     a Program as a mergekit config
"""

from surgery.compile.program import Program, Shard, compile_plan, model_chat_template, open_models, shard_name
from surgery.compile.stack import BUILTIN_OPS, Ctx, LayerSpec, merge_conditions, merge_ranges
from surgery.compile.tensors import OutTensor

__all__ = [
    "BUILTIN_OPS",
    "Ctx",
    "LayerSpec",
    "OutTensor",
    "Program",
    "Shard",
    "compile_plan",
    "merge_conditions",
    "merge_ranges",
    "model_chat_template",
    "open_models",
    "shard_name",
]
