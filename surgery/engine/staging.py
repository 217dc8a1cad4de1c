"""Device staging for the opt-in pipelined path (`apply --pipeline on`): pinned host buffers in
size classes and copy streams. The default device path is synchronous (copy in, compute, copy back)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import torch

# torch is imported only when a recipe needs computing: copy-only plans (slicing, stacking,
# depth up-scaling) never pay its import time.


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
