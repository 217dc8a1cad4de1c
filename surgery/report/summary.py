"""What `validate` reports and what `surgery.json` records, from one Program."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from surgery._version import __version__
from surgery.io.checkpoint import Checkpoint
from surgery.io.safetensors import dtype_name
from surgery.compile import Program
from surgery.errors import Problem

REPORT_FORMAT = "surgery.validate/2"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, k in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= k:
            return f"{n / k:.2f}{unit}"
    return str(n)


def source_summary(ck: Checkpoint) -> dict:
    return {
        "ref": ck.ref,
        "path": str(ck.path),
        "family": ck.family.name,
        "family_guessed": ck.family.guessed,
        "model_type": ck.config.get("model_type"),
        "num_layers": ck.num_layers,
        "dtype": dtype_name(ck.dtype),
        "parameters": ck.num_params,
        "bytes": ck.nbytes,
        "tied_embeddings": ck.tied,
        "files": sorted(ck.header_hashes),
        "pickled": ck.pickled,
    }


@dataclass
class Report:
    """The result of `validate`: valid or not, the problems, and what `apply` would write."""

    plan: str
    valid: bool
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    program: Program | None = None

    def passed(self, strict: bool = False) -> bool:
        """Valid, and with --strict also free of warnings."""
        return self.valid and not (strict and self.warnings)

    @property
    def layer_map(self) -> list[dict]:
        return self.program.layer_map() if self.program else []

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "plan": self.plan,
            "valid": self.valid,
            "errors": [p.as_dict() for p in self.problems],
            "warnings": [w.as_dict() for w in self.warnings],
        }
        p = self.program
        if p is not None:
            d.update(
                {
                    "sources": {n: source_summary(c) for n, c in p.ckpts.items()},
                    "output": {
                        "num_layers": p.num_layers,
                        "dtype": dtype_name(p.dtype),
                        "parameters": p.num_params,
                        "bytes": p.bytes_out,
                        "bytes_read": p.bytes_in,
                        "tensors": len(p.tensors),
                        "shards": [{"name": s.name, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in p.shards],
                        "new_layers": p.new_layers,
                        "config_changes": p.config_changes,
                        "family": p.family.name,
                    },
                    "layer_map": p.layer_map(),
                }
            )
        return d

    def text(self, *, tensors: bool = False) -> str:
        out = []
        if not self.valid:
            out.append(f"INVALID: {self.plan}")
            out += [f"  error: {str(pr)}".replace("\n", "\n    ") for pr in self.problems]
            return "\n".join(out)
        p = self.program
        assert p is not None
        out.append(f"valid: {self.plan}")
        for n, c in p.ckpts.items():
            out.append(
                f"  model {n}: {_shown_path(c)}  [{c.family.name}, {c.num_layers} layers, {human_count(c.num_params)} params, "
                f"{dtype_name(c.dtype)}{', tied embeddings' if c.tied else ''}]"
            )
        out.append(
            f"  output: {p.num_layers} layers, {human_count(p.num_params)} params, {dtype_name(p.dtype)}, "
            f"{len(p.tensors)} tensors in {len(p.shards)} shard(s)"
        )
        out.append(f"  bytes: read {human_bytes(p.bytes_in)}, write {human_bytes(p.bytes_out)}")
        if p.config_changes:
            out.append("  config: " + "; ".join(p.config_changes))
        out.append("  layer map (output <- source, how):")
        width = len(str(p.num_layers - 1))
        for row in p.layer_map():
            mark = "+" if row["new"] else " "
            out.append(f"   {mark}{row['layer']:>{width}} <- {row['source']:<28} {row['how']}")
        if p.new_layers:
            out.append(f"  new layers (+): {p.new_layers}")
        if tensors:
            out.append("  tensors:")
            for s in p.shards:
                for t in s.tensors:
                    out.append(f"    {s.name}  {t.name}  {t.recipe.dtype} {list(t.recipe.shape)}  {t.recipe.describe()}")
        for w in self.warnings:
            out.append(f"  warning: {w}".replace("\n", "\n    "))
        return "\n".join(out)


def provenance(program: Program, shard_info: list[dict]) -> dict:
    """The content of `surgery.json`: enough to know what was done, from what, and which layers are new."""
    plan = program.plan
    widened = program.widened()
    return {
        "format": "surgery/1",
        "surgery_version": __version__,
        "plan": {
            "source": plan.source,
            "content": plan.raw,
            "seed": plan.body.seed,
            **({"mergekit_config": plan.mergekit} if plan.mergekit is not None else {}),
        },
        "sources": {n: {**source_summary(c), "header_sha256": c.header_hashes} for n, c in program.ckpts.items()},
        "config_model": program.config_model,
        "output": {
            "num_layers": program.num_layers,
            "dtype": dtype_name(program.dtype),
            "parameters": program.num_params,
            "bytes": program.bytes_out,
            "shards": shard_info,
            "config_changes": program.config_changes,
        },
        "layer_map": program.layer_map(),
        "new_layers": program.new_layers,
        **({"widened": widened} if widened else {}),
        "warnings": [str(w) for w in program.warnings],
    }


def _shown_path(c: Checkpoint) -> str:
    from surgery.io.hub import manifest

    m = manifest(c.path)
    if m is not None:  # a header-only view of a hub model
        return f"{c.ref} @ {m.get('commit', '')[:12]} (hub, headers only)"
    return str(c.path)


def envelope(reports: list[Report], *, strict: bool = False) -> dict[str, Any]:
    """The `--format json` document: versioned, one entry per plan (schema: `surgery schema --report`)."""
    return {
        "format": REPORT_FORMAT,
        "surgery_version": __version__,
        "strict": strict,
        "valid": all(r.passed(strict) for r in reports),
        "plans": [{**r.as_dict(), "passed": r.passed(strict)} for r in reports],
    }


_LOC = re.compile(r"^(?P<file>.+?\.(?:ya?ml|json)):(?P<line>\d+)$")


def _esc_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _esc_prop(s: str) -> str:
    return _esc_data(s).replace(":", "%3A").replace(",", "%2C")


def _relative(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def as_github(reports: list[Report], *, strict: bool = False) -> str:
    """GitHub Actions workflow commands: `::error file=F,line=L,title=T::message`, one per problem
    and warning (warnings are errors with --strict), so they show on the pull request's lines."""
    lines = []
    for r in reports:
        items = [("error", p) for p in r.problems] + [("error" if strict else "warning", w) for w in r.warnings]
        for level, p in items:
            m = _LOC.match(p.where or "")
            file, line = (m.group("file"), m.group("line")) if m else (r.plan, None)
            msg = p.what if m else (f"{p.where}: {p.what}" if p.where else p.what)
            if p.fix:
                msg += f"\nfix: {p.fix}"
            title = f"surgery validate{': ' + p.code if p.code else ''}"
            props = f"file={_esc_prop(_relative(file))}" + (f",line={line}" if line else "") + f",title={_esc_prop(title)}"
            lines.append(f"::{level} {props}::{_esc_data(msg)}")
        if not items and r.valid:
            lines.append(
                f"::notice file={_esc_prop(_relative(r.plan))},title=surgery validate::valid: "
                f"{r.program.num_layers} layers, {human_count(r.program.num_params)} parameters"
            )
    return "\n".join(lines)
