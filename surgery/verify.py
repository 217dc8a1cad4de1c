"""`surgery verify OUT`: is an output folder whole and what surgery.json says it is?"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import header_sha256, read_safetensors_header
from .errors import Problem, SurgeryError


def verify_output(out: str | Path) -> list[Problem]:
    out = Path(out)
    problems: list[Problem] = []
    index_path, prov_path = out / "model.safetensors.index.json", out / "surgery.json"
    for f in (index_path, prov_path, out / "config.json"):
        if not f.is_file():
            problems.append(Problem(str(f), "missing", "the output is incomplete: apply it again (or --resume)"))
    if problems:
        return problems
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = {s["name"]: s for s in json.loads(prov_path.read_text())["output"]["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        return [Problem(str(out), f"index or surgery.json unreadable: {e}")]
    by_file: dict[str, set[str]] = {}
    for tensor, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(tensor)
    for fname in sorted(set(by_file) | set(shards)):
        path = out / fname
        where = str(path)
        if fname not in shards:
            problems.append(Problem(str(index_path), f"names {fname}, which surgery.json does not record"))
            continue
        if not path.is_file():
            problems.append(Problem(where, "missing"))
            continue
        want = shards[fname]
        size = path.stat().st_size
        if size != want["bytes"]:
            problems.append(Problem(where, f"has {size:,} bytes; surgery.json records {want['bytes']:,}"))
            continue
        if header_sha256(path) != want["header_sha256"]:
            problems.append(Problem(where, "header differs from the one surgery.json records"))
            continue
        try:
            tensors, _ = read_safetensors_header(path)
        except SurgeryError as e:
            problems += e.problems
            continue
        if set(tensors) != by_file.get(fname, set()):
            diff = sorted(set(tensors) ^ by_file.get(fname, set()))[:3]
            problems.append(Problem(where, f"tensors disagree with the index (e.g. {diff})"))
    return problems
