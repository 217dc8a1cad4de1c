"""Integrity: no change, race, fault or hostile input publishes wrong weights or loses a folder.

Each test is one class of fault, tried through more than one instance."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery import engine
from surgery.engine import write as engine_write
from surgery.cli import main
from surgery.errors import OutputError, SurgeryError
from surgery.io.outdir import COMPLETE, OutputFolder

from .conftest import load_tensors, write_plan


def _interrupted_apply(monkeypatch, plan, out: Path, n: int, **kw) -> Path:
    """Apply `plan` to `out`, stopped (as Ctrl-C does, leaving the side folder) after `n` shards;
    returns the side folder."""
    real = engine_write.write_shard
    calls = {"n": 0}

    def write_shard(*a, **k):
        if calls["n"] >= n:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(engine_write, "write_shard", write_shard)
        with pytest.raises(KeyboardInterrupt):
            surgery.apply(plan, out, progress=False, **kw)
    return out.parent / f".{out.name}.surgery-partial"


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


MERGE = """models: {{a: {a}, b: {b}}}
steps: [{{merge: {{method: linear, models: [a, b], weights: [{w}, {v}]}}}}]
output: {{shard_size: 40KB}}
"""


@pytest.mark.parametrize("change", ["weights", "source"])
def test_resume_after_a_change_rewrites_what_the_change_touches(models, tmp_path, monkeypatch, change):
    a = models("llama")
    b = tmp_path / "b"
    shutil.copytree(models("llama", noise=0.02), b)
    plan = write_plan(tmp_path, MERGE.format(a=a, b=b, w=0.3, v=0.7))
    out = tmp_path / "out"
    staging = _interrupted_apply(monkeypatch, plan, out, 3)
    assert len(list(staging.glob("model-*.safetensors"))) == 3 and not out.exists()
    if change == "weights":
        write_plan(tmp_path, MERGE.format(a=a, b=b, w=0.6, v=0.4))
    else:  # another checkpoint of the same shapes put in place of b
        other = models("llama", noise=0.05)
        for f in other.glob("*.safetensors"):
            shutil.copy(f, b / f.name)
    surgery.apply(plan, out, progress=False, resume=True)
    fresh = surgery.apply(plan, tmp_path / "fresh", progress=False)
    assert _bytes(out) == _bytes(fresh.path)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_resume_without_a_change_keeps_the_finished_shards(models, tmp_path, monkeypatch):
    plan = write_plan(tmp_path, MERGE.format(a=models("llama"), b=models("llama", noise=0.02), w=0.3, v=0.7))
    out = tmp_path / "out"
    staging = _interrupted_apply(monkeypatch, plan, out, 2)
    inodes = {f.name: f.stat().st_ino for f in staging.glob("model-*.safetensors")}
    surgery.apply(plan, out, progress=False, resume=True)
    assert {n: (out / n).stat().st_ino for n in inodes} == inodes  # kept, not rewritten
    assert _bytes(out) == _bytes(surgery.apply(plan, tmp_path / "fresh", progress=False).path)


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    out = tmp_path / "out"
    with OutputFolder(out.absolute()):  # another process would hold the same lock
        code = (
            "import surgery, sys\n"
            f"try:\n    surgery.apply({str(plan)!r}, {str(out)!r}, progress=False)\n"
            "except surgery.errors.OutputError as e:\n    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3 and f"already being written by PID {os.getpid()}" in r.stdout, r.stdout + r.stderr
        assert not out.exists()
    surgery.apply(plan, out, progress=False)  # released: the next run works
    assert (out / "model.safetensors.index.json").is_file() and not (tmp_path / ".out.surgery-lock").exists()


def test_a_source_replaced_by_rename_during_the_run_is_harmless(models, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}, {{scale: {{factor: 0.5}}}}]\n")
    want = _bytes(surgery.apply(plan, tmp_path / "ref", progress=False).path)
    real = engine.Sources.open_all

    def open_then_swap(self, program):
        real(self, program)
        t = load_tensors(src)  # the same tensors, other values, saved in another order
        swapped = tmp_path / "swap.safetensors"
        save_file({k: t[k] * 3 for k in sorted(t, reverse=True)}, str(swapped))
        os.replace(swapped, src / "model.safetensors")

    monkeypatch.setattr(engine.Sources, "open_all", open_then_swap)
    got = surgery.apply(plan, tmp_path / "out", progress=False)
    assert _bytes(got.path) == want


def test_a_source_changed_in_place_during_the_run_fails_it(models, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}, {{scale: {{factor: 0.5}}}}]\n")
    real = engine.Sources.open_all

    def open_then_scribble(self, program):
        real(self, program)
        f = src / "model.safetensors"
        with open(f, "r+b") as fh:
            fh.seek(-4, os.SEEK_END)
            fh.write(b"\x01\x02\x03\x04")
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    monkeypatch.setattr(engine.Sources, "open_all", open_then_scribble)
    with pytest.raises(OutputError, match="modified while surgery read it"):
        surgery.apply(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.surgery-partial").exists()


def test_a_source_changed_between_compile_and_run_is_refused(models, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n")
    from surgery.api import compile_plan

    program = compile_plan(surgery.load_plan(plan))
    t = load_tensors(src)
    save_file({k: t[k] for k in sorted(t, reverse=True)}, str(src / "model.safetensors"))  # offsets moved
    with pytest.raises(OutputError, match="changed since the plan was compiled"):
        engine.execute(program, tmp_path / "out", progress=False)


# --force -------------------------------------------------------------------------------------


def test_force_never_replaces_what_is_not_a_model_output(models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    plan = write_plan(work, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    monkeypatch.chdir(work)
    runner = CliRunner()
    for target, expect in ((".", "current directory"), ("", "output path is empty"), (str(tmp_path), "current directory")):
        r = runner.invoke(main, ["apply", str(plan), "-o", target, "--force", "-q"])
        assert r.exit_code == 1 and expect in r.output, (target, r.output)
        assert plan.is_file()
    # a folder holding the plan (not the cwd)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["apply", str(plan), "-o", str(work), "--force", "-q"])
    assert r.exit_code == 1 and "holds the plan" in r.output and plan.is_file()
    # a parent of a source model
    src = tmp_path / "models" / "a"
    shutil.copytree(models("llama"), src)
    plan2 = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n", "p2.yaml")
    r = runner.invoke(main, ["apply", str(plan2), "-o", str(tmp_path / "models"), "--force", "-q"])
    assert r.exit_code == 1 and "holds source model 'a'" in r.output and (src / "config.json").is_file()
    # a link to a folder: refused, and nothing dangling is left behind
    real = tmp_path / "real-out"
    assert runner.invoke(main, ["apply", str(plan2), "-o", str(real), "-q"]).exit_code == 0
    link = tmp_path / "link-out"
    link.symlink_to(real)
    r = runner.invoke(main, ["apply", str(plan2), "-o", str(link), "--force", "-q"])
    assert r.exit_code == 1 and "symbolic link" in r.output
    assert link.is_symlink() and (real / "model.safetensors.index.json").is_file()
    assert not list(tmp_path.glob(".link-out.*"))
    # and a real output is replaced
    assert runner.invoke(main, ["apply", str(plan2), "-o", str(real), "-q", "--force"]).exit_code == 0


# a kill during publish ---------------------------------------------------------------------------


def _half_publish(monkeypatch, stop_after: str):
    """Make OutputFolder.publish stop like a kill would, after `stop_after` ('marker' or 'aside')."""

    def publish(self):
        from surgery.io.outdir import fsync_tree

        fsync_tree(self.staging)
        (self.staging / COMPLETE).write_text("")
        if stop_after == "aside" and self.out.exists():
            os.replace(self.out, self.old)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputFolder, "publish", publish)


@pytest.mark.parametrize("stop_after", ["marker", "aside"])
@pytest.mark.parametrize("how", ["resume", "rerun"])
def test_a_kill_during_publish_is_finished_by_the_next_run(models, tmp_path, monkeypatch, stop_after, how):
    plan_old = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n", "old.yaml")
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}, {{scale: {{factor: 2}}}}]\n")
    out = tmp_path / "out"
    surgery.apply(plan_old, out, progress=False)
    want = _bytes(surgery.apply(plan, tmp_path / "ref", progress=False).path)
    with monkeypatch.context() as m:
        _half_publish(m, stop_after)
        with pytest.raises(KeyboardInterrupt):
            surgery.apply(plan, out, progress=False, force=True)
    if how == "resume":
        res = surgery.apply(plan, out, progress=False, resume=True, force=True)
        assert res.path == out
    else:  # a plain rerun finishes the publish first, then (as always) needs --force for an existing output
        with pytest.raises(OutputError, match="already exists"):
            surgery.apply(plan, out, progress=False)
    assert _bytes(out) == want
    assert not (tmp_path / ".out.surgery-old").exists() and not (tmp_path / ".out.surgery-partial").exists()
    assert not (out / COMPLETE).exists()
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


def test_an_incomplete_publish_puts_the_old_output_back(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    out = tmp_path / "out"
    surgery.apply(plan, out, progress=False)
    before = _bytes(out)
    os.replace(out, tmp_path / ".out.surgery-old")  # moved aside, and the new one never finished
    (tmp_path / ".out.surgery-partial").mkdir()
    surgery.apply(plan, tmp_path / "out", progress=False, force=True)
    assert _bytes(out) == before and not (tmp_path / ".out.surgery-old").exists()


def test_shards_are_fsynced_before_publish(models, tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    surgery.apply(plan, tmp_path / "out", progress=False)
    names = [Path(p).name for p in synced]
    assert {
        "model-00001-of-00001.safetensors",
        "surgery.json.tmp",
        "model.safetensors.index.json.tmp",
        ".out.surgery-partial",
        tmp_path.name,
    } <= set(names)
    # the shard is durable before the resume record calls it done, and before the completion marker
    assert names.index("model-00001-of-00001.safetensors") < names.index(".surgery-shards.json.tmp", 1)
    assert names.index("model-00001-of-00001.safetensors") < names.index(".surgery-complete")


# data that leaks in ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero"])
def test_a_linked_tokenizer_file_leading_out_of_the_model_is_refused(models, tmp_path, target):
    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    (src / "special_tokens_map.json").unlink(missing_ok=True)
    (src / "special_tokens_map.json").symlink_to(target)
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n")
    rep = surgery.validate(plan)
    assert not rep.valid and "special_tokens_map.json" in str(rep.problems[0])
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "special_tokens_map.json" in r.output and not (tmp_path / "out").exists()


def test_a_link_inside_the_model_folder_is_fine(models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    (src / "blobs").mkdir()
    os.replace(src / "tokenizer_config.json", src / "blobs" / "abc")
    (src / "tokenizer_config.json").symlink_to(src / "blobs" / "abc")
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n")
    out = surgery.apply(plan, tmp_path / "out", progress=False).path
    assert not (out / "tokenizer_config.json").is_symlink() and (out / "tokenizer_config.json").is_file()


# verify checks the data ---------------------------------------------------------------------------


def test_verify_catches_a_flipped_byte_and_a_zeroed_half(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\noutput: {{shard_size: 40KB}}\n")
    out = surgery.apply(plan, tmp_path / "out", progress=False).path
    runner = CliRunner()
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    data = bytearray(shards[0].read_bytes())
    data[-100] ^= 0x01
    shards[0].write_bytes(bytes(data))
    size = shards[1].stat().st_size
    with open(shards[1], "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    r = runner.invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and r.output.count("crc32 mismatch") == 2, r.output


@pytest.mark.parametrize(
    "prov",
    [
        {"output": {"shards": [{"name": "../../../etc/passwd", "bytes": 1, "header_sha256": "x", "sha256": "y"}]}},
        {"output": {"shards": [{"name": "model.safetensors", "bytes": "12", "header_sha256": "x"}]}},
        {"output": {"shards": "nope"}},
        [1, 2],
    ],
)
def test_verify_of_a_hostile_surgery_json_is_a_clear_failure(models, tmp_path, prov):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    out = surgery.apply(plan, tmp_path / "out", progress=False).path
    (out / "surgery.json").write_text(json.dumps(prov))
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)
    assert "passwd" not in r.output or "not a file in this folder" in r.output


def test_verify_of_deep_json_and_a_missing_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    (out / "surgery.json").write_text("{}")
    (out / "config.json").write_text("{}")
    r = CliRunner().invoke(main, ["verify", str(out)])
    assert r.exit_code == 1 and "nested" in r.output
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "absent")])
    assert r.exit_code == 1 and r.output.count("no such folder") == 1 and "missing" not in r.output


# train: a kill during a checkpoint save -------------------------------------------------------------


def test_resume_skips_a_checkpoint_whose_save_was_torn(tmp_path):
    from surgery.train.checkpoints import CHECKPOINT_DONE, last_complete_checkpoint, prune_checkpoints

    ck = tmp_path / "checkpoints"
    for step, done in ((10, True), (20, True), (30, False)):
        d = ck / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        if done:
            (d / CHECKPOINT_DONE).write_text("")
    notes = []
    assert last_complete_checkpoint(ck, notes.append) == str(ck / "checkpoint-20")
    assert not (ck / "checkpoint-30").exists() and "checkpoint-30 was not saved completely" in notes[0]
    prune_checkpoints(ck, 1)
    assert sorted(p.name for p in ck.iterdir()) == ["checkpoint-20"]
    shutil.rmtree(ck)
    ck.mkdir()
    (ck / "checkpoint-5").mkdir()  # torn, and the only one: the stage starts over
    assert last_complete_checkpoint(ck, notes.append) is None


# train and eval: models that would run code or unpickle, data that is not what it says ----------------


def _train_cfg(tmp_path, model, data_line="data: {files: [train.jsonl], seq_len: 32}") -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": "hello world " * 20}) + "\n" for _ in range(40)))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {model}\noutput: {tmp_path / 'out'}\n{data_line}\nsteps: 2\nmicro_batch: 2\n")
    return cfg


@pytest.mark.parametrize(
    "hazard, message",
    [
        ("auto_map", "needs remote code"),
        ("pickle", "only pickled weights"),
        ("model_type", "is not one transformers"),
    ],
)
def test_train_and_eval_refuse_models_that_would_run_code(models, tmp_path, hazard, message):
    src = tmp_path / "m"
    shutil.copytree(models("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    if hazard == "auto_map":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
        (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    elif hazard == "pickle":
        t = load_tensors(src)
        for f in src.glob("*.safetensors"):
            f.unlink()
        torch.save(t, src / "pytorch_model.bin")
    else:
        cfg["model_type"] = "no-such-arch"
    (src / "config.json").write_text(json.dumps(cfg))
    runner = CliRunner()
    r = runner.invoke(main, ["train", str(_train_cfg(tmp_path, src))])
    assert r.exit_code == 1 and message in r.output and "remote code ran" not in r.output, r.output
    assert isinstance(r.exception, SystemExit)
    (tmp_path / "held.txt").write_text("some held-out text " * 50)
    r = runner.invoke(main, ["eval", str(src), "--data", str(tmp_path / "held.txt")])
    assert r.exit_code == 1 and message in r.output, r.output


def test_corrupt_parquet_and_non_text_records_are_reported(models, tmp_path, capfd):
    from surgery.data.sources import Source, read_pieces

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(SurgeryError, match="not a readable parquet file"):
        list(read_pieces(Source("parquet", str(bad), "data.files[0]"), None))
    jl = tmp_path / "mixed.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in ["ok", 3, ["a"], None, "fine"]) + "\n")
    got = [p[0] for p in read_pieces(Source("jsonl", str(jl), "data.files[0]"), None)]
    assert got == ["ok", "fine"]
    err = capfd.readouterr().err
    assert "skipped 3 record(s) whose 'text' is not text (first at line 2: int)" in err
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(SurgeryError, match="deep.jsonl:1: the line is nested"):
        list(read_pieces(Source("jsonl", str(deep), "data.files[0]"), None))


def test_verify_sources_recomputes_every_tensor(models, tmp_path):
    a, b = models("llama"), models("llama", noise=0.02)
    plan = write_plan(
        tmp_path,
        f"models: {{a: {a}, b: {b}}}\nsteps:\n  - merge: {{method: slerp, models: [a, b], t: [0, 1]}}\n"
        "  - expand: {groups: 2, init: random, std: 0.02, seed: 4}\noutput: {dtype: bfloat16}\n",
    )
    out = surgery.apply(plan, tmp_path / "out", progress=False, seed=9).path
    runner = CliRunner()
    r = runner.invoke(main, ["verify", str(out), "--sources"])
    assert r.exit_code == 0 and "recomputation" in r.output, r.output
    # a wrong value whose checksum was recorded as is (the crc32 check alone cannot see it)
    shard = next(out.glob("model-*.safetensors"))
    from surgery.io.safetensors import file_crc32, read_safetensors_header

    info = read_safetensors_header(shard)[0]["model.layers.1.mlp.up_proj.weight"]
    with open(shard, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\x00\x01")
    prov = json.loads((out / "surgery.json").read_text())
    for s in prov["output"]["shards"]:
        if s["name"] == shard.name:
            s["crc32"] = file_crc32(shard)
    (out / "surgery.json").write_text(json.dumps(prov))
    assert runner.invoke(main, ["verify", str(out)]).exit_code == 0
    r = runner.invoke(main, ["verify", str(out), "--sources"])
    assert r.exit_code == 1 and "model.layers.1.mlp.up_proj.weight" in r.output and "recomputation" in r.output, r.output


def test_disk_full_while_tokenizer_files_are_copied(models, tmp_path, monkeypatch):
    import errno

    from surgery.engine import write as w

    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(w.shutil, "copy2", full)
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "out of space" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.surgery-partial").exists()


def test_an_output_folder_that_cannot_be_created_is_a_located_error(models, tmp_path, monkeypatch):
    from surgery.io import outdir

    real = outdir.Path.mkdir

    def deny(self, *a, **k):
        if self.name.endswith(".surgery-partial"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(outdir.Path, "mkdir", deny)
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "cannot create the side folder: Permission denied" in r.output, r.output


def test_a_train_run_holds_its_output_too(models, tmp_path):
    cfg = _train_cfg(tmp_path, models("llama"))
    with OutputFolder((tmp_path / "out").absolute()):
        r = CliRunner().invoke(main, ["train", str(cfg), "-q"])
    assert r.exit_code == 1 and f"already being written by PID {os.getpid()}" in r.output, r.output


def test_what_apply_needs_is_checked_by_validate(models, tmp_path):
    """A corrupt tokenizer_config.json that apply would rewrite (chat_template set) fails validate,
    not apply after every shard is written."""
    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ x }}", ')
    plan = write_plan(
        tmp_path,
        f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n"
        "chat_template: '{% for m in messages %}{{ m.content }}{% endfor %}'\n",
    )
    rep = surgery.validate(plan)
    assert not rep.valid and "tokenizer_config.json" in str(rep.problems[0])
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "tokenizer_config.json" in r.output and not (tmp_path / ".out.surgery-partial").exists()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_unreachable_hub_is_a_located_error_in_every_format(tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "surgery-cache"))
    plan = write_plan(tmp_path, "models: {a: some-org/some-model}\nsteps: [{take: {model: a}}]\n")
    r = CliRunner().invoke(main, ["validate", str(plan), "--format", fmt])
    assert r.exit_code == 1 and "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    assert "some-org/some-model" in r.output
    if fmt == "json":
        doc = json.loads(r.output)
        assert doc["plans"][0]["passed"] is False


@pytest.mark.slow
def test_train_killed_during_publish_is_finished_by_resume(models, tmp_path, monkeypatch):
    from surgery.train import train

    cfg = _train_cfg(tmp_path, models("llama"))
    with monkeypatch.context() as m:
        _half_publish(m, "marker")
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False, echo=lambda *a: None)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.surgery-partial" / COMPLETE).exists()
    res = train(cfg, progress=False, echo=lambda *a: None, resume=True)
    assert res.path == (tmp_path / "out").absolute() and (tmp_path / "out" / "train.json").is_file()
    assert res.steps == 2 and not (tmp_path / ".out.surgery-train").exists()
    assert not (tmp_path / "out" / COMPLETE).exists()


def test_a_weights_link_leading_out_blames_the_link_not_an_index(models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(models("llama"), src)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(src / "model.safetensors", outside)
    (src / "model.safetensors").symlink_to(outside)
    plan = write_plan(tmp_path, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n")
    rep = surgery.validate(plan)
    assert not rep.valid and "model.safetensors links to" in str(rep.problems[0]) and "index" not in str(rep.problems[0])


# generated hostile JSON: every reader answers with located problems, never an exception --------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30,
)
SHAPED = st.fixed_dictionaries(
    {},
    optional={
        "output": st.fixed_dictionaries(
            {},
            optional={
                "shards": st.lists(
                    JSON | st.fixed_dictionaries({"name": JSON, "bytes": JSON, "header_sha256": JSON}, optional={"crc32": JSON}), max_size=3
                )
            },
        ),
        "plan": JSON,
        "sources": JSON,
    },
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=JSON, prov=JSON | SHAPED, config=JSON)
def test_verify_answers_any_json_with_problems(tmp_path_factory, index, prov, config):
    from surgery.io.verify import verify_output

    out = tmp_path_factory.mktemp("v")
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "surgery.json").write_text(json.dumps(prov))
    (out / "config.json").write_text(json.dumps(config))
    problems = verify_output(out)
    assert problems and all(p.what for p in problems)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=JSON, noise=st.text(alphabet='[]{}",:0123456789e-\\ntrue', max_size=200))
def test_parse_json_is_total(doc, noise):
    from surgery.jsonio import parse_json

    for text in (json.dumps(doc), noise, "[" * 300 + json.dumps(doc) + "]" * 300):
        try:
            parse_json(text, "x.json")
        except SurgeryError as e:
            assert e.problems[0].where == "x.json"


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "num_hidden_layers",
                "vocab_size",
                "tie_word_embeddings",
                "layer_types",
                "hidden_size",
                "text_config",
                "architectures",
            ]
        ),
        JSON,
        max_size=6,
    )
)
def test_any_config_json_is_a_located_answer(models, tmp_path_factory, config):
    src = tmp_path_factory.mktemp("cfg") / "m"
    shutil.copytree(models("llama"), src)
    base = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**base, **config}))
    plan = write_plan(src.parent, f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}]\n")
    rep = surgery.validate(plan)  # valid or located problems; never an exception
    assert rep.valid or all(p.what for p in rep.problems)


def test_links_planted_next_to_or_inside_the_output_are_never_written_through(models, tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\noutput: {{shard_size: 40KB}}\n")
    (tmp_path / ".out.surgery-lock").symlink_to(victim)  # the lock's name
    staging = _interrupted_apply(monkeypatch, plan, tmp_path / "out", 2)  # an interrupted run, then links planted in its side folder
    for name in ("config.json", "surgery.json.tmp", "model-00004-of-00005.safetensors.tmp", "README.md"):
        (staging / name).unlink(missing_ok=True)
        (staging / name).symlink_to(victim)
    surgery.apply(plan, tmp_path / "out", progress=False, resume=True)
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "out")]).exit_code == 0


def test_demo_force_replaces_only_a_demo_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    runner = CliRunner()
    for d, expect in ((".", "current directory"), ("mine", "holds other things")):
        r = runner.invoke(main, ["demo", "--dir", d, "--force", "--no-train"])
        assert r.exit_code == 1 and expect in r.output, r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_refused_rerun_keeps_the_interrupted_side_folder(models, tmp_path, monkeypatch):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\noutput: {{shard_size: 40KB}}\n")
    out = tmp_path / "out"
    surgery.apply(plan, out, progress=False)
    staging = _interrupted_apply(monkeypatch, plan, out, 2, force=True)
    before = sorted(p.name for p in staging.iterdir())
    with pytest.raises(OutputError, match="already exists"):  # forgot --force: refused, nothing lost
        surgery.apply(plan, out, progress=False)
    assert sorted(p.name for p in staging.iterdir()) == before
    surgery.apply(plan, out, progress=False, force=True, resume=True)
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0


# hostile plans and paths: each is one located error line, a non-zero exit and no traceback ---------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ("models: {a: A}\nsteps: " + "[" * 100_000 + "]" * 100_000 + "\n", "nesting deeper than 64"),
        ("- " * 50_000 + "x\n", "nesting deeper than 64"),
        ("name: !!binary aGVsbG8=\nmodels: {a: A}\nsteps: [{take: {model: a}}]\n", "binary data"),
        ("models: {a: A}\nsteps: [{take: {model: a, layers: [false, true]}}]\n", "valid integer"),
        ("models: {a: A}\nsteps: [{take: {model: a}}, {scale: {factor: .nan}}]\n", "finite number"),
        ("models: {a: A}\nsteps: [{take: {model: a}}, {expand: {groups: 1, init: random, std: .inf}}]\n", "finite number"),
        ("models: {a: A}\nsteps: [{take: {model: a}}, {widen: {intermediate: 99, init: random, std: -.inf}}]\n", "finite number"),
        ("models: {a: A, b: A}\nsteps: [{merge: {method: linear, models: [a, b], weights: [.nan, 1]}}]\n", "finite number"),
    ],
)
def test_hostile_plans_are_located_errors(models, tmp_path, text, expect):
    plan = write_plan(tmp_path, text.replace("A", str(models("llama"))))
    for cmd in (["validate", str(plan)], ["apply", str(plan), "-o", str(tmp_path / "out")]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1 and expect in r.output and "plan.yaml" in r.output, (cmd, r.output)
        assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "out, expect",
    [
        ("", "the output path is empty"),
        ("~no_such_user_xyz/out", "no such user"),
        ("x" * 5000, "must fit the file system's limit"),
        ("y" * 245, "must fit the file system's limit"),
        ("somewhere/..", "does not name a folder of its own"),
    ],
)
def test_bad_output_paths_are_located_errors(models, tmp_path, monkeypatch, out, expect):
    monkeypatch.chdir(tmp_path)
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", out, "-q"])
    assert r.exit_code == 1 and expect in r.output and isinstance(r.exception, SystemExit), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]  # nothing written, not even a lock


def test_a_nul_byte_in_the_output_path_is_refused(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    with pytest.raises(OutputError, match="NUL byte"):
        surgery.apply(plan, str(tmp_path / "a\0b"), progress=False)


def test_messages_name_the_real_cause(models, tmp_path, monkeypatch):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n", "plan[v2].yaml")
    r = CliRunner().invoke(main, ["validate", str(plan)])  # an existing file with [] in its name is a file
    assert r.exit_code == 0 and "no files match" not in r.output, r.output
    r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / "o"), "--max-memory", "1"])
    assert r.exit_code == 1 and "--max-memory: 1 bytes is too small" in r.output and "shard size" not in r.output
    r = CliRunner().invoke(main, ["advise", "--params", "7e9", "--tokens", "2e12"])  # scientific notation
    assert r.exit_code == 0 and "11.11" in r.output, r.output


def test_one_file_outputs_follow_the_same_rules(models, tmp_path):
    """export, schema and show: no overwrite without --force, never the plan itself, never through a link."""
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}]\n")
    original = plan.read_text()
    runner = CliRunner()
    r = runner.invoke(main, ["export", "--mergekit", str(plan), "-o", str(plan), "--force"])
    assert r.exit_code == 1 and "the plan this command reads" in r.output and plan.read_text() == original
    r = runner.invoke(main, ["show", str(plan), "-o", str(plan), "--force"])
    assert r.exit_code == 1 and "the plan this command reads" in r.output and plan.read_text() == original
    for cmd in (["export", "--mergekit", str(plan)], ["schema"], ["show", str(plan)]):
        target = tmp_path / "out.svg"
        target.write_text("mine")
        r = runner.invoke(main, [*cmd, "-o", str(target)])
        assert r.exit_code == 1 and "already exists" in r.output and target.read_text() == "mine", (cmd, r.output)
        assert runner.invoke(main, [*cmd, "-o", str(target), "--force"]).exit_code == 0 and target.read_text() != "mine"
        target.unlink()
        victim = tmp_path / "victim"
        victim.write_text("keep")
        target.symlink_to(victim)
        r = runner.invoke(main, [*cmd, "-o", str(target), "--force"])
        assert r.exit_code == 1 and "link" in r.output and victim.read_text() == "keep", (cmd, r.output)
        target.unlink()
