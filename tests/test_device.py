"""--device and --max-memory: the same bytes on every device and under any memory bound."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main

from .conftest import load_tensors, write_plan
from .test_mergekit_compat import within_ulps

MIXED = """
models: {{a: {a}, b: {b}}}
steps:
  - merge: {{method: slerp, models: [a, b], t: [0, 1]}}
  - merge: {{method: linear, models: [a, b], weights: [0.2, 0.9], layers: [0, 2]}}
  - merge: {{method: nuslerp, models: [a, b], weights: [0.3, 0.7], layers: [2, 4]}}
  - expand: {{groups: 4, init: random, std: 0.05, seed: 3}}
  - take: {{model: a, layers: [1, 3]}}
output: {{dtype: bfloat16}}
"""


@pytest.fixture
def mixed_plan(models, tmp_path):
    return write_plan(tmp_path, MIXED.format(a=models("llama"), b=models("llama", noise=0.02)))


def test_cpu_device_and_memory_bound_give_the_same_bytes(mixed_plan, tmp_path):
    ref = load_tensors(surgery.apply(mixed_plan, tmp_path / "ref", progress=False).path)
    cpu = load_tensors(surgery.apply(mixed_plan, tmp_path / "cpu", progress=False, device="cpu").path)
    small = load_tensors(surgery.apply(mixed_plan, tmp_path / "small", progress=False, max_memory=300_000).path)
    for k in ref:
        assert torch.equal(cpu[k].view(torch.uint8), ref[k].view(torch.uint8)), k
        assert torch.equal(small[k].view(torch.uint8), ref[k].view(torch.uint8)), k


def test_whole_tensor_recipes_over_the_memory_bound_are_refused(mixed_plan, tmp_path):
    r = CliRunner().invoke(main, ["apply", str(mixed_plan), "-o", str(tmp_path / "o"), "--max-memory", "20KB"])
    assert r.exit_code == 1 and "computed on whole tensors" in r.output and "raise --max-memory" in r.output
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["apply", str(mixed_plan), "-o", str(tmp_path / "o"), "--max-memory", "lots"])
    assert r.exit_code == 1 and "--max-memory" in r.output and "not a size" in r.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(mixed_plan, tmp_path):
    for dev, msg in (("cuda", "torch sees no CUDA GPU"), ("tpu", "unknown device 'tpu'")):
        r = CliRunner().invoke(main, ["apply", str(mixed_plan), "-o", str(tmp_path / "o"), "--device", dev])
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the accelerator machine)")
def test_gpu_matches_cpu(mixed_plan, tmp_path):
    cpu = load_tensors(surgery.apply(mixed_plan, tmp_path / "cpu", progress=False, device="cpu").path)
    gpu = load_tensors(surgery.apply(mixed_plan, tmp_path / "gpu", progress=False, device="cuda").path)
    assert sorted(cpu) == sorted(gpu)
    for k in cpu:
        if k.startswith(("model.layers.12.", "model.layers.13.")):  # the last take: copies, bitwise
            assert torch.equal(cpu[k], gpu[k]), k
        else:
            assert within_ulps(cpu[k], gpu[k]), k


@pytest.mark.slow
def test_staged_pipeline_on_the_host_gives_the_same_bytes(mixed_plan, tmp_path, monkeypatch):
    """The device pipeline (pool buffers, deferred writes one chunk behind) run with host buffers:
    the same bytes as the direct path, for every chunk size."""
    ref = load_tensors(surgery.apply(mixed_plan, tmp_path / "ref", progress=False).path)
    stats = tmp_path / "stats.json"
    for i, mm in enumerate((None, 300_000, 60_000)):
        out = surgery.apply(mixed_plan, tmp_path / f"staged{i}", progress=False, max_memory=mm, pipeline="host", stats=stats).path
        got = load_tensors(out)
        for k in ref:
            assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), (mm, k)
        s = __import__("json").loads(stats.read_text())
        assert s["peak_staging_mb"] is not None and s["peak_staging_mb"] > 0


def test_staging_pool_reuses_buffers_and_bounds_what_it_keeps():
    from surgery.engine import StagedIO

    io = StagedIO("cpu", 4 << 20, backend="host")
    a = io.acquire(100)
    assert a.numel() == StagedIO.MIN_BUFFER  # size classes: at least 1 MiB, powers of two
    io.release(a, None)
    b = io.acquire(StagedIO.MIN_BUFFER - 5)
    assert b.data_ptr() == a.data_ptr()  # reused, not reallocated
    big = [io.acquire(3 << 20) for _ in range(3)]  # 4 MiB class each: in use, so allocated
    assert io.live == StagedIO.MIN_BUFFER + 3 * (4 << 20)
    for x in big:
        io.release(x, None)
    assert io.cached <= io.max_bytes and io.live == StagedIO.MIN_BUFFER + io.cached  # the rest were dropped
    x = io.upload(lambda v: v.__setitem__(slice(None), 7), 16, torch.uint8)
    assert x.tolist() == [7] * 16
    buf, ev = io.download(torch.arange(4, dtype=torch.int32))
    assert ev is None and torch.equal(buf[:16].view(torch.int32), torch.arange(4, dtype=torch.int32))


@pytest.mark.slow
def test_slerp_reads_once_or_twice_to_the_same_bytes(mixed_plan, tmp_path, monkeypatch):
    """Small slerp inputs are kept from the statistics pass; larger ones are read again: same bytes."""
    import surgery.engine as engine
    import surgery.engine.evaluate  # noqa: F401  (engine.evaluate below)

    reads = []
    real = engine.Sources.read
    monkeypatch.setattr(engine.Sources, "read", lambda self, t, e0, e1: reads.append(t.name) or real(self, t, e0, e1))
    once = load_tensors(surgery.apply(mixed_plan, tmp_path / "once", progress=False).path)
    q = "model.layers.1.self_attn.q_proj.weight"  # a slerp input (layer 1 of both models), used by other steps too
    n_once, reads[:] = reads.count(q), []
    monkeypatch.setattr(engine.evaluate, "SLERP_KEEP_PER_ELEMENT", 0)
    twice = load_tensors(surgery.apply(mixed_plan, tmp_path / "twice", progress=False).path)
    for k in once:
        assert torch.equal(once[k].view(torch.uint8), twice[k].view(torch.uint8)), k
    assert reads.count(q) - n_once == 2  # the slerp's second pass read both models' tensor again


@pytest.mark.slow
def test_selftest_passes_here_and_catches_a_faulty_device_path(monkeypatch):
    r = CliRunner().invoke(main, ["selftest", "--device", "cpu"])
    assert r.exit_code == 0 and "selftest passed" in r.output and "ok" in r.output, r.output
    from surgery.engine import StagedIO

    real = StagedIO.download

    def corrupt(self, x):  # a synchronisation bug would look like this: a chunk written with stale data
        return real(self, x * 1.5)

    monkeypatch.setattr(StagedIO, "download", corrupt)
    r = CliRunner().invoke(main, ["selftest", "--device", "cpu"])
    assert r.exit_code == 1 and "MISMATCH" in r.output and "selftest failed" in r.output, r.output
