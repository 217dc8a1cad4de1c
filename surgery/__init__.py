"""surgery: checkpoint surgery and model growth for HuggingFace transformer checkpoints.

The Python API mirrors the CLI, which is a thin layer over it:

    plan = surgery.load_plan("plan.yaml")
    report = surgery.validate(plan)          # reads headers only
    result = surgery.apply(plan, "out/")     # streams the new checkpoint
"""

__version__ = "0.1.0"

from .api import apply, inspect_model, load_plan, validate  # noqa: E402
from .errors import CheckpointError, OutputError, PlanError, Problem, SurgeryError  # noqa: E402

__all__ = ["apply", "validate", "load_plan", "inspect_model", "SurgeryError", "PlanError", "CheckpointError",
           "OutputError", "Problem", "__version__"]
