"""The streaming engine: executes a Program into a checkpoint folder.

- Every output tensor's name, dtype, shape and byte offset is known before any byte is read, so
  each shard's header is written first and tensors are written at their final offsets
  (`pwrite`), by a small pool of threads, in any order.
- A tensor whose recipe is a plain copy with the same dtype is copied as raw bytes
  (`os.copy_file_range`, in the kernel where the filesystem allows; `pread`/`pwrite` otherwise),
  never decoded by torch. Any other recipe is evaluated in fixed-size chunks of elements, so
  memory is bounded by (workers x chunk), never by tensor, shard or model size.
- The output is built in a hidden side folder next to the destination; shards are written as
  `*.tmp` and renamed when whole; `surgery.json` and then the index are written last; then the side
  folder is renamed into place in one step. An interrupted run never leaves a folder that looks
  complete.
"""

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

from . import __version__
from .checkpoint import TensorInfo, dtype_name, header_sha256, itemsize, read_header_fd
from .compile import OutTensor, Program, Shard
from .errors import OutputError
from .jsonio import read_json
from .outdir import OutputFolder, atomic_write, output_path
from .recipes import (Cast, External, Linear, Nuslerp, RandomNormal, Read, Recipe, Scale, Slerp, VocabPermute, Zeros,
                      fingerprint)

if TYPE_CHECKING:
    import torch

# torch is imported only when a recipe needs computing: copy-only plans (slicing, stacking,
# depth up-scaling) never pay its import time.

CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MB of fp32 per intermediate
SLERP_KEEP_PER_ELEMENT = 24  # slerp inputs up to 24 bytes x chunk (96 MB by default) are read once, kept from pass 1
COPY_CHUNK = 64 << 20
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


@dataclass
class Result:
    path: Path
    num_layers: int
    num_params: int
    bytes_written: int
    shards: list[str]
    seconds: float
    new_layers: list[int]


def torch_dtype(code: str) -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(code))


# ---------------------------------------------------------------------------------------------
# reading and evaluating recipes in chunks

class Sources:
    """Open file descriptors of source shards, shared by the worker threads (pread is thread-safe)."""

    def __init__(self, compute_slots: int = 2, device: str = "cpu", chunk_elements: int | None = None,
                 staging: "StagedIO | None" = None):
        self._fds: dict[Path, int] = {}
        self._stat: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.compute_slots = threading.BoundedSemaphore(compute_slots)
        self.device = device  # where computed recipes run; reads and writes stay on the host
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.io = staging  # pinned buffers and copy streams between host and device (None: plain host tensors)

    def open_all(self, program: Program) -> None:
        """Open every source file the program reads, once, before any work, and check each against
        the header read when the plan was compiled. Reads then go through these descriptors only,
        so a file replaced by rename during the run is harmless (and one changed in place is
        caught by `check_unchanged`)."""
        files: dict[Path, str | None] = {}
        for t in program.tensors:
            for i in t.recipe.inputs():
                if i.in_memory is None:
                    files.setdefault(i.file, None)
        for ck in program.ckpts.values():
            for fname, digest in ck.header_hashes.items():
                f = ck.path / fname
                if f in files:
                    files[f] = digest
        for f, digest in files.items():
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError as e:
                raise OutputError(f"cannot open source file: {e.strerror}", where=str(f)) from None
            self._fds[f] = fd
            st = os.fstat(fd)
            self._stat[f] = (st.st_size, st.st_mtime_ns)
            if digest is not None and hashlib.sha256(read_header_fd(fd, str(f))).hexdigest() != digest:
                raise OutputError("source file changed since the plan was compiled (its header differs)", where=str(f),
                                  fix="run again; do not change source models while surgery reads them")

    def check_unchanged(self) -> None:
        """A source file changed in place during the run (size or mtime differ) fails it."""
        for f, fd in self._fds.items():
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self._stat[f]:
                raise OutputError("source file was modified while surgery read it; the output may mix old and new "
                                  "data and was not published", where=str(f),
                                  fix="run again once the file no longer changes")

    def identity(self) -> dict[str, list[int]]:
        """Size and mtime of every source file, for the resume record."""
        return {str(f): list(v) for f, v in sorted(self._stat.items())}

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:  # a file open_all did not see (only in unit tests that skip it)
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
                st = os.fstat(fd)
                self._stat[path] = (st.st_size, st.st_mtime_ns)
            return fd

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, t: TensorInfo, e0: int, e1: int) -> "torch.Tensor":
        import torch

        dt = torch_dtype(t.dtype)
        if t.in_memory is not None:
            return t.in_memory.reshape(-1)[e0:e1]
        buf = bytearray((e1 - e0) * itemsize(t.dtype))
        self.read_into(t, e0, memoryview(buf))
        return torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)

    def read_into(self, t: TensorInfo, e0: int, view) -> None:
        """pread elements from `e0` of `t` into the writable buffer `view` (its length decides how many)."""
        view = memoryview(view).cast("B")
        fd, pos, done = self.fd(t.file), t.offset + e0 * itemsize(t.dtype), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n == 0:
                raise OutputError(f"unexpected end of file reading tensor {t.name!r} (the file changed or is truncated)",
                                  where=str(t.file))
            done += n

    def read_device(self, t: TensorInfo, e0: int, e1: int) -> "torch.Tensor":
        """Elements [e0, e1) of `t` on the compute device, staged through a pinned buffer."""
        if t.in_memory is not None or self.io is None:
            return self.read(t, e0, e1).to(self.device)
        return self.io.upload(lambda view: self.read_into(t, e0, view), (e1 - e0) * itemsize(t.dtype), torch_dtype(t.dtype))


class Evaluator:
    """Evaluates recipes chunk by chunk (elements [e0, e1) of the flattened tensor)."""

    def __init__(self, sources: Sources):
        self.src = sources
        self._slerp: dict = {}  # Slerp -> (coef_a, coef_b)
        self._kept: dict = {}  # (Slerp, e0, e1) -> its input chunks from pass 1, when the tensor is small enough
        self._full: dict = {}  # whole-tensor results, for this output tensor

    def chunk(self, r: Recipe, e0: int, e1: int) -> "torch.Tensor":
        """Elements [e0, e1) of the flattened output of `r`, in r's dtype."""
        import torch

        if r.whole_tensor:
            return self.full(r).reshape(-1)[e0:e1]
        if isinstance(r, Read):
            if self.src.device == "cpu" and self.src.io is None:
                return self.src.read(r.src, e0, e1)
            return self.src.read_device(r.src, e0, e1)
        if isinstance(r, Zeros):
            return torch.zeros(e1 - e0, dtype=torch_dtype(r.dtype), device=self.src.device)
        if isinstance(r, Cast):
            return self.chunk(r.inner, e0, e1).to(torch_dtype(r.dtype))
        if isinstance(r, Scale):
            return self.chunk(r.inner, e0, e1) * r.factor
        if isinstance(r, Linear):
            first = torch_dtype(r.terms[0].dtype)
            cd = torch.float64 if first == torch.float64 else torch.float32
            w = torch.tensor(r.weights, dtype=cd, device=self.src.device)
            acc = torch.zeros(e1 - e0, dtype=cd, device=self.src.device)
            for term, wi in zip(r.terms, w.unbind(0)):
                acc.addcmul_(self.chunk(term, e0, e1), wi.reshape(1))
            if r.normalize:
                acc.div_(w.sum())
            return acc.to(first)
        if isinstance(r, Slerp):
            coef_a, coef_b = self._slerp_coefs(r)
            cd = coef_a.dtype
            kept = self._kept.pop((r, e0, e1), None)  # the inputs pass 1 already read
            x, y = kept if kept is not None else (self.chunk(r.a, e0, e1), self.chunk(r.b, e0, e1))
            return (coef_a * x.to(cd) + coef_b * y.to(cd)).to(torch_dtype(r.dtype))
        if isinstance(r, RandomNormal):
            return self._random(r, e0, e1)
        raise AssertionError(f"no evaluator for {type(r).__name__}")

    def full(self, r: Recipe) -> "torch.Tensor":
        """The whole output of `r`, shaped. Recipes that need whole input tensors (nuslerp, plugin
        kernels, vocabulary realignment) are computed once per output tensor and cached."""
        if r in self._full:
            return self._full[r]
        if isinstance(r, Nuslerp):
            out = _nuslerp(r, self.full(r.a), self.full(r.b), self.full(r.base) if r.base is not None else None)
        elif isinstance(r, External):
            from .registry import current as _registry

            inputs = [self.full(t) for t in r.terms]
            try:
                out = _registry().kernel(r.method)(inputs, r).to(torch_dtype(r.dtype))
            except Exception as e:  # the plugin's kernel refused its parameters (e.g. della's epsilon)
                params = ", ".join(f"{k}={v}" for k, v in r.shared)
                raise OutputError(f"merge method {r.method} failed on {r.name} ({params or 'no shared parameters'}): "
                                  f"{type(e).__name__}: {str(e)[:300]}", where=r.where,
                                  fix=f"check the {r.method} parameters against its documentation") from None
        elif isinstance(r, VocabPermute):
            key = ("vocab", r.terms, r.ids)
            if key not in self._full:
                self._full[key] = r.merger.permute({i: self.full(t) for i, t in zip(r.ids, r.terms)})
            out = self._full[key][r.ids[r.index]].to(torch_dtype(r.dtype))
        else:
            return self.chunk(r, 0, r.numel).reshape(r.shape)
        assert tuple(out.shape) == tuple(r.shape), (type(r).__name__, out.shape, r.shape)
        self._full[r] = out
        return out

    def _slerp_coefs(self, r: Slerp):
        import torch

        if r in self._slerp:
            return self._slerp[r]
        # Pass 1: whole-tensor statistics in float64, chunk by chunk.
        ssa = ssb = sab = 0.0
        n = r.numel
        step = self.src.chunk_elements
        # a tensor whose inputs fit the budget keeps pass 1's chunks for pass 2: read once, not twice
        keep = n * (itemsize(r.a.dtype) + itemsize(r.b.dtype)) <= self.src.chunk_elements * SLERP_KEEP_PER_ELEMENT
        for e0 in range(0, n, step):
            e1 = min(n, e0 + step)
            xa, yb = self.chunk(r.a, e0, e1), self.chunk(r.b, e0, e1)
            if keep:
                self._kept[(r, e0, e1)] = (xa, yb)
            x, y = xa.to(torch.float64), yb.to(torch.float64)
            ssa += float(torch.dot(x, x))
            ssb += float(torch.dot(y, y))
            sab += float(torch.dot(x, y))
        na, nb = ssa ** 0.5, ssb ** 0.5
        na = na if na > SLERP_EPS else 1.0
        nb = nb if nb > SLERP_EPS else 1.0
        # Coefficients as mergekit 0.1.5 computes them: float32 (float64 for float64 inputs).
        cd = torch.float64 if r.a.dtype == "F64" else torch.float32
        dot = torch.tensor(sab / (na * nb), dtype=cd).clamp(-1, 1)
        t = torch.tensor(r.t, dtype=cd)
        linear = dot.abs() > SLERP_DOT_THRESHOLD
        theta = torch.acos(torch.where(linear, torch.zeros((), dtype=cd), dot))
        # (coefficients are computed on the host, so every device gets the same two numbers)
        sin_theta = torch.sin(theta)
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        coef_a, coef_b = coef_a.to(self.src.device), coef_b.to(self.src.device)
        self._slerp[r] = (coef_a, coef_b)
        return coef_a, coef_b

    def _random(self, r: RandomNormal, e0: int, e1: int) -> "torch.Tensor":
        import torch

        B = RandomNormal.BLOCK
        parts = []
        for b in range(e0 // B, (e1 - 1) // B + 1):
            lo, hi = b * B, min(r.numel, (b + 1) * B)
            g = torch.Generator().manual_seed(r.block_seed(b))
            block = torch.empty(hi - lo, dtype=torch.float32).normal_(0.0, r.std, generator=g)
            parts.append(block[max(e0, lo) - lo: min(e1, hi) - lo])
        # drawn on the host: the same values whatever the device
        return torch.cat(parts).to(torch_dtype(r.dtype)).to(self.src.device)


def _nuslerp(r: Nuslerp, a, b, base):
    """nuslerp in the inputs' (promoted) dtype on whole tensors, with mergekit 0.1.5's operation
    order so results agree to the last bit where the arithmetic allows."""
    import torch

    dt = a.dtype
    for x in (b, base):
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    a, b = a.to(dt), b.to(dt)
    w0, w1 = r.weights
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    if base is not None:
        base = base.to(dt)
        a, b = a - base, b - base
    shape = a.shape
    dim = 0 if r.row_wise else -1
    if r.flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif dim != -1:
        a, b = a.transpose(dim, -1), b.transpose(dim, -1)
    unit_a = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(unit_a * unit_b, dim=-1, keepdim=True).clamp(-1, 1)
    straight = (1 - cos.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(straight, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(straight, (1 - t) * a + t * b, out)
    if dim != -1 and not r.flatten:
        out = out.transpose(dim, -1)
    out = out.reshape(shape)
    return base + out if base is not None else out


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
        return OutputError(f"out of space writing ({os.strerror(e.errno)}); at least {need} more bytes were needed for this tensor",
                           where=where, fix="free disk space or choose an output folder on a larger disk; the partial output was removed")
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
    pieces = copy_pieces([(t, off) for t, off in zip(shard.tensors, offsets) if _is_raw(t)], piece=1 << 62)
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

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="apply",
                            file=sys.stderr, dynamic_ncols=True, postfix=f"0/{total_tensors} tensors")
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


class StagedIO:
    """Host <-> device traffic through a bounded pool of reusable (pinned, on CUDA) host buffers.

    Uploads: the host preads into a pool buffer, the copy to the device is queued on the upload
    stream with an event, and the compute stream waits for that event (not the host). Downloads:
    the download stream waits for the compute stream, copies into a pool buffer and records an
    event that the writer waits for before `pwrite`. A buffer goes back to the pool with the event
    of its last copy and is reused only once that event has completed. Each worker thread
    computes on its own stream, so two tensors' chunks overlap on the device too.

    `backend="host"` runs the same pipeline with plain host tensors and completed events: what
    the CPU tests use to check the staging logic (ordering, pool bounds, buffer reuse) without a GPU.
    """

    MIN_BUFFER = 1 << 20

    def __init__(self, device: str, max_bytes: int, backend: str = "cuda"):
        import torch

        self.torch = torch
        self.cuda = backend == "cuda"
        self.device = torch.device(device)
        self.max_bytes = max(max_bytes, 2 * self.MIN_BUFFER)  # free buffers kept for reuse
        self.cached = 0  # bytes of free buffers
        self.live = 0  # bytes of buffers alive (in use or free)
        self.peak = 0
        self._free: dict[int, list] = {}  # size class -> [(buffer, event)]
        self._cond = threading.Condition()
        self._local = threading.local()
        if self.cuda:
            self.up = torch.cuda.Stream(self.device)
            self.down = torch.cuda.Stream(self.device)

    # -- streams and events
    def compute_stream(self):
        import contextlib

        if not self.cuda:
            return contextlib.nullcontext()
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = self.torch.cuda.Stream(self.device)
        return self.torch.cuda.stream(s)

    def _event(self, stream):
        if not self.cuda:
            return None
        e = self.torch.cuda.Event()
        e.record(stream)
        return e

    def wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    # -- the buffer pool
    def _class(self, nbytes: int) -> int:
        return max(self.MIN_BUFFER, 1 << (max(1, nbytes) - 1).bit_length())

    def acquire(self, nbytes: int):
        """A buffer of at least `nbytes`: a free one of its size class (once its last copy is
        over), or a new one. Never blocks on other threads, so a thread holding a buffer cannot
        deadlock another: buffers in use are bounded by the pipeline's depth (per compute slot
        one chunk being downloaded, one being written, one being uploaded), the free ones by `max_bytes`."""
        size = self._class(nbytes)
        with self._cond:
            free = self._free.get(size)
            item = free.pop() if free else None
            if item is not None:
                self.cached -= size
            else:
                self.live += size
                self.peak = max(self.peak, self.live)
        if item is not None:
            self.wait(item[1])
            return item[0]
        return self.torch.empty(size, dtype=self.torch.uint8, pin_memory=self.cuda)

    def release(self, buf, event) -> None:
        """Back to the pool with the event of its last copy; dropped when the pool is full (the
        pinned allocator keeps a dropped block until its queued copies are done)."""
        size = buf.numel()
        with self._cond:
            if self.cached + size <= self.max_bytes:
                self._free.setdefault(size, []).append((buf, event))
                self.cached += size
            else:
                self.live -= size

    # -- copies
    def upload(self, fill, nbytes: int, dtype) -> "torch.Tensor":
        torch = self.torch
        buf = self.acquire(nbytes)
        fill(buf[:nbytes].numpy())
        if not self.cuda:
            out = buf[:nbytes].clone().view(dtype)
            self.release(buf, None)
            return out
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.up):
            # allocated on the upload stream, so the copy need not wait for queued compute work;
            # record_stream keeps the memory from reuse until the compute stream is done with it
            dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            dev.copy_(buf[:nbytes], non_blocking=True)
        done = self._event(self.up)
        compute.wait_event(done)
        dev.record_stream(compute)
        self.release(buf, done)
        return dev.view(dtype)

    def download(self, x: "torch.Tensor"):
        torch = self.torch
        flat = x.reshape(-1).view(torch.uint8)
        nbytes = flat.numel()
        buf = self.acquire(nbytes)
        if not self.cuda:
            buf[:nbytes].copy_(flat)
            return buf, None
        self.down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.down):
            buf[:nbytes].copy_(flat, non_blocking=True)
        flat.record_stream(self.down)  # keep x's memory until the copy has run
        return buf, self._event(self.down)


def write_shard(shard: Shard, header: tuple[bytes, list[int]], folder: Path, srcs: Sources, pool: ThreadPoolExecutor,
                progress: Progress) -> dict:
    """Write one shard: `header` is `shard_header(shard, ...)`, computed once per run."""
    head, offsets = header
    tmp = folder / (shard.name + ".tmp")
    where = str(folder / shard.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
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
        futures = [pool.submit(_write_tensor, t, fd, pos, srcs, progress, where) for t, pos in placed
                   if not _is_raw(t) and not _is_zero(t)]
        futures += [pool.submit(_copy_piece, p, fd, srcs, progress, where)
                    for p in copy_pieces([(t, pos) for t, pos in placed if _is_raw(t)])]
        for f in futures:
            f.result()
        _check_allocated(fd, total, where)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / shard.name)
    return {"name": shard.name, "bytes": total, "tensors": len(shard.tensors),
            "header_sha256": hashlib.sha256(head[8:]).hexdigest()}


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
            raise OutputError(f"the output folder {out} is inside (or is) the folder of source model {ck.name!r} ({src})",
                              fix="write the output somewhere else; surgery never writes into a source model")


def _check_space(folder: Path, need: int):
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(f"the output needs {need:,} bytes but only {free:,} are free", where=str(folder),
                          fix="free disk space or choose an output folder on a larger disk")


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
        raise OutputError(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__})",
                          fix="use --device cpu (or auto), or install a CUDA build of torch")
    idx = int(device.split(":")[1]) if ":" in device else 0
    if idx >= torch.cuda.device_count():
        raise OutputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible",
                          fix=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
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
                raise OutputError(f"{t.name} is computed on whole tensors ({t.recipe.describe()[:60]}...), which needs about "
                                  f"{need:,} bytes, over --max-memory {max_memory:,}",
                                  fix=f"raise --max-memory to at least {need:,} bytes")
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
        shards.append({"name": s.name, "bytes": len(head) + s.nbytes, "tensors": len(s.tensors),
                       "header_sha256": hashlib.sha256(head[8:]).hexdigest(),
                       "recipe_sha256": hashlib.sha256(recipes.encode()).hexdigest()})
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
        kept[info["name"]] = {**info, "sha256": digest}
    for leftover in staging.glob("*.tmp"):
        leftover.unlink()
    return kept


def file_sha256(path: Path, block: int = 8 << 20) -> str:
    """sha256 of a whole file, read in blocks (hashlib releases the GIL on large updates)."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _shard_entry(info: dict) -> dict:
    return {k: info[k] for k in ("name", "bytes", "tensors", "header_sha256", "sha256")}


def execute(program: Program, out: str | Path, *, force: bool = False, progress: bool | None = None,
            workers: int | None = None, device: str | None = None, max_memory: int | None = None,
            resume: bool = False, pipeline: str = "off", stats: str | Path | None = None,
            protected: dict[str, Path] | None = None) -> Result:
    """Write `program` to the folder `out` through the output-folder protocol (surgery.outdir).

    `pipeline`: "off" (default: per chunk copy in, compute, copy back, synchronously), "on" (the
    pinned-buffer, multi-stream device pipeline; opt-in until measured on GPUs), "host" (that
    pipeline with host buffers, to test it on a CPU). `stats`: a file to write device and memory
    figures to (for bench/). `protected`: more paths that --force must never replace (the plan)."""
    import time

    t0 = time.perf_counter()
    if pipeline not in ("off", "on", "host"):
        raise OutputError(f"unknown pipeline {pipeline!r}", fix="use off, on or host")
    out = output_path(out)
    _refuse_output_in_source(program, out)
    guard = {f"source model {n!r}": ck.path for n, ck in program.ckpts.items()} | dict(protected or {})
    metadata = {"format": "pt", "producer": f"surgery {__version__}"}
    headers = {s.name: shard_header(s, metadata) for s in program.shards}
    cpus = os.cpu_count() or 1
    workers = workers or 8
    show = progress if progress is not None else sys.stderr.isatty()
    dev = resolve_device(device) if any(not _is_raw(t) and not _is_zero(t) for t in program.tensors) else "cpu"
    slots = max(1, min(workers, cpus)) if dev == "cpu" else 2
    chunk = plan_memory(program, max_memory, slots, dev)
    with OutputFolder(out, force=force, protected=guard) as folder:
        staged_io = None
        if pipeline == "host" or (pipeline == "on" and dev != "cpu"):
            # free pinned buffers kept for reuse: a few chunks per compute slot, within --max-memory
            pool_bytes = max_memory // 2 if max_memory else slots * 6 * chunk * 4
            staged_io = StagedIO(dev, pool_bytes, backend="cuda" if dev != "cpu" else "host")
        srcs = Sources(compute_slots=slots, device=dev, chunk_elements=chunk, staging=staged_io)
        try:
            srcs.open_all(program)
            record = _shard_record(program, headers, srcs.identity())
            build = record_id(record)
            if resume and folder.notes and _published_build(out) == build:
                return Result(out, program.num_layers, program.num_params, program.bytes_out,
                              [s.name for s in program.shards], time.perf_counter() - t0, program.new_layers)
            folder.check_target()
            _check_space(out.parent, program.bytes_out + (1 << 20))
            staging = folder.staging
            kept = _resumable(staging, record) if resume else {}
            if resume and not kept and not staging.exists():
                raise OutputError(f"nothing to resume: no interrupted run for {out} (looked for {staging.name})",
                                  fix="run without --resume")
            done = {k: v["sha256"] for k, v in kept.items()}
            if not kept:
                folder.fresh_staging()
                atomic_write(staging / RECORD, json.dumps(record))
            _run_shards(program, headers, staging, srcs, record, done, kept, workers, show)
            srcs.check_unchanged()
            infos = [_shard_entry({**i, "sha256": done[i["name"]]}) for i in record["shards"]]
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
        Path(stats).write_text(json.dumps({
            "device": dev, "pipeline": pipeline, "peak_gpu_mb": peak, "chunk_elements": srcs.chunk_elements,
            "peak_staging_mb": staged_io.peak / 2**20 if staged_io else None}))
    return Result(out, program.num_layers, program.num_params, program.bytes_out, [s.name for s in program.shards],
                  time.perf_counter() - t0, program.new_layers)


def _run_shards(program: Program, headers, staging: Path, srcs: Sources, record: dict, done: dict[str, str],
                kept: dict, workers: int, show: bool) -> None:
    """Write every shard not kept from an interrupted run; hash each as it is finished (on its own
    thread, overlapping the next shard) and record the hash, so --resume keeps it and verify checks it."""
    bar = Progress(program.bytes_out, len(program.tensors), show)
    lock = threading.Lock()

    def hashed(name: str) -> None:
        digest = file_sha256(staging / name)
        with lock:
            done[name] = digest
            atomic_write(staging / RECORD, json.dumps({**record, "done": done}))

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="surgery-io") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-hash") as hasher:
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
    try:
        return json.loads((out / "surgery.json").read_text()).get("build")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _write_metadata(program: Program, folder: Path, shard_info: list[dict], build: str):
    try:
        _write_metadata_files(program, folder, shard_info, build)
    except OSError as e:
        raise _write_error(e, f"{folder} ({e.filename or 'metadata'})", 1 << 20) from None


def _write_metadata_files(program: Program, folder: Path, shard_info: list[dict], build: str):
    from .card import model_card
    from .report import provenance

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
    from .show import layer_map_svg

    (folder / "layer_map.svg").write_text(layer_map_svg(program))
    (folder / "README.md").write_text(model_card(program))
    weight_map = {t.name: s.name for s in program.shards for t in s.tensors}
    index = {"metadata": {"total_size": program.bytes_out, "total_parameters": program.num_params},
             "weight_map": weight_map}
    # surgery.json, then the index, last of all: a folder with an index has everything else.
    prov = provenance(program, shard_info)
    prov["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    prov["build"] = build
    atomic_write(folder / "surgery.json", json.dumps(prov, indent=2) + "\n")
    atomic_write(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
