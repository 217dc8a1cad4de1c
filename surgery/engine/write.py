"""Writing an output: shard headers, raw copies (copy_file_range) and computed tensors placed with
pwrite, each shard hashed as it is finished, the resume record, the metadata, and the output-folder
protocol (surgery.io.outdir) around it all."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from surgery._version import __version__
from surgery.io.safetensors import file_crc32, header_sha256, itemsize
from surgery.compile import OutTensor, Program, Shard
from surgery.errors import OutputError
from surgery.jsonio import read_json
from surgery.io.outdir import OutputFolder, atomic_write, create_file, output_path
from surgery.recipes import Cast, Read, Zeros, fingerprint

if TYPE_CHECKING:
    pass

# torch is imported only when a recipe needs computing: copy-only plans (slicing, stacking,
# depth up-scaling) never pay its import time.

from surgery.engine.evaluate import Evaluator
from surgery.engine.read import CHUNK_ELEMENTS, Sources, torch_dtype
from surgery.engine.staging import StagedIO


COPY_CHUNK = 64 << 20


@dataclass
class Result:
    path: Path
    num_layers: int
    num_params: int
    bytes_written: int
    shards: list[str]
    seconds: float
    new_layers: list[int]


# ---------------------------------------------------------------------------------------------
# writing


def _pwrite_all(fd: int, data, pos: int, where: str):
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], pos + done)
        except OSError as e:
            raise _write_error(e, where, len(view) - done) from None


def _write_error(e: OSError, where: str, need: int) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(
            f"out of space writing ({os.strerror(e.errno)}); at least {need} more bytes were needed for this tensor",
            where=where,
            fix="free disk space or choose an output folder on a larger disk; the partial output was removed",
        )
    return OutputError(f"write failed: {e.strerror or e}", where=where)


_copy_file_range_ok = hasattr(os, "copy_file_range")


def _raw_copy(src_fd: int, src_off: int, nbytes: int, dst_fd: int, dst_off: int, where: str):
    global _copy_file_range_ok
    done = 0
    while done < nbytes and _copy_file_range_ok:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(COPY_CHUNK, nbytes - done), src_off + done, dst_off + done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF):
                _copy_file_range_ok = False
                break
            raise _write_error(e, where, nbytes - done) from None
        if n == 0:
            raise OutputError("unexpected end of a source file during copy", where=where)
        done += n
    while done < nbytes:
        data = os.pread(src_fd, min(COPY_CHUNK, nbytes - done), src_off + done)
        if not data:
            raise OutputError("unexpected end of a source file during copy", where=where)
        _pwrite_all(dst_fd, data, dst_off + done, where)
        done += len(data)


PAGE = 4096


def shard_header(shard: Shard, metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The safetensors header (8-byte length + JSON padded with spaces) and each tensor's data offset.

    The padding also puts the shard's largest raw-copy run at the same offset modulo the page
    size as its source bytes: the kernel copies page-aligned ranges faster (measured: 3.2 vs
    2.65 GB/s). It stays a multiple of 8, as safetensors writes it."""
    header: dict = {"__metadata__": metadata}
    offsets, pos = [], 0
    for t in shard.tensors:
        header[t.name] = {"dtype": t.recipe.dtype, "shape": list(t.recipe.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets.append(pos)
        pos += t.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    pad = -(8 + len(hb)) % 8
    pieces = copy_pieces([(t, off) for t, off in zip(shard.tensors, offsets, strict=True) if _is_raw(t)], piece=1 << 62)
    if pieces:
        _, src_off, _, rel, _ = max(pieces, key=lambda p: p[2])
        want = (src_off - rel - 8 - len(hb)) % PAGE
        if want % 8 == 0:
            pad = want
    hb += b" " * pad
    return struct.pack("<Q", len(hb)) + hb, offsets


class Progress:
    def __init__(self, total_bytes: int, total_tensors: int, enabled: bool):
        self.bar = None
        self.lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="apply",
                file=sys.stderr,
                dynamic_ncols=True,
                postfix=f"0/{total_tensors} tensors",
            )
        self.tensors, self.total_tensors = 0, total_tensors

    def add(self, nbytes: int, tensor_done: bool = False):
        if self.bar is None:
            return
        with self.lock:
            self.bar.update(nbytes)
            if tensor_done:
                self.tensors += 1
                self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _is_raw(t: OutTensor) -> bool:
    return isinstance(t.recipe, Read) and t.recipe.src.in_memory is None


def _is_zero(t: OutTensor) -> bool:
    """All-zero tensors need no writing: the shard is sized with ftruncate, which reads as zeros."""
    r = t.recipe
    while isinstance(r, Cast):
        r = r.inner
    return isinstance(r, Zeros)


class CopyPiece(NamedTuple):
    """One raw copy: `nbytes` from `file` at `src_offset` to the output at `dst_offset`;
    `tensors_done` tensors are finished when it is."""

    file: Path
    src_offset: int
    nbytes: int
    dst_offset: int
    tensors_done: int


def copy_pieces(tensors: list[tuple[OutTensor, int]], piece: int = COPY_CHUNK) -> list[CopyPiece]:
    """Raw-copy work for (tensor, output offset) pairs, in output order: runs of tensors that are
    byte-contiguous in the same source file become one range, then ranges are cut into pieces of
    at most `piece` bytes, so a few threads share the work evenly whatever the tensor sizes.
    Each piece: (source file, source offset, bytes, output offset, tensors finished by it)."""
    runs: list[list] = []  # [file, src_off, nbytes, dst_off, ntensors]
    for t, dst in tensors:
        s = t.recipe.src
        last = runs[-1] if runs else None
        if last and last[0] == s.file and last[1] + last[2] == s.offset and last[3] + last[2] == dst:
            last[2] += s.nbytes
            last[4] += 1
        else:
            runs.append([s.file, s.offset, s.nbytes, dst, 1])
    pieces = []
    for f, so, n, do, k in runs:
        starts = list(range(0, n, piece)) or [0]
        for i, a in enumerate(starts):
            pieces.append(CopyPiece(f, so + a, min(piece, n - a), do + a, k if i == len(starts) - 1 else 0))
    return pieces


def _copy_piece(p: CopyPiece, fd: int, srcs: Sources, progress: Progress, where: str):
    _raw_copy(srcs.fd(p.file), p.src_offset, p.nbytes, fd, p.dst_offset, where)
    progress.add(p.nbytes, p.tensors_done)


def _write_tensor(t: OutTensor, fd: int, pos: int, srcs: Sources, progress: Progress, where: str):
    with srcs.compute_slots:  # computing tensors at once is bounded by cores; copies are not
        _compute_tensor(t, fd, pos, srcs, progress, where)


def _compute_tensor(t: OutTensor, fd: int, pos: int, srcs: Sources, progress: Progress, where: str):
    """Evaluate a computed tensor chunk by chunk and write each chunk at its offset.

    With staging (a device, see StagedIO) the pipeline is one chunk deep: while the device
    computes chunk k (queued on this thread's compute stream) and copies it back (on the download
    stream), the host reads chunk k+1 into pinned buffers and writes chunk k-1, whose download
    event it waits for first. Without staging each chunk is written as soon as it is made."""
    import contextlib

    r = t.recipe
    io = srcs.io
    isz = itemsize(r.dtype)
    n = r.numel
    step = srcs.chunk_elements
    pending = None

    def finish(p):
        buf, done, nbytes, at, last = p
        io.wait(done)
        _pwrite_all(fd, buf[:nbytes].numpy(), at, where)
        io.release(buf, done)
        progress.add(nbytes, last)

    with io.compute_stream() if io is not None else contextlib.nullcontext():
        ev = Evaluator(srcs)
        whole = ev.full(r).reshape(-1) if r.needs_whole() else None
        try:
            for e0 in range(0, n, step):
                e1 = min(n, e0 + step)
                x = (whole[e0:e1] if whole is not None else ev.chunk(r, e0, e1)).contiguous()
                assert x.numel() == e1 - e0 and x.dtype == torch_dtype(r.dtype), (t.name, x.shape, x.dtype)
                nbytes, at, last = (e1 - e0) * isz, pos + e0 * isz, e1 == n
                if io is None:
                    _pwrite_all(fd, x.cpu().view(-1).view(torch_dtype("U8")).numpy(), at, where)
                    progress.add(nbytes, last)
                    continue
                buf, done = io.download(x)
                if pending is not None:
                    finish(pending)
                pending = (buf, done, nbytes, at, last)
            if pending is not None:
                finish(pending)
                pending = None
        finally:
            if pending is not None:  # an error after queuing: hand the buffer back once its copy is done
                io.wait(pending[1])
                io.release(pending[0], pending[1])
    if n == 0:
        progress.add(0, True)


def write_shard(
    shard: Shard, header: tuple[bytes, list[int]], folder: Path, srcs: Sources, pool: ThreadPoolExecutor, progress: Progress
) -> None:
    """Write one shard: `header` is `shard_header(shard, ...)`, computed once per run. Its size,
    header hash and checksum go to the record from `_shard_record` and the checksum thread."""
    head, offsets = header
    tmp = folder / (shard.name + ".tmp")
    where = str(folder / shard.name)
    fd = create_file(tmp)
    try:
        total = len(head) + shard.nbytes
        try:
            os.ftruncate(fd, total)  # sized up front: holes are filled by pwrite in any order (zeros stay holes)
        except OSError as e:
            raise _write_error(e, where, total) from None
        _pwrite_all(fd, head, 0, where)
        base = len(head)
        placed = [(t, base + off) for t, off in zip(shard.tensors, offsets, strict=True)]
        # computed tensors first (they take longest), then the raw copies in coalesced pieces
        for t, _ in placed:
            if _is_zero(t):
                progress.add(t.nbytes, True)
        futures = [pool.submit(_write_tensor, t, fd, pos, srcs, progress, where) for t, pos in placed if not _is_raw(t) and not _is_zero(t)]
        futures += [
            pool.submit(_copy_piece, p, fd, srcs, progress, where) for p in copy_pieces([(t, pos) for t, pos in placed if _is_raw(t)])
        ]
        for f in futures:
            f.result()
        _check_allocated(fd, total, where)
    finally:
        os.close(fd)
    os.replace(tmp, folder / shard.name)


def _check_allocated(fd: int, total: int, where: str):
    if os.fstat(fd).st_size != total:
        raise OutputError(f"shard has {os.fstat(fd).st_size} bytes, expected {total}", where=where)


# ---------------------------------------------------------------------------------------------
# the whole output


def _refuse_output_in_source(program: Program, out: Path):
    out_r = out.resolve()
    for ck in program.ckpts.values():
        src = ck.path.resolve()
        if out_r == src or src in out_r.parents:
            raise OutputError(
                f"the output folder {out} is inside (or is) the folder of source model {ck.name!r} ({src})",
                fix="write the output somewhere else; surgery never writes into a source model",
            )


def _check_space(folder: Path, need: int):
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"the output needs {need:,} bytes but only {free:,} are free",
            where=str(folder),
            fix="free disk space or choose an output folder on a larger disk",
        )


def resolve_device(device: str | None) -> str:
    """auto -> cuda when torch sees a GPU, else cpu; cuda[:N] is checked."""
    device = device or "auto"
    if device == "cpu":
        return "cpu"
    valid = re.fullmatch(r"auto|cuda(:\d+)?", device)
    if not valid:
        raise OutputError(f"unknown device {device!r}", fix="use auto, cpu, cuda or cuda:N")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise OutputError(
            f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__})",
            fix="use --device cpu (or auto), or install a CUDA build of torch",
        )
    idx = int(device.split(":")[1]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise OutputError(
            f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible", fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    return device


BYTES_PER_CHUNK_ELEMENT = 64  # working set of one compute slot per element: inputs, float32/64 temporaries


def plan_memory(program: Program, max_memory: int | None, slots: int, device: str) -> int:
    """Elements per chunk so that `slots` concurrent computed tensors fit `max_memory` bytes; a
    recipe that needs whole tensors (nuslerp, plugin kernels) larger than that is an error."""
    if max_memory is None:
        return CHUNK_ELEMENTS if device == "cpu" else CHUNK_ELEMENTS * 16
    chunk = max(1 << 12, min(1 << 26, max_memory // (slots * BYTES_PER_CHUNK_ELEMENT)))
    for t in program.tensors:
        if t.recipe.needs_whole():
            need = sum(i.nbytes for i in t.recipe.inputs()) * 3
            if need > max_memory:
                raise OutputError(
                    f"{t.name} is computed on whole tensors ({t.recipe.describe()[:60]}...), which needs about "
                    f"{need:,} bytes, over --max-memory {max_memory:,}",
                    fix=f"raise --max-memory to at least {need:,} bytes",
                )
    return chunk


RECORD = ".surgery-shards.json"  # in the partial folder only: what each shard is made from, for --resume


def _shard_record(program: Program, headers: dict[str, tuple[bytes, list[int]]], sources: dict) -> dict:
    """What each shard's bytes are made from: its header and every tensor's full recipe (with
    parameters, seeds, source files and offsets), and the source files' sizes and mtimes. Any
    change that could alter a shard's bytes changes its entry, so --resume rewrites it."""
    shards = []
    for s in program.shards:
        head = headers[s.name][0]
        recipes = json.dumps([[t.name, fingerprint(t.recipe)] for t in s.tensors], sort_keys=True)
        shards.append(
            {
                "name": s.name,
                "bytes": len(head) + s.nbytes,
                "tensors": len(s.tensors),
                "header_sha256": hashlib.sha256(head[8:]).hexdigest(),
                "recipe_sha256": hashlib.sha256(recipes.encode()).hexdigest(),
            }
        )
    return {"surgery_version": __version__, "sources": sources, "shards": shards}


def record_id(record: dict) -> str:
    """One digest of a run's record: equal for two runs that write the same bytes."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _resumable(staging: Path, record: dict) -> dict[str, dict]:
    """Shards of an interrupted run that are whole and made exactly as this run would make them."""
    try:
        old = json.loads((staging / RECORD).read_text())
        done = old.get("done", {}) if isinstance(old, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(done, dict) or {k: v for k, v in old.items() if k != "done"} != record:
        return {}  # a different plan, sources or version: start over
    kept = {}
    for info in record["shards"]:
        f = staging / info["name"]
        digest = done.get(info["name"])
        if not isinstance(digest, str) or not f.is_file() or f.stat().st_size != info["bytes"]:
            continue
        if header_sha256(f) != info["header_sha256"]:
            continue
        kept[info["name"]] = {**info, "crc32": digest}
    # keep only the finished shards and the record: anything else (a .tmp, a planted link) goes
    for entry in staging.iterdir():
        if entry.name not in kept and entry.name != RECORD:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return kept


def _shard_entry(info: dict) -> dict:
    return {k: info[k] for k in ("name", "bytes", "tensors", "header_sha256", "crc32")}


def execute(
    program: Program,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    device: str | None = None,
    max_memory: int | None = None,
    resume: bool = False,
    pipeline: str = "off",
    stats: str | Path | None = None,
    reads: dict[str, Path] | None = None,
) -> Result:
    """Write `program` to the folder `out` through the output-folder protocol (surgery.outdir).

    `pipeline`: "off" (default: per chunk copy in, compute, copy back, synchronously), "on" (the
    pinned-buffer, multi-stream device pipeline; opt-in until measured on GPUs), "host" (that
    pipeline with host buffers, to test it on a CPU). `stats`: a file to write device and memory
    figures to (for bench/). `reads`: what else the command reads besides the program's models (the plan), never replaced."""
    import time

    t0 = time.perf_counter()
    if pipeline not in ("off", "on", "host"):
        raise OutputError(f"unknown pipeline {pipeline!r}", fix="use off, on or host")
    out = output_path(out)
    _refuse_output_in_source(program, out)
    guard = {f"source model {n!r}": ck.path for n, ck in program.ckpts.items()} | dict(reads or {})
    if stats is not None:
        from surgery.io.outdir import check_file_target

        check_file_target(Path(stats), True, guard, option="--stats-json")
    metadata = {"format": "pt", "producer": f"surgery {__version__}"}
    headers = {s.name: shard_header(s, metadata) for s in program.shards}
    cpus = os.cpu_count() or 1
    workers = workers or 8
    show = progress if progress is not None else sys.stderr.isatty()
    dev = resolve_device(device) if any(not _is_raw(t) and not _is_zero(t) for t in program.tensors) else "cpu"
    slots = max(1, min(workers, cpus)) if dev == "cpu" else 2
    chunk = plan_memory(program, max_memory, slots, dev)
    with OutputFolder(out, force=force, reads=guard) as folder:
        staged_io = None
        if pipeline == "host" or (pipeline == "on" and dev != "cpu"):
            # free pinned buffers kept for reuse: a few chunks per compute slot, within --max-memory
            pool_bytes = max_memory // 2 if max_memory else slots * 6 * chunk * 4
            staged_io = StagedIO(dev, pool_bytes, backend="cuda" if dev != "cpu" else "host")
        srcs = Sources(compute_slots=slots, device=dev, chunk_elements=chunk, staging=staged_io)
        try:
            # checks first: a refusal here must not touch an interrupted run's side folder
            srcs.open_all(program)
            record = _shard_record(program, headers, srcs.identity())
            build = record_id(record)
            if resume and folder.notes and _published_build(out) == build:
                return _result(program, out, t0)
            folder.check_target()
            _check_space(out.parent, program.bytes_out + (1 << 20))
            staging = folder.staging
            kept = _resumable(staging, record) if resume else {}
            if resume and not kept and not staging.exists():
                raise OutputError(
                    f"nothing to resume: no interrupted run for {out} (looked for {staging.name})", fix="run without --resume"
                )
            try:
                done = {k: v["crc32"] for k, v in kept.items()}
                if not kept:
                    folder.fresh_staging()
                    atomic_write(staging / RECORD, json.dumps(record))
                _run_shards(program, headers, staging, srcs, record, done, kept, workers, show)
                srcs.check_unchanged()
                infos = [_shard_entry({**i, "crc32": done[i["name"]]}) for i in record["shards"]]
                (staging / RECORD).unlink()
                _write_metadata(program, staging, infos, build)
                folder.publish()
            except BaseException:
                # A failure of ours (disk full, a bad source) removes the partial output; a kill leaves it,
                # never complete-looking, for --resume.
                if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                    folder.discard_staging()
                raise
        finally:
            srcs.close()
    if stats is not None:  # for bench/: what a process cannot see from outside
        peak = None
        if dev != "cpu":
            import torch

            peak = torch.cuda.max_memory_allocated(dev) / 2**20
        Path(stats).write_text(
            json.dumps(
                {
                    "device": dev,
                    "pipeline": pipeline,
                    "peak_gpu_mb": peak,
                    "chunk_elements": srcs.chunk_elements,
                    "peak_staging_mb": staged_io.peak / 2**20 if staged_io else None,
                }
            )
        )
    return _result(program, out, t0)


def _result(program: Program, out: Path, t0: float) -> Result:
    import time

    return Result(
        out,
        program.num_layers,
        program.num_params,
        program.bytes_out,
        [s.name for s in program.shards],
        time.perf_counter() - t0,
        program.new_layers,
    )


def _run_shards(
    program: Program, headers, staging: Path, srcs: Sources, record: dict, done: dict[str, str], kept: dict, workers: int, show: bool
) -> None:
    """Write every shard not kept from an interrupted run; hash each as it is finished (on its own
    thread, overlapping the next shard) and record the hash, so --resume keeps it and verify checks it."""
    bar = Progress(program.bytes_out, len(program.tensors), show)
    lock = threading.Lock()

    def hashed(name: str) -> None:
        digest = file_crc32(staging / name, fsync=True)  # durable before it is recorded as done
        with lock:
            done[name] = digest
            atomic_write(staging / RECORD, json.dumps({**record, "done": done}))

    try:
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surgery-io") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-hash") as hasher,
        ):
            pending = []
            for s in program.shards:
                if s.name in kept:  # whole and made from exactly this recipe: keep it
                    bar.add(s.nbytes)
                    continue
                write_shard(s, headers[s.name], staging, srcs, pool, bar)
                pending.append(hasher.submit(hashed, s.name))
            for f in pending:
                f.result()
    finally:
        bar.close()


def _published_build(out: Path) -> str | None:
    from surgery.errors import SurgeryError
    from surgery.io.provenance import read_provenance

    try:
        prov = read_provenance(out)
    except (SurgeryError, OSError, RecursionError):
        return None
    return prov.build if prov is not None else None


def _write_metadata(program: Program, folder: Path, shard_info: list[dict], build: str):
    try:
        _write_metadata_files(program, folder, shard_info, build)
    except OSError as e:
        raise _write_error(e, f"{folder} ({e.filename or 'metadata'})", 1 << 20) from None


def _write_metadata_files(program: Program, folder: Path, shard_info: list[dict], build: str):
    from surgery.report.card import model_card
    from surgery.report.summary import provenance

    if program.tokenizer_merger is not None:
        program.tokenizer_merger.save(folder)
        for f in program.small_files():  # generation_config.json and the like, not tokenizer files
            if not f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")):
                shutil.copy2(f, folder / f.name)
    else:
        for f in program.small_files():
            shutil.copy2(f, folder / f.name)
    if program.chat_template is not None:
        (folder / "chat_template.jinja").write_text(program.chat_template)
        tc = folder / "tokenizer_config.json"
        if tc.is_file():  # one template only: the .jinja file
            cfg = read_json(tc, error=OutputError)
            if cfg.pop("chat_template", None) is not None:
                tc.write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(program.config, indent=2, sort_keys=True) + "\n")
    from surgery.report.show import layer_map_svg

    (folder / "layer_map.svg").write_text(layer_map_svg(program))
    (folder / "README.md").write_text(model_card(program))
    weight_map = {t.name: s.name for s in program.shards for t in s.tensors}
    index = {"metadata": {"total_size": program.bytes_out, "total_parameters": program.num_params}, "weight_map": weight_map}
    # surgery.json, then the index, last of all: a folder with an index has everything else.
    prov = provenance(program, shard_info)
    prov["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prov["build"] = build
    atomic_write(folder / "surgery.json", json.dumps(prov, indent=2) + "\n")
    atomic_write(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
