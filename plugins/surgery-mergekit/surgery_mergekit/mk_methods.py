"""surgery's operations as mergekit merge methods. (No `from __future__ import annotations`:
mergekit's `merge_method` reads the annotations at definition time.)"""

from typing import Optional

import torch
from mergekit.merge_methods.base import InputContract, PerInput, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from .commands import is_output_projection


@merge_method(
    name="surgery_identity",
    pretty_name="surgery identity blocks",
    uses_accelerator=False,
    contract=InputContract(max_inputs=1),
)
def surgery_identity(group: TensorGroup, identity: PerInput[bool] = False, scale: PerInput[Optional[float]] = None) -> torch.Tensor:
    entry = group.entries[0]
    tensor = entry.tensor
    if identity[entry.id] and is_output_projection(group.metadata.name):
        return torch.zeros_like(tensor)
    value = scale[entry.id]
    return tensor if value is None else tensor * value
