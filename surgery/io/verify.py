"""`surgery verify OUT`: is an output folder whole and what surgery.json says it is?"""

from __future__ import annotations

from pathlib import Path

from surgery.io.safetensors import header_sha256, read_safetensors_header
from surgery.io.safetensors import file_crc32
from surgery.errors import Problem, SurgeryError
from surgery.io.provenance import Provenance, read_provenance
from surgery.jsonio import read_json


def verify_output(out: str | Path) -> list[Problem]:
    out = Path(out)
    if not out.is_dir():
        return [
            Problem(str(out), "no such folder" if not out.exists() else "not a folder", "give the output folder that `surgery apply` wrote")
        ]
    problems: list[Problem] = []
    index_path, prov_path = out / "model.safetensors.index.json", out / "surgery.json"
    for f in (index_path, prov_path, out / "config.json"):
        if not f.is_file():
            problems.append(Problem(str(f), "missing", "the output is incomplete: apply it again (or --resume)"))
    if problems:
        return problems
    try:
        index = read_json(index_path)
        prov = read_provenance(out, required=True)
    except SurgeryError as e:
        return e.problems
    problems += _check_config(out / "config.json", prov)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return [Problem(str(index_path), "not a valid index (needs a 'weight_map' object of tensor -> file name)")]
    recorded = prov.shards
    if not isinstance(recorded, list) or not all(_valid_entry(e) for e in recorded):
        return [
            Problem(
                str(prov_path),
                "output.shards is not a list of {name, bytes, header_sha256, sha256} records",
                "the file is damaged or not written by this version of surgery; apply the plan again",
            )
        ]
    shards = {e["name"]: e for e in recorded}
    by_file: dict[str, set[str]] = {}
    for tensor, fname in weight_map.items():
        by_file.setdefault(fname, set()).add(tensor)
    for fname in sorted(set(by_file) | set(shards)):
        if not _plain_name(fname):  # never look outside the output folder, whatever the files say
            problems.append(
                Problem(str(prov_path if fname in shards else index_path), f"names {fname[:80]!r}, which is not a file in this folder")
            )
            continue
        path = out / fname
        where = str(path)
        if fname not in shards:
            problems.append(Problem(str(index_path), f"names {fname}, which surgery.json does not record"))
            continue
        if path.is_symlink() or not path.is_file():
            problems.append(Problem(where, "missing" if not path.exists() and not path.is_symlink() else "not a regular file"))
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
            continue
        digest = want.get("crc32")
        if digest is None:
            problems.append(
                Problem(
                    where,
                    "surgery.json records no content hash for this shard (written by an older "
                    "surgery): only its size and header were checked",
                    code="no-content-hash",
                )
            )
        elif file_crc32(path) != digest:
            problems.append(
                Problem(where, "content differs from what was written (crc32 mismatch): the data is damaged", "apply the plan again")
            )
    return problems


def _check_config(path: Path, prov: Provenance) -> list[Problem]:
    """config.json is one of the small files verify answers for: it must parse as an object with a
    model_type and, for an apply output, state the layer count surgery.json records."""
    try:
        cfg = read_json(path)
    except SurgeryError as e:
        return e.problems
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        return [Problem(str(path), "is not a model config (a JSON object with a model_type)", "apply the plan again")]
    want = (prov.output or {}).get("num_layers")
    if isinstance(want, int):
        lm = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        have = next((lm[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(lm.get(k), int)), None)
        if have is not None and have != want:
            return [Problem(str(path), f"says {have} layers; surgery.json records {want}", "the config was edited: apply the plan again")]
    return []


def _valid_entry(e) -> bool:
    return (
        isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and isinstance(e.get("bytes"), int)
        and not isinstance(e.get("bytes"), bool)
        and isinstance(e.get("header_sha256"), str)
        and isinstance(e.get("crc32"), (str, type(None)))
    )


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and not name.startswith(".") and len(name) < 256
