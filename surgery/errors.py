"""One error type for everything a user can get wrong.

`SurgeryError` is a `ValueError`: plan mistakes, bad checkpoints, refused outputs. Each problem
says *where* (plan file:line, a tensor or file name), *what* is wrong and, when there is one, the
*fix* or the valid options. The CLI prints these without a traceback and exits non-zero.
`assert` is kept for internal invariants only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    where: str | None
    what: str
    fix: str | None = None
    code: str | None = None  # warnings carry a stable code (`duplicated-layers`, ...) for --ignore

    def __str__(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        head = f"{head} [{self.code}]" if self.code else head
        return f"{head}\n  fix: {self.fix}" if self.fix else head

    def as_dict(self) -> dict:
        d = {"where": self.where, "what": self.what, "fix": self.fix}
        return {**d, "code": self.code} if self.code else d


class SurgeryError(ValueError):
    """A user error: one or more problems, each with a location and a fix."""

    def __init__(self, problems: Problem | list[Problem] | str, *, where: str | None = None, fix: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(where, problems, fix)]
        elif isinstance(problems, Problem):
            problems = [problems]
        assert problems, "SurgeryError needs at least one problem"
        # one mistake found on several paths (a widen error met by every layer) is said once
        self.problems: list[Problem] = list(dict.fromkeys(problems))
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"]
        lines += [f"- {p}".replace("\n", "\n  ") for p in self.problems]
        return "\n".join(lines)


class PlanError(SurgeryError):
    """The plan itself is wrong (schema, names, ranges)."""


class CheckpointError(SurgeryError):
    """A source checkpoint is missing, refused, or corrupt."""


class OutputError(SurgeryError):
    """The output cannot be written where or how it was asked for."""
