"""surgery: checkpoint surgery and model growth for HuggingFace transformer checkpoints.

The Python API mirrors the CLI, which is a thin layer over it:

    plan = surgery.load_plan("plan.yaml")
    report = surgery.validate(plan)          # reads headers only
    result = surgery.apply(plan, "out/")     # streams the new checkpoint
"""

from surgery._version import __version__
from surgery.api import apply, inspect_model, load_plan, validate
from surgery.errors import CheckpointError, OutputError, PlanError, Problem, SurgeryError

__all__ = [
    "apply",
    "validate",
    "load_plan",
    "inspect_model",
    "SurgeryError",
    "PlanError",
    "CheckpointError",
    "OutputError",
    "Problem",
    "__version__",
]
