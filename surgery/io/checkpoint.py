"""Source checkpoints as catalogs: config, family, and every tensor's file, dtype, shape and byte range.

Only `config.json`, the index and the safetensors headers are read here, never tensor data, so
`validate` is cheap and a corrupt file is found before anything is written. Headers are checked
like a hostile input: bounded length, valid JSON, known dtypes, byte ranges that match
dtype x shape, lie inside the file and do not overlap. Pickled checkpoints are refused unless the
caller opts in, and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from surgery.arch import Family, detect_family
from surgery.errors import CheckpointError, Problem
from surgery.jsonio import read_json
from surgery.io.paths import resolve_path
from surgery.io.safetensors import DTYPES, FLOAT_CODES, TensorInfo, read_safetensors_header

SMALL_FILES = re.compile(
    r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|generation_config\.json"
    r"|chat_template.*|preprocessor_config\.json|.*\.tiktoken|spiece\.model|sentencepiece.*\.model)$"
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    name: str
    ref: str
    path: Path
    config: dict
    family: Family
    num_layers: int
    tensors: dict[str, TensorInfo]
    layers: list[dict[str, str]]  # layer index -> {suffix: tensor name}
    non_layer: list[str]
    header_hashes: dict[str, str]
    pickled: bool = False

    @property
    def tied(self) -> bool:
        v = self.config.get("tie_word_embeddings")
        if v is None:
            v = self.family.lm_config(self.config).get("tie_word_embeddings", False)
        return bool(v)

    @property
    def dtype(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_CODES:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return max(counts, key=counts.get) if counts else "F32"

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# --------------------------------------------------------------------------------------------
# folders and refs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_ref(
    ref: str, base_dir: Path, *, revision: str | None = None, where: str | None = None, headers_only: bool = False, offline: bool = False
) -> Path:
    """A model ref is a local folder (relative to the plan's folder) or a hub id (`org/name`).

    `headers_only` (validate): a hub model not fully in the local cache is seen through a
    header-only view (config, index, safetensors headers; no tensor data, see hub.py)."""
    local = resolve_path(ref, base_dir, where)
    if local.is_dir():
        return local.resolve()
    if local.suffix.lower() == ".gguf" and local.is_file():  # llama.cpp's format: converted once into the cache
        from surgery.errors import SurgeryError
        from surgery.io.gguf import cached_conversion

        try:
            return cached_conversion(local)
        except SurgeryError as e:
            raise CheckpointError(
                [Problem(where or p.where, f"{ref}: {p.where}: {p.what}" if where else p.what, p.fix) for p in e.problems]
            ) from None
    looks_local = ref.startswith((".", "/", "~")) or local.exists() or not _HUB_ID.match(ref)
    if looks_local:
        if local.exists():
            raise CheckpointError(
                f"model {ref!r} is a file, not a folder ({local})",
                where=where,
                fix="point the model at the checkpoint's folder (the one with config.json)",
            )
        raise CheckpointError(
            f"model folder not found: {ref!r} (looked in {local.resolve()})",
            where=where,
            fix="check the path; relative paths are relative to the plan file's folder",
        )
    if headers_only:
        local_snapshot = _cached_snapshot(ref, revision)
        if local_snapshot is not None:
            return local_snapshot
        from surgery.io.hub import header_view

        return header_view(ref, revision, where, offline=offline)
    return _hub_snapshot(ref, revision, where)


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.*", "*.jinja"]


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The model's folder in the hub cache, when it is there with its weights (no network)."""
    from huggingface_hub import snapshot_download

    try:
        p = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_PATTERNS,
                local_files_only=True,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            )
        )
    except Exception:  # not cached (the hub client raises several types for that)
        return None
    return p if (p / "config.json").is_file() and any(p.glob("*.safetensors")) else None


def _hub_snapshot(repo_id: str, revision: str | None, where: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = HUB_PATTERNS
    # read at call time (huggingface-hub reads HF_HUB_CACHE once, at its import)
    cache = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(
            f"hub model {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set",
            where=where,
            fix="download it first (huggingface-cli download) or give a local folder",
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache))
    except Exception as e:  # HfHubHTTPError, httpx's connection errors, OSError, ...: the model could not be fetched
        raise CheckpointError(
            f"cannot fetch hub model {repo_id!r}: {type(e).__name__}: {e}".splitlines()[0],
            where=where,
            fix="check the repo id and your network/token, or give a local folder",
        ) from None


def _inside(folder: Path, name: str) -> Path | None:
    """`folder/name` if it stays inside `folder` (no '..', absolute paths or symlinks leading out)."""
    if not name or os.path.isabs(name) or "\\" in name:
        return None
    target = (folder / name).resolve()
    try:
        target.relative_to(folder.resolve())
    except ValueError:
        return None
    return target


MAX_CONFIG_LAYERS = 100_000  # far above any real model; bounds what a hostile config can make surgery allocate

# config.json fields surgery reads, with the JSON types they must have
_CONFIG_TYPES = {
    "model_type": (str,),
    "num_hidden_layers": (int,),
    "n_layer": (int,),
    "num_layers": (int,),
    "hidden_size": (int,),
    "intermediate_size": (int,),
    "num_attention_heads": (int,),
    "num_key_value_heads": (int,),
    "vocab_size": (int,),
    "tie_word_embeddings": (bool,),
    "max_window_layers": (int,),
    "layer_types": (list,),
    "architectures": (list,),
    "head_dim": (int,),
}


def check_config_types(config: dict, where: str) -> None:
    """Wrong JSON types and absurd layer counts in the fields surgery reads are located errors."""
    problems = []
    for key, types in _CONFIG_TYPES.items():
        v = config.get(key)
        if v is None:
            continue
        ok = isinstance(v, types) and not (bool not in types and isinstance(v, bool))
        if not ok:
            problems.append(
                Problem(f"{where}: {key}", f"must be {'/'.join(t.__name__ for t in types)}, got {type(v).__name__} {json.dumps(v)[:60]}")
            )
        elif isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= (MAX_CONFIG_LAYERS if "layer" in key else 1 << 40):
            problems.append(
                Problem(
                    f"{where}: {key}",
                    f"{v} is out of range" + (f" (surgery handles at most {MAX_CONFIG_LAYERS:,} layers)" if "layer" in key else ""),
                )
            )
    if problems:
        raise CheckpointError(problems)


def open_checkpoint(name: str, ref: str, path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    where = f"model {name!r} ({path})"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{where} has no config.json", fix="point the model at a HuggingFace checkpoint folder")
    config = read_json(cfg_path, error=CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError("config.json is not a JSON object", where=str(cfg_path))
    check_config_types(config, str(cfg_path))
    for nested in ("text_config", "language_config", "llm_config"):
        if isinstance(config.get(nested), dict):
            check_config_types(config[nested], f"{cfg_path}: {nested}")

    tensors, hashes, pickled = _read_weights(path, where, allow_pickle)
    family = detect_family(config, list(tensors), where)
    n_cfg = family.num_layers(config)
    layers: dict[int, dict[str, str]] = {}
    non_layer: list[str] = []
    for tname in tensors:
        s = family.split(tname)
        if s is None:
            non_layer.append(tname)
        else:
            layers.setdefault(s[0], {})[s[1]] = tname
    found = sorted(layers)
    if n_cfg is None:
        raise CheckpointError(
            f"config.json has no layer count ({family.num_layers_key})",
            where=str(cfg_path),
            fix=f"the tensors hold {len(found)} layers; set {family.num_layers_key}: {len(found)}",
        )
    if found != list(range(n_cfg)):
        raise CheckpointError(
            f"config.json says {family.num_layers_key} = {n_cfg} but the tensors hold layers "
            f"{_ranges(found) or 'none'} under '{family.layer_prefix}'",
            where=where,
            fix="the config and the weights disagree: fix config.json or use the matching weights",
        )
    if not family.guessed and layers:
        _check_widths(config, family, tensors, layers[found[0]], str(cfg_path))
    return Checkpoint(
        name=name,
        ref=ref,
        path=path,
        config=config,
        family=family,
        num_layers=n_cfg,
        tensors=tensors,
        layers=[layers[i] for i in range(n_cfg)],
        non_layer=non_layer,
        header_hashes=hashes,
        pickled=pickled,
    )


def _check_widths(config: dict, family: Family, tensors: dict, layer: dict[str, str], where: str) -> None:
    """The tensors are the truth: every width config.json states (hidden size, vocabulary, heads and
    head size, key/value heads, MLP units) must be the one the tensors' shapes have, or every step
    that derives shapes from the config (widen, analyze, training, transformers' own loading) would
    build on a contradiction. Checked where headers are read, so every command gets it."""
    lm = family.lm_config(config)

    def num(key):
        v = lm.get(key) if key else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    seen: dict[str, list] = {}  # one problem per config value, naming the first tensor that contradicts it

    def expect(tname: str, dim: int, want: int | None, what: str) -> None:
        shape = tensors[tname].shape
        if want is None or not -len(shape) <= dim < len(shape) or shape[dim] == want:
            return
        seen.setdefault(f"{what} = {want}", []).append((tname, shape, dim))

    hidden, vocab = num(family.hidden_key), num("vocab_size")
    for e in family.embeddings:
        if e in tensors and len(tensors[e].shape) == 2:
            expect(e, 1, hidden, family.hidden_key)
            expect(e, 0, vocab, "vocab_size")
    heads, kv = num(family.heads_key), num(family.kv_heads_key) or num(family.heads_key)
    try:
        hd = family.head_size(lm)
    except Exception:  # a config too broken to say: the other checks still run
        hd = None
    hd = hd if isinstance(hd, int) and hd > 0 else None
    for suffix, tname in layer.items():
        role = family.hidden_role(suffix)
        if role is not None:
            expect(tname, role[1], hidden, family.hidden_key)
        entry = family.attention_entry(suffix)
        if entry is not None and hd and heads and kv:
            r, hdim = entry
            rows = 0 if hdim is None else hdim
            want = {"q": heads * hd, "k": kv * hd, "v": kv * hd, "qkv": (heads + 2 * kv) * hd, "qkv_per_head": 3 * heads * hd}.get(r)
            if r == "o":
                expect(tname, 1 if hdim is None else hdim, heads * hd, f"{family.heads_key} x head size ({heads} x {hd})")
            elif want is not None:
                expect(tname, rows, want, f"{family.heads_key}/{family.kv_heads_key} x head size ({heads}/{kv} x {hd})")
        mlp = family.mlp_role(suffix)
        if mlp is not None:
            kind, dim, parts = mlp
            key = family.mlp_size_key(suffix)
            size = num(key)
            if size is None and key == family.intermediate_key:
                try:
                    size = family.mlp_size(lm)
                except Exception:
                    size = None
            expect(tname, dim, None if size is None else size * parts, key if parts == 1 else f"{parts} x {key}")
    if seen:
        problems = []
        for said, hits in seen.items():
            tname, shape, dim = hits[0]
            more = f" (and {len(hits) - 1} more tensor(s))" if len(hits) > 1 else ""
            problems.append(
                Problem(
                    where,
                    f"config.json says {said}, but tensor {tname[:120]} has shape {list(shape)} ({shape[dim]} along dim {dim}){more}: "
                    "the config and the weights disagree",
                    "fix config.json to match the weights (or use the weights this config belongs to)",
                )
            )
        raise CheckpointError(problems)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}..{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _read_weights(path: Path, where: str, allow_pickle: bool):
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        files = _files_from_index(path, index)
    elif single.is_file():
        files = {"model.safetensors": None}
    else:
        st = sorted(p.name for p in path.glob("*.safetensors"))
        if st:
            files = {n: None for n in st}
        else:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if not pickles:
                raise CheckpointError(f"{where} has no weights (no *.safetensors, no index)")
            if not allow_pickle:
                raise CheckpointError(
                    f"{where} has only pickled weights ({', '.join(pickles)}); pickles can run code when loaded and are refused",
                    fix="convert the checkpoint to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)",
                )
            return _read_pickles(path, pickles, where) + (True,)
    from surgery.io.hub import remote_sizes

    sizes = remote_sizes(path) or {}
    tensors: dict[str, TensorInfo] = {}
    hashes: dict[str, str] = {}
    problems: list[Problem] = []
    for fname, expected in files.items():
        fpath = _inside(path, fname)
        indexed = index.is_file()
        if fpath is None:
            if not indexed:  # no index: the file itself is a link leading out
                raise CheckpointError(
                    f"{fname} links to {(path / fname).resolve()}, outside the model folder",
                    where=str(path / fname),
                    fix="replace the link with the file itself",
                )
            raise CheckpointError(
                f"index names a file outside the model folder: {fname!r}",
                where=str(index),
                fix="a weight_map may only name files in the model's own folder",
            )
        if not fpath.is_file():
            if not indexed:
                raise CheckpointError(f"{fname} is not a regular file", where=str(path / fname))
            raise CheckpointError(
                f"index names {fname!r}, which is missing", where=str(index), fix="the download is incomplete; fetch the missing shard"
            )
        found, raw = read_safetensors_header(fpath, sizes.get(fname))
        hashes[fname] = hashlib.sha256(raw).hexdigest()
        for tname, info in found.items():
            if expected is not None and tname not in expected:
                continue  # present in the file but not indexed: transformers ignores it too
            if tname in tensors:
                problems.append(Problem(f"{fpath}: tensor {tname!r}", f"also in {tensors[tname].file.name}"))
            tensors[tname] = info
        if expected is not None:
            for tname in sorted(expected - set(found)):
                problems.append(Problem(str(index), f"says tensor {tname[:120]!r} is in {fname}, but that file's header lacks it"))
    if problems:
        raise CheckpointError(problems)
    return tensors, hashes, False


def _files_from_index(path: Path, index: Path) -> dict[str, set[str]]:
    data = read_json(index, error=CheckpointError)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(
            "not a valid index (needs a JSON object with a 'weight_map' object, "
            f"got {type(wm).__name__ if isinstance(data, dict) else type(data).__name__})",
            where=str(index),
            fix="the index is corrupt; download it again",
        )
    files: dict[str, set[str]] = {}
    for tname, fname in wm.items():
        if not isinstance(fname, str):
            raise CheckpointError(f"weight_map entry for {tname!r} is not a file name", where=str(index))
        files.setdefault(fname, set()).add(tname)
    return files


def _read_pickles(path: Path, names: list[str], where: str):
    import torch

    tensors: dict[str, TensorInfo] = {}
    for n in names:
        fpath = path / n
        try:
            sd = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad or unsafe pickle
            raise CheckpointError(
                f"cannot load with weights_only=True: {type(e).__name__}: {str(e).splitlines()[0]}",
                where=str(fpath),
                fix="convert the checkpoint to safetensors with trusted tooling",
            ) from None
        if not isinstance(sd, dict):
            raise CheckpointError("pickle does not hold a state dict", where=str(fpath))
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                continue
            code = next((c for c, (tn, _) in DTYPES.items() if getattr(torch, tn, None) == v.dtype), None)
            if code is None:
                raise CheckpointError(f"tensor {k!r} has unsupported dtype {v.dtype}", where=str(fpath))
            v = v.contiguous()
            tensors[k] = TensorInfo(k, code, tuple(v.shape), fpath, -1, v.numel() * v.element_size(), in_memory=v)
    return tensors, {n: "pickle" for n in names}


def small_files(path: Path) -> list[Path]:
    """Tokenizer files, generation config and similar that travel with the output. A link among them
    must lead to a regular file inside the model folder (a cloned repo keeps links; one to
    /etc/passwd must not put that file into the output)."""
    root = path.resolve()
    out = []
    for p in sorted(path.iterdir()):
        if not SMALL_FILES.match(p.name):
            continue
        if p.is_symlink():
            target = p.resolve()
            if root not in target.parents:
                raise CheckpointError(
                    f"{p.name} links to {target}, outside the model folder; surgery copies only the model's own files",
                    where=str(p),
                    fix="replace the link with the file itself, or remove it",
                )
            if not target.is_file():
                raise CheckpointError(
                    f"{p.name} links to {target}, which is not a regular file",
                    where=str(p),
                    fix="replace the link with the file itself, or remove it",
                )
        elif p.is_dir():
            continue
        elif not p.is_file():
            raise CheckpointError(
                f"{p.name} is not a regular file (a pipe or device?)", where=str(p), fix="replace it with the file itself, or remove it"
            )
        out.append(p)
    return out
