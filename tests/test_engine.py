"""The streaming engine: chunking, sharding, init modes, scale, provenance, hub refs, interruption."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch

import surgery
from click.testing import CliRunner

from surgery import engine
from surgery.cli import main
from surgery.synthetic import write_synthetic_llama
from surgery.tiny import logits

from .conftest import kill_once_a_shard_is_written, load_tensors, read_json, write_plan

import pytest


def test_chunking_does_not_change_bytes(models, tmp_path, monkeypatch):
    a, b = models("llama"), models("llama", noise=0.02)
    text = f"""
models: {{a: {a}, b: {b}}}
steps:
  - merge: {{method: slerp, models: [a, b], t: [0, 1]}}
  - merge: {{method: linear, models: [a, b], weights: [0.2, 0.9], layers: [0, 2]}}
  - expand: {{groups: 3, init: random, std: 0.05, seed: 3}}
  - scale: {{factor: 0.5, filter: mlp, layers: [0, 2]}}
output: {{dtype: bfloat16}}
"""
    plan = write_plan(tmp_path, text)
    ref = load_tensors(surgery.apply(plan, tmp_path / "big", progress=False).path)
    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 97)  # odd, smaller than most tensors
    monkeypatch.setattr(surgery.recipes.RandomNormal, "BLOCK", 1 << 20)
    got = load_tensors(surgery.apply(plan, tmp_path / "small", progress=False, workers=3).path)
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), k


def test_small_shards_load(models, tmp_path):
    src = models("qwen3")
    plan = write_plan(
        tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{dus: {{trim: 1}}}}]\noutput: {{shard_size: 40KB}}\n"
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    assert len(res.shards) > 3
    index = read_json(res.path / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == res.shards
    for s in res.shards:
        assert (res.path / s).stat().st_size <= 40_000 + 4096 or len({k for k, v in index["weight_map"].items() if v == s}) == 1
    assert logits(res.path).shape[-1] == 128
    # nothing but the expected files: no temporaries left behind
    names = sorted(p.name for p in res.path.iterdir())
    assert all(not n.endswith(".tmp") for n in names)
    assert {"config.json", "README.md", "surgery.json", "tokenizer.json", "generation_config.json", "layer_map.svg"} <= set(names)
    assert "![layer map" in (res.path / "README.md").read_text()
    svg = (res.path / "layer_map.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<line ") == 6 and ">copy</text>" in svg  # one line per output layer
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_init_modes(models, tmp_path):
    src = models("qwen2")  # qwen2 has attention biases
    fam = surgery.api.open_checkpoint("x", "x", src).family
    srcs = load_tensors(src)
    outs = {}
    for init in ("zero", "random", "copy"):
        extra = ", std: 0.05, seed: 7" if init == "random" else ""
        plan = write_plan(
            tmp_path / init, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 1, init: {init}{extra}}}}}]\n"
        )
        outs[init] = load_tensors(surgery.apply(plan, tmp_path / init / "out", progress=False).path)
    for name, t in outs["zero"].items():
        if name.startswith("model.layers.4."):
            suffix = name.removeprefix("model.layers.4.")
            ref = srcs[f"model.layers.3.{suffix}"]
            if fam.is_norm(suffix):
                assert torch.equal(t, ref), name
            else:
                assert not t.any(), name
    rnd = outs["random"]
    w = rnd["model.layers.4.mlp.up_proj.weight"]
    assert abs(w.std().item() - 0.05) < 0.005 and abs(w.mean().item()) < 0.005
    assert not rnd["model.layers.4.self_attn.q_proj.bias"].any()
    assert torch.equal(rnd["model.layers.4.input_layernorm.weight"], srcs["model.layers.3.input_layernorm.weight"])
    for name, t in outs["copy"].items():
        if name.startswith("model.layers.4."):
            assert torch.equal(t, srcs[name.replace("layers.4.", "layers.3.")])
    # seeded: the same plan gives the same bytes; another seed does not
    plan = write_plan(
        tmp_path / "r2",
        f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 1, init: random, std: 0.05, seed: 7}}}}]\n",
    )
    again = load_tensors(surgery.apply(plan, tmp_path / "r2" / "out", progress=False).path)
    assert torch.equal(again["model.layers.4.mlp.up_proj.weight"], w)
    plan = write_plan(
        tmp_path / "r3",
        f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 1, init: random, std: 0.05, seed: 8}}}}]\n",
    )
    other = load_tensors(surgery.apply(plan, tmp_path / "r3" / "out", progress=False).path)
    assert not torch.equal(other["model.layers.4.mlp.up_proj.weight"], w)
    assert read_json(tmp_path / "r3" / "out" / "surgery.json")["new_layers"] == [4]


def test_random_default_std_from_config(models, tmp_path):
    src = models("llama")
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 2, init: random}}}}]\n")
    rep = surgery.validate(plan)
    assert "random (std 0.02, seed 0)" in rep.layer_map[2]["how"]


def test_scale_is_exact(models, tmp_path):
    src = models("llama")
    plan = write_plan(
        tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{scale: {{factor: 0.25, layers: [1, 2], filter: down_proj}}}}]\n"
    )
    out = load_tensors(surgery.apply(plan, tmp_path / "out", progress=False).path)
    s = load_tensors(src)
    assert torch.equal(out["model.layers.1.mlp.down_proj.weight"], s["model.layers.1.mlp.down_proj.weight"] * 0.25)
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], s["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.down_proj.weight"], s["model.layers.0.mlp.down_proj.weight"])


def test_validate_reads_no_tensor_data(models, tmp_path, monkeypatch):
    src = models("llama")
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{dus: {{trim: 1}}}}]\n")

    def forbidden(*a, **k):
        raise AssertionError("validate read tensor data")

    monkeypatch.setattr(os, "pread", forbidden)
    monkeypatch.setattr(os, "preadv", forbidden)
    monkeypatch.setattr(os, "copy_file_range", forbidden)
    rep = surgery.validate(plan)
    assert rep.valid and rep.program.num_layers == 6
    d = rep.as_dict()
    assert d["output"]["bytes"] == rep.program.bytes_out and d["layer_map"][3]["sources"] == [["b", 1]]
    assert d["output"]["config_changes"] == ["num_hidden_layers: 4 -> 6"]


def test_provenance_and_model_card(models, tmp_path):
    src = models("mistral")
    plan = write_plan(
        tmp_path, f"name: tiny mistral pro\nmodels: {{base: {src}}}\nsteps: [{{take: {{model: base}}}}, {{expand: {{groups: 4}}}}]\n"
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    prov = read_json(res.path / "surgery.json")
    assert prov["new_layers"] == [1, 3, 5, 7]
    assert prov["plan"]["content"]["steps"][1] == {"expand": {"groups": 4}}
    assert prov["sources"]["base"]["header_sha256"]["model.safetensors"]
    assert prov["output"]["shards"][0]["name"] == res.shards[0]
    card = (res.path / "README.md").read_text()
    assert card.startswith("---\n") and "# tiny mistral pro" in card
    assert "| 1 | base[0] | identity (output projections zeroed) [expand] |" in card


def test_progress_bar_on_request(models, tmp_path, capsys):
    src = models("llama")
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}]\n")
    surgery.apply(plan, tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "apply" in err and "tensors" in err
    surgery.apply(plan, tmp_path / "out2", progress=False)
    assert capsys.readouterr().err == ""


def test_hub_id_from_offline_cache(models, tmp_path, monkeypatch):
    src = models("llama")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / commit
    shutil.copytree(src, snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = write_plan(tmp_path, "models: {base: tiny-org/tiny-llama}\nsteps: [{take: {model: base}}]\n")
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    assert res.num_layers == 4
    assert "base_model:\n- tiny-org/tiny-llama" in (res.path / "README.md").read_text()
    plan = write_plan(tmp_path, "models: {base: tiny-org/absent}\nsteps: [{take: {model: base}}]\n", "p2.yaml")
    rep = surgery.validate(plan)
    assert not rep.valid and "not in the local cache" in rep.problems[0].what and "HF_HUB_OFFLINE" in rep.problems[0].what


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_bytes(tmp_path):
    """20 SIGKILLs at random moments, each run after the first with --resume: after every kill no
    folder with an index exists unless complete, and the final output equals a clean run's bytes."""
    src = write_synthetic_llama(tmp_path / "src", (256, 8, 1024, 16000, 4, 2, False), dtype="float32")
    plan = write_plan(
        tmp_path,
        f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}, {{expand: {{groups: 8, init: random}}}}]\n"
        "output: {dtype: bfloat16, shard_size: 2MB}\n",
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "surgery.cli", "apply", str(plan), "-q", "--workers", "1"]
    t0 = time.perf_counter()
    subprocess.run(base + ["-o", str(tmp_path / "clean")], check=True, env=env)
    full = time.perf_counter() - t0
    reference = {f.name: f.read_bytes() for f in (tmp_path / "clean").glob("*.safetensors")}
    assert len(reference) > 3
    rng = random.Random(0)
    # one kill right after the first shard is finished, so --resume surely has shards to keep
    staging = tmp_path / ".out.surgery-partial"
    kill_once_a_shard_is_written(base + ["-o", str(out)], staging, env)
    kills, resumed_shards = 1, len(list(staging.glob("model-*.safetensors")))
    while kills < 20:
        staging = tmp_path / ".out.surgery-partial"
        cmd = base + ["-o", str(out)] + (["--resume"] if staging.exists() else [])
        p = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        try:
            # start-up (importing torch) takes most of a run: aim most kills at the writing
            p.wait(timeout=full * (rng.uniform(0.05, 0.5) if kills % 4 == 0 else rng.uniform(0.5, 1.0)))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        assert (out / "model.safetensors.index.json").exists() == out.exists()
        if (staging / "model.safetensors.index.json").exists():  # killed between the index and the rename:
            assert CliRunner().invoke(main, ["verify", str(staging)]).exit_code == 0  # then it is complete
        resumed_shards = max(resumed_shards, len(list(staging.glob("model-*.safetensors"))) if staging.exists() else 0)
        if out.exists():  # finished: equal to the clean run, then start another cycle
            assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == reference
            assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
            shutil.rmtree(out)
    assert resumed_shards > 0  # some kills happened after shards were finished, so resume had work to keep
    subprocess.run(base + ["-o", str(out)] + (["--resume"] if (tmp_path / ".out.surgery-partial").exists() else []), check=True, env=env)
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == reference
    assert not (tmp_path / ".out.surgery-partial").exists()


def test_resume_refuses_or_restarts_safely(models, tmp_path):
    src = models("llama")
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}]\noutput: {{shard_size: 40KB}}\n")
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "out"), "--resume"])
    assert r.exit_code == 1 and "nothing to resume" in r.output
    # a partial folder from another plan: its shards are not reused, the result is still right
    staging = tmp_path / ".out.surgery-partial"
    staging.mkdir()
    (staging / ".surgery-shards.json").write_text('{"shards": []}')
    (staging / "model-00001-of-00005.safetensors").write_bytes(b"junk")
    res = surgery.apply(plan, tmp_path / "out", progress=False, resume=True)
    assert CliRunner().invoke(main, ["verify", str(res.path)]).exit_code == 0


def test_verify_finds_damage(models, tmp_path):
    src = models("llama")
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}]\noutput: {{shard_size: 40KB}}\n")
    out = surgery.apply(plan, tmp_path / "out", progress=False).path
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    with open(shards[0], "r+b") as f:
        f.truncate(f.seek(0, 2) - 10)
    shards[1].unlink()
    raw = bytearray(shards[2].read_bytes())
    raw[12] ^= 1
    shards[2].write_bytes(bytes(raw))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{shards[0].name}: has" in r.output and "surgery.json records" in r.output
    assert f"{shards[1].name}: missing" in r.output and f"{shards[2].name}: header differs" in r.output


@pytest.mark.slow
def test_disk_full_names_the_file_and_leaves_nothing(models, tmp_path):
    import resource

    src = write_synthetic_llama(tmp_path / "src", (128, 4, 256, 4000, 4, 2, False), dtype="float32")
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}, {{dus: {{trim: 1}}}}]\n")

    def small_disk():  # every file this process writes is capped at 1 MB: EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    p = subprocess.run(
        [sys.executable, "-m", "surgery.cli", "apply", str(plan), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "out of space writing" in p.stderr and "model-00001-of-00001.safetensors" in p.stderr and "bytes" in p.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.surgery-partial").exists()
