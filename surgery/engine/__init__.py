"""The streaming engine: a Program -> an output folder, in memory bounded by the tensors in flight.

read.py      source files opened once and checked; pread into host or device tensors
evaluate.py  recipes evaluated chunk by chunk, or on whole tensors where a method needs them
staging.py   the opt-in pipelined device staging (pinned buffers, streams)
write.py     shards (raw copies and computed tensors), hashes, resume record, metadata, publish
"""

from surgery.engine.evaluate import Evaluator
from surgery.engine.read import CHUNK_ELEMENTS, Sources, torch_dtype
from surgery.engine.staging import StagedIO
from surgery.engine.write import Result, copy_pieces, execute, plan_memory, resolve_device, shard_header, write_shard

__all__ = [
    "CHUNK_ELEMENTS",
    "Evaluator",
    "Result",
    "Sources",
    "StagedIO",
    "copy_pieces",
    "execute",
    "plan_memory",
    "resolve_device",
    "shard_header",
    "torch_dtype",
    "write_shard",
]
