"""Header-only views of hub models, for `validate` in CI: no tensor data is downloaded.

For a hub ref, `header_view` makes a local folder that stands in for the model: `config.json`,
the safetensors index, and for each weights file a *header stub* (its first 8 + N bytes: the
length field and the JSON header), with every file's real size in `.surgery-remote.json`, so the
checkpoint reader checks byte ranges against the real file. Everything is fetched through
huggingface-hub's own client (endpoint from `HF_ENDPOINT`, the standard token for private
repos), each header with two exact HTTP range requests (the 8-byte length, then the JSON), shards
in parallel: no byte of tensor data is fetched.

Views are cached under `$SURGERY_CACHE/hub-headers/ORG--NAME/COMMIT/` (complete or absent:
built in a side folder and renamed), with `refs/REVISION` naming the commit a branch or tag
resolved to, so `--offline` works from the last online run. A model already fully in the hub
cache is used from there, without any request.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from surgery.errors import CheckpointError

MANIFEST = ".surgery-remote.json"


def cache_root() -> Path:
    root = os.environ.get("SURGERY_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "surgery") / "hub-headers"


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def header_view(repo_id: str, revision: str | None, where: str | None, *, offline: bool = False) -> Path:
    from urllib.parse import quote

    rev = revision or "main"
    repo_dir = cache_root() / repo_id.replace("/", "--")
    ref_file = repo_dir / "refs" / quote(rev, safe="")  # a branch like `refs/pr/1` is one file name, never a path
    if offline or _offline_env():
        sha = ref_file.read_text().strip() if ref_file.is_file() else (rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None)
        if sha and (repo_dir / sha / MANIFEST).is_file():
            return repo_dir / sha
        raise CheckpointError(
            f"hub model {repo_id!r} ({rev}) is not in the local caches and --offline / HF_HUB_OFFLINE is set",
            where=where,
            fix="run `surgery validate` once online (it caches the headers), or download the model",
        )
    info_sha, files = _repo_files(repo_id, rev, where)
    view = repo_dir / info_sha
    if not (view / MANIFEST).is_file():
        _fetch(repo_id, info_sha, files, view, where)
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    ref_file.write_text(info_sha)
    return view


def _repo_files(repo_id: str, rev: str, where: str | None) -> tuple[str, list[str]]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, revision=rev)
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"hub model {repo_id!r} not found (or private and no token was given)",
            where=where,
            fix="check the repo id; for a private repo set HF_TOKEN or run `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"hub model {repo_id!r} has no revision {rev!r}", where=where, fix="check the branch, tag or commit"
        ) from None
    except Exception as e:  # the HTTP stack (httpx, hub errors) raises many types; each means: unreachable
        raise CheckpointError(
            f"cannot reach the hub for {repo_id!r}: {type(e).__name__}: {e}".splitlines()[0],
            where=where,
            fix="check the network, HF_ENDPOINT and your token, or use --offline with a cached model",
        ) from None
    if not info.sha or not re.fullmatch(r"[0-9a-fA-F]{7,64}", info.sha):
        raise CheckpointError(f"the hub did not give a commit id for {repo_id!r}@{rev} (got {info.sha!r})", where=where)
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def _get(url: str, where: str | None, *, limit: int, start: int = 0) -> tuple[bytes, int | None]:
    """Bytes [start, start + limit) of a file (a range request; a server that ignores ranges is read only
    that far), and the file's total size when the server says it."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers()
    headers["Range"] = f"bytes={start}-{start + limit - 1}"
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            total = None
            cr = r.headers.get("Content-Range", "")
            if "/" in cr and cr.rsplit("/", 1)[1].isdigit():
                total = int(cr.rsplit("/", 1)[1])
            elif r.status_code == 200 and r.headers.get("Content-Length", "").isdigit():
                total = int(r.headers["Content-Length"])
            skip = start if r.status_code == 200 else 0  # range ignored: the body starts at byte 0
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) >= skip + limit:
                    break
            return bytes(buf[skip : skip + limit]), total
    except CheckpointError:
        raise
    except Exception as e:  # the HTTP stack raises many types; each means the file could not be read
        raise CheckpointError(
            f"cannot fetch {url}: {type(e).__name__}: {e}".splitlines()[0], where=where, fix="check the network, HF_ENDPOINT and your token"
        ) from None


def _fetch(repo_id: str, sha: str, files: list[str], view: Path, where: str | None) -> None:
    from huggingface_hub import hf_hub_url

    from surgery.io.safetensors import header_length

    def url(f):
        return hf_hub_url(repo_id, f, revision=sha, endpoint=_endpoint())

    if "config.json" not in files:
        raise CheckpointError(
            f"hub model {repo_id!r} has no config.json", where=where, fix="point the plan at a HuggingFace transformers checkpoint"
        )
    small = ["config.json"] + [f for f in ("model.safetensors.index.json",) if f in files]
    if "model.safetensors.index.json" in files:
        weights = None  # from the index
    elif "model.safetensors" in files:
        weights = ["model.safetensors"]
    else:
        weights = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
        if not weights:
            pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth")))
            raise CheckpointError(
                f"hub model {repo_id!r} has no safetensors weights" + (f" (only pickles: {', '.join(pickles[:3])})" if pickles else ""),
                where=where,
                fix="validate works from safetensors headers; use a safetensors revision of the model",
            )
    tmp = view.with_name(view.name + f".{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes: dict[str, int] = {}
    served = 0
    for f in small:
        data, _ = _get(url(f), where, limit=16 * 2**20)
        (tmp / f).write_bytes(data)
        served += len(data)
    if weights is None:
        try:
            wm = json.loads((tmp / "model.safetensors.index.json").read_text())["weight_map"]
            weights = sorted(set(wm.values()))
        except (ValueError, KeyError, TypeError):
            weights = []  # the checkpoint reader reports the bad index with its path

    def header(f: str) -> tuple[str, bytes, int]:
        # two exact ranges: the length field, then the JSON header; no byte of tensor data
        head, total = _get(url(f), where, limit=8)
        n = header_length(head, total if total is not None else (len(head) if len(head) < 8 else None), f"{where}: {repo_id}/{f}")
        body, _ = _get(url(f), where, limit=n, start=8) if n else (b"", None)
        return f, head + body, total if total is not None else 8 + len(body)

    from concurrent.futures import ThreadPoolExecutor

    names = [f for f in weights if "/" not in f and not f.startswith(".")]  # the reader refuses the others, located
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        for f, stub, total in pool.map(header, names):
            (tmp / f).write_bytes(stub)
            sizes[f] = total
            served += len(stub)
    (tmp / MANIFEST).write_text(json.dumps({"repo": repo_id, "commit": sha, "sizes": sizes, "bytes_fetched": served}))
    view.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, view)
    except OSError:  # another process finished the same view first
        shutil.rmtree(tmp, ignore_errors=True)


def manifest(folder: Path) -> dict | None:
    """The record of a header-only view (repo, commit, real file sizes); None for a real folder."""
    m = folder / MANIFEST
    return json.loads(m.read_text()) if m.is_file() else None


def remote_sizes(folder: Path) -> dict[str, int] | None:
    m = manifest(folder)
    return None if m is None else m.get("sizes", {})
