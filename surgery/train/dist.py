"""Which process this is in a distributed run (torchrun / accelerate set RANK and WORLD_SIZE), and
waiting for the others. One process is the same code with rank 0 of 1."""

from __future__ import annotations

import os


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier():
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
