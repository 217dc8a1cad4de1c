"""The benchmark harnesses run (tiny sizes, CPU): so a GPU session finds them working, and their
tables hold what the issues ask for. The timings themselves are not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script, *args, tmp):
    r = subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--work", str(tmp / "work"), "--results", str(tmp / "res")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [js] = (tmp / "res").glob("*.json")
    [md] = (tmp / "res").glob("*.md")
    return json.loads(js.read_text()), md.read_text()


@pytest.mark.slow
def test_apply_benchmark_harness(tmp_path):
    doc, md = run("bench_apply.py", "--size", "tiny", "--no-mergekit", tmp=tmp_path)
    cases = {r["case"] for r in doc["results"] if r["tool"] == "surgery"}
    assert cases == {
        "solar-dus 32->48",
        "llama-pro 32->40",
        "upcycle 32 MLPs -> 8 experts",
        "gstack 4x first 6 layers",
        "gradient-slerp (cpu)",
        "linear (cpu)",
    }
    assert all(r["rc"] == 0 and r["peak_rss_mb"] > 0 for r in doc["results"])
    assert {"cat", "cp -r"} <= {r["tool"] for r in doc["results"]} and "nan" not in md
    doc, _ = run("bench_apply.py", "--size", "tiny", "--no-mergekit", "--only", "upcycle", "--reap", tmp=tmp_path / "reap")
    [up] = [r for r in doc["results"] if r["tool"] == "surgery"]
    assert doc["reap"] and up["rc"] == 0 and up["bytes"] > 0


@pytest.mark.slow
def test_train_benchmark_harness(tmp_path):
    doc, md = run("bench_train.py", "--size", "tiny", tmp=tmp_path)
    assert [r["variant"] for r in doc["rows"]] == ["HF Trainer (plain)", "surgery train"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in doc["rows"])
    assert doc["meta"]["flops_per_token"] > 6 * doc["meta"]["params"]  # 6N plus the attention term
    assert "| surgery train |" in md


@pytest.mark.slow
def test_mixture_benchmark_harness(tmp_path):
    doc, md = run("bench_mixture.py", "--size", "tiny", tmp=tmp_path)
    assert [r["mixture"] for r in doc["rows"]] == ["tokens", "entropy", "fitted"]
    assert all(abs(sum(r["proportions"].values()) - 1) < 1e-6 and min(r["proportions"].values()) >= 0.05 - 1e-9 for r in doc["rows"])
    assert set(doc["fit"]) == {"docs", "code"} and all(f["held_out"]["points"] > 0 for f in doc["fit"].values())
    assert "| fitted |" in md and "law's error" in md


@pytest.mark.slow
def test_growth_benchmark_harness(tmp_path):
    doc, md = run("bench_growth.py", "--size", "tiny", tmp=tmp_path)
    runs = [r["run"] for r in doc["rows"]]
    assert runs == [
        "scratch",
        "control-depth",
        "control-width",
        "stack",
        "zero",
        "random+mask",
        "random-interleaved+mask",
        "learn",
        "split-width",
        "split-width+shares",
        "zero-width",
        "random-width+mask",
        "learn-width",
    ]
    done = [r for r in doc["rows"] if not r.get("diverged")]
    assert len(done) == len(runs)
    assert all(r["flops"] > 0 and r["curve"] and r["train_curve"] for r in done)
    assert doc["rows"][0]["train_speedup_paper"] == 0.0 and doc["rows"][0]["held_out_flops_saved"] == 0.0
    # a grown run spends fewer FLOPs than scratch for the same tokens (its first stage is smaller)
    assert all(r["flops"] < doc["rows"][0]["flops"] for r in done[1:])
    assert "| learn-width | width | G_learn |" in md and "| zero | depth | G_zero |" in md and "+46.6%" in md
    # the paper's metric and ours agree where both exist: sp = 1 / (1 - saved) - 1
    for r in done:
        sp, saved = r["train_speedup_paper"], r["train_flops_saved"]
        if sp is not None and saved is not None:
            assert abs(sp - (1 / (1 - saved) - 1)) < 0.01


@pytest.mark.slow
def test_upcycle_benchmark_harness(tmp_path):
    doc, md = run("bench_upcycle.py", "--size", "tiny", tmp=tmp_path)
    runs = {r["run"]: r for r in doc["runs"]}
    assert set(runs) == {"dense", "upcycled", "upcycled-zero"} and all(r["eval_loss"] > 0 for r in runs.values())
    assert len(runs["upcycled"]["final_expert_load"]) == 4 and "| upcycled |" in md


def test_reap_frees_only_shards_the_engine_recorded_done(tmp_path):
    """bench_apply --reap: a shard recorded done (written, fsynced, hashed) keeps its size as a hole;
    a shard still being written is left alone."""
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("bench_apply", BENCH / "bench_apply.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    side = tmp_path / ".out.surgery-partial"
    side.mkdir()
    for name in ("a.safetensors", "b.safetensors.tmp"):
        (side / name).write_bytes(b"x" * (1 << 20))
    (side / ".surgery-shards.json").write_text(json.dumps({"done": {"a.safetensors": "00"}}))
    with mod.Reaper(tmp_path / "out") as r:
        deadline = time.time() + 10
        while not r.freed and time.time() < deadline:
            time.sleep(0.05)
    a, b = (side / "a.safetensors").stat(), (side / "b.safetensors.tmp").stat()
    assert r.freed == a.st_size == 1 << 20 and a.st_blocks == 0
    assert (side / "b.safetensors.tmp").read_bytes() == b"x" * (1 << 20) and b.st_blocks > 0
