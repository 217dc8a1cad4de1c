"""`surgery verify --sources OUT`: recompute every tensor of an output from the sources recorded
in its surgery.json and compare it with what is on disk, byte for byte (for outputs whose sources
are still at hand). Memory stays bounded: tensors are recomputed chunk by chunk, as `apply` made them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from surgery.compile import compile_plan
from surgery.engine.evaluate import Evaluator
from surgery.engine.read import Sources, torch_dtype
from surgery.errors import Problem, SurgeryError
from surgery.io.safetensors import read_safetensors_header
from surgery.plan import plan_from_doc
from surgery.io.provenance import read_provenance
from surgery.plan.yamlio import Located


def recompute(out: str | Path, *, allow_pickle: bool = False) -> list[Problem]:
    import torch

    out = Path(out)
    prov_path = out / "surgery.json"
    prov = read_provenance(out, required=True).record()
    try:
        content = prov["plan"]["content"]
        sources = {n: s["path"] for n, s in prov["sources"].items()}
        seed = prov["plan"].get("seed")
    except (KeyError, TypeError):
        return [
            Problem(
                str(prov_path),
                "surgery.json records no plan and sources to recompute from",
                "this output was not written by `surgery apply` (or by an older version)",
            )
        ]
    if not isinstance(content, dict) or not all(isinstance(p, str) for p in sources.values()):
        return [Problem(str(prov_path), "surgery.json's plan or sources are not in the expected form")]
    content = {**content, "models": dict(sources)}  # the recorded, resolved source folders
    plan = plan_from_doc(Located(content, f"{prov_path} (recorded plan)"), out)
    if seed is not None:
        plan = replace(plan, body=plan.body.model_copy(update={"seed": seed}))
    try:
        program = compile_plan(plan, allow_pickle=allow_pickle)
    except SurgeryError as e:
        return [Problem(p.where, f"cannot recompute: {p.what}", p.fix) for p in e.problems]
    problems: list[Problem] = []
    srcs = Sources(compute_slots=1)
    try:
        srcs.open_all(program)
        ev_step = srcs.chunk_elements
        for shard in program.shards:
            path = out / shard.name
            if not path.is_file():
                problems.append(Problem(str(path), "missing"))
                continue
            on_disk, _ = read_safetensors_header(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                for t in shard.tensors:
                    info = on_disk.get(t.name)
                    if info is None or info.dtype != t.recipe.dtype or tuple(info.shape) != tuple(t.recipe.shape):
                        problems.append(Problem(f"{path}: tensor {t.name!r}", "missing, or its dtype or shape differs"))
                        continue
                    ev = Evaluator(srcs)
                    r = t.recipe
                    whole = ev.full(r).reshape(-1) if r.needs_whole() else None
                    isz = torch.tensor([], dtype=torch_dtype(r.dtype)).element_size()
                    for e0 in range(0, r.numel, ev_step):
                        e1 = min(r.numel, e0 + ev_step)
                        want = (whole[e0:e1] if whole is not None else ev.chunk(r, e0, e1)).contiguous().cpu()
                        got = os.pread(fd, (e1 - e0) * isz, info.offset + e0 * isz)
                        if want.view(-1).view(torch.uint8).numpy().tobytes() != got:
                            problems.append(
                                Problem(
                                    f"{path}: tensor {t.name!r}",
                                    f"differs from a recomputation from the sources (elements {e0}..{e1})",
                                    "apply the plan again",
                                )
                            )
                            break
            finally:
                os.close(fd)
    finally:
        srcs.close()
    return problems
