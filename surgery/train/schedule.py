"""The learning-rate schedule as a pure function of the step (nanoGPT's `get_lr` is the model):
linear warmup, then cosine to a floor, linear to zero, or constant. A stage may start part-way along
a longer schedule (`grow: {schedule: continue}`): `offset` is where, `total` the schedule's length."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    name: str = "cosine"  # cosine | linear | constant
    total: int = 1  # steps the schedule spans
    warmup: int = 0  # warmup steps (from the schedule's start)
    floor: float = 0.0  # cosine decays to lr * floor
    offset: int = 0  # the schedule's step at this stage's step 0

    def factor(self, step: int) -> float:
        """The multiplier of the peak LR at this stage's optimizer step `step`."""
        return lr_factor(step + self.offset, self.name, self.total, self.warmup, self.floor)


def lr_factor(step: int, name: str, total: int, warmup: int, floor: float = 0.0) -> float:
    """The multiplier of the peak LR at schedule step `step`: (step + 1) / (warmup + 1) during warmup,
    then 1 (constant), 1 - p (linear) or floor + (1 - floor) (1 + cos(pi p)) / 2 (cosine), where
    p = (step - warmup) / (total - warmup), held at 1 past the end."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "linear":
        return 1.0 - progress
    if name != "cosine":
        raise ValueError(f"schedule {name!r}: cosine, linear or constant")
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
