"""The library functions the CLI, the tests and plugins all call."""

from __future__ import annotations

from pathlib import Path

from surgery.io.checkpoint import open_checkpoint, resolve_ref
from surgery.compile import Program, compile_plan
from surgery.engine import Result, execute
from surgery.errors import OutputError, SurgeryError
from surgery.plan import Plan, load_plan
from surgery.report.summary import Report, source_summary

__all__ = ["load_plan", "validate", "apply", "inspect_model", "compile_plan"]


def _as_plan(plan: Plan | str | Path) -> Plan:
    return plan if isinstance(plan, Plan) else load_plan(plan)


def validate(
    plan: Plan | str | Path, *, allow_pickle: bool = False, offline: bool = False, ignore: set[str] | frozenset = frozenset()
) -> Report:
    """Check a plan against its models' configs and headers; read no tensor data (hub models:
    config, index and headers fetched with ranged requests, cached by revision; `offline`: the
    local caches only). Warnings whose code is in `ignore` are dropped.

    Never raises for a bad plan: the report says `valid: False` with every problem located."""
    source = str(plan.source if isinstance(plan, Plan) else plan)
    try:
        p = _as_plan(plan)
        program = compile_plan(p, allow_pickle=allow_pickle, headers_only=True, offline=offline)
    except SurgeryError as e:
        return Report(source, False, e.problems)
    except OSError as e:  # the file system refused a path the plan or a model names: located, as apply says it
        from surgery.errors import Problem

        where = str(e.filename)[:300] if e.filename else source
        return Report(source, False, [Problem(where, f"{e.strerror or e}", "check the paths the plan and its models name")])
    return Report(source, True, warnings=[w for w in program.warnings if w.code not in ignore], program=program)


def validate_many(patterns, **kw) -> list[Report]:
    """`validate` for several plan files or globs (`plans/**/*.yaml`), in a stable order."""
    import glob

    from surgery.errors import Problem

    reports: list[Report] = []
    for pat in patterns:
        pat = str(pat)
        if glob.has_magic(pat) and not Path(pat).is_file():  # 'plan[v2].yaml' that exists is a file
            files = sorted(f for f in glob.glob(pat, recursive=True) if Path(f).is_file())
            if not files:
                reports.append(
                    Report(
                        pat,
                        False,
                        [Problem(pat, "no files match this pattern", "check the glob (quote it so the shell does not expand it)")],
                    )
                )
            reports += [validate(f, **kw) for f in files]
        elif not Path(pat).is_file():
            reports.append(
                Report(
                    pat,
                    False,
                    [
                        Problem(
                            pat,
                            "plan file not found" if not Path(pat).is_dir() else "is a folder, not a plan file",
                            "give a plan file or a glob",
                        )
                    ],
                )
            )
        else:
            reports.append(validate(pat, **kw))
    return reports


def apply(
    plan: Plan | str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    progress: bool | None = None,
    allow_pickle: bool = False,
    workers: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    max_memory: int | None = None,
    resume: bool = False,
    pipeline: str = "off",
    stats: str | Path | None = None,
) -> Result:
    """Compile the plan and write the checkpoint to `out` (default: the plan's `output.path`).
    `seed` overrides the plan's seed for random merge methods; `device` (auto, cpu, cuda, cuda:N)
    is where computed tensors are made (copies never leave the host); `max_memory` (bytes) bounds
    the compute working set; `pipeline` ("off", "on", "host") and `stats` (a file for device and
    memory figures) are for GPU tuning and bench/ (see engine.execute)."""
    from surgery.io.outdir import output_path

    p = _as_plan(plan)
    if seed is not None:
        from dataclasses import replace

        p = replace(p, body=p.body.model_copy(update={"seed": seed}))
    if out is None:
        if p.body.output.path is None:
            raise OutputError(
                "no output folder given",
                where=p.where("output"),
                fix="pass -o OUT on the command line or set `output: {path: ...}` in the plan",
            )
        out = p.body.output.path
        out = output_path(out if Path(out).expanduser().is_absolute() else p.base_dir / out, option="output.path")
    else:
        out = output_path(out)
    program = compile_plan(p, allow_pickle=allow_pickle)
    reads = {"the plan": Path(p.doc.source)} if Path(p.doc.source).is_file() else {}
    return execute(
        program,
        out,
        force=force,
        progress=progress,
        workers=workers,
        device=device,
        max_memory=max_memory,
        resume=resume,
        pipeline=pipeline,
        stats=stats,
        reads=reads,
    )


def inspect_model(ref: str | Path, *, allow_pickle: bool = False) -> dict:
    """Family, layers, parameters, dtypes, shards and tied embeddings of one checkpoint."""
    path = resolve_ref(str(ref), Path.cwd())
    ck = open_checkpoint("model", str(ref), path, allow_pickle=allow_pickle)
    dtypes: dict[str, int] = {}
    for t in ck.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    info = source_summary(ck)
    info.update(
        {
            "dtypes": dtypes,
            "tensors": len(ck.tensors),
            "non_layer_tensors": ck.non_layer,
            "layer_tensors": sorted(ck.layers[0]) if ck.layers else [],
            "output_projections": [s for s in sorted(ck.layers[0]) if ck.family.is_output_projection(s)] if ck.layers else [],
            "layer_prefix": ck.family.layer_prefix,
            "family_notes": ck.family.notes,
        }
    )
    return info


__all__ += ["Program", "Result", "Report"]
