"""Reading source tensors: every source file opened once before any work, checked against the
headers read at planning time, read with pread (thread-safe) into host or device tensors."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.io.safetensors import TensorInfo, dtype_name, itemsize, read_header_fd
from surgery.compile import Program
from surgery.errors import OutputError

if TYPE_CHECKING:
    import torch

    from surgery.engine.staging import StagedIO

# torch is imported only when a recipe needs computing: copy-only plans (slicing, stacking,
# depth up-scaling) never pay its import time.


CHUNK_ELEMENTS = 1 << 22  # 4M elements: 16 MB of fp32 per intermediate


def torch_dtype(code: str) -> "torch.dtype":
    import torch

    return getattr(torch, dtype_name(code))


class Sources:
    """Open file descriptors of source shards, shared by the worker threads (pread is thread-safe)."""

    def __init__(self, compute_slots: int = 2, device: str = "cpu", chunk_elements: int | None = None, staging: "StagedIO | None" = None):
        self._fds: dict[Path, int] = {}
        self._stat: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.compute_slots = threading.BoundedSemaphore(compute_slots)
        self.device = device  # where computed recipes run; reads and writes stay on the host
        self.chunk_elements = chunk_elements or CHUNK_ELEMENTS
        self.io = staging  # pinned buffers and copy streams between host and device (None: plain host tensors)
        self._once: dict = {}  # results every tensor of this run shares (router gates), see once()
        self._once_lock = threading.Lock()

    def once(self, key, compute):
        """`compute()`, run once per key for this run whichever thread asks first (the others wait):
        a result many output tensors read, such as every layer's router gates from one pass over the
        prompts. Kept for this run only, so a source changed between two runs is read again."""
        with self._once_lock:
            if key not in self._once:
                self._once[key] = compute()
            return self._once[key]

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
                raise OutputError(
                    "source file changed since the plan was compiled (its header differs)",
                    where=str(f),
                    fix="run again; do not change source models while surgery reads them",
                )

    def check_unchanged(self) -> None:
        """A source file changed in place during the run (size or mtime differ) fails it."""
        for f, fd in self._fds.items():
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != self._stat[f]:
                raise OutputError(
                    "source file was modified while surgery read it; the output may mix old and new data and was not published",
                    where=str(f),
                    fix="run again once the file no longer changes",
                )

    def identity(self) -> dict[str, list[int]]:
        """Size and mtime of every source file, for the resume record."""
        return {str(f): list(v) for f, v in sorted(self._stat.items())}

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:  # a file open_all did not see (analyze reads this way, without a Program)
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
                raise OutputError(f"unexpected end of file reading tensor {t.name!r} (the file changed or is truncated)", where=str(t.file))
            done += n

    def read_device(self, t: TensorInfo, e0: int, e1: int) -> "torch.Tensor":
        """Elements [e0, e1) of `t` on the compute device, staged through a pinned buffer."""
        if t.in_memory is not None or self.io is None:
            return self.read(t, e0, e1).to(self.device)
        return self.io.upload(lambda view: self.read_into(t, e0, view), (e1 - e0) * itemsize(t.dtype), torch_dtype(t.dtype))
