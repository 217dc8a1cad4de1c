"""Bad input: each a clear, located error, exit status 1 from the CLI, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.errors import CheckpointError, PlanError

from .conftest import load_tensors, write_plan


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


@pytest.fixture
def base(models, tmp_path):
    """A private copy of the tiny Llama (tests here corrupt it)."""
    dst = tmp_path / "base"
    shutil.copytree(models("llama"), dst)
    return dst


def validate_error(tmp_path, text: str) -> str:
    plan = write_plan(tmp_path, text)
    r = run_cli("validate", plan)
    assert r.exit_code == 1, r.output
    return r.output


def test_unknown_key_op_and_model_are_located(tmp_path, base):
    out = validate_error(
        tmp_path,
        f"""models:
  base: {base}
steps:
  - take: {{model: base, layer: [0, 2]}}
  - takee: {{model: base}}
  - take: {{model: bsae}}
output: {{dtyp: bf16}}
""",
    )
    assert "plan.yaml:4: unknown key 'layer'" in out and "valid keys here: layers, model" in out
    assert "plan.yaml:5: unknown operation 'takee'" in out and "valid operations: take, stack, dus" in out
    assert "plan.yaml:6: unknown model 'bsae'" in out and "models in this plan: base" in out
    assert "plan.yaml:7: unknown key 'dtyp'" in out and "dtype, path, shard_size" in out


@pytest.mark.parametrize(
    "step, message",
    [
        ("take: {model: base, layers: [2, 2]}", "plan.yaml:4: layer range [2, 2] is empty"),
        ("take: {model: base, layers: [3, 1]}", "plan.yaml:4: layer range [3, 1] is empty"),
        ("take: {model: base, layers: [0, 9]}", "plan.yaml:4: layer range [0, 9) is past the end of model 'base', which has 4 layers"),
        ("take: {model: base, layers: [-1, 2]}", "negative bound"),
        ("stack: {times: 2}", "plan.yaml:4: the first step is `stack`, which needs layers to work on"),
        ("merge: {method: slerp, models: [base], t: 0.5}", "slerp merges exactly 2 models (the base included); got 1"),
    ],
)
def test_bad_ranges_and_steps(tmp_path, base, step, message):
    out = validate_error(tmp_path, f"models:\n  base: {base}\nsteps:\n  - {step}\n")
    assert message in out


def test_dus_and_expand_limits(tmp_path, base):
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps:\n  - take: {{model: base}}\n  - dus: {{layers: 30}}\n")
    assert "plan.yaml:4: cannot reach 30 layers from 4" in out
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps:\n  - take: {{model: base}}\n  - expand: {{groups: 3}}\n")
    assert "4 layers cannot be split into 3 equal groups" in out and "valid groups for 4 layers: 1, 2, 4" in out


def test_merging_different_shapes(tmp_path, base, models):
    from surgery.tiny import build_tiny

    other = build_tiny("llama", tmp_path / "wide", intermediate_size=48)
    out = validate_error(
        tmp_path, f"models: {{a: {base}, b: {other}}}\nsteps:\n  - merge: {{method: linear, models: [a, b], weights: [1, 1]}}\n"
    )
    assert "plan.yaml:3: cannot merge tensors of different shapes" in out and "mlp.down_proj.weight" in out


def test_missing_model_folder(tmp_path):
    plan = write_plan(tmp_path, "models:\n  base: ./nowhere\nsteps:\n  - take: {model: base}\n")
    r = run_cli("apply", plan, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "plan.yaml:2: model folder not found: './nowhere'" in r.output
    assert not (tmp_path / "out").exists()


def test_pickle_refused_then_loaded_weights_only(tmp_path, base):
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(base / "config.json", pk / "config.json")
    torch.save(load_tensors(base), pk / "pytorch_model.bin")
    plan = write_plan(tmp_path, f"models: {{base: {pk}}}\nsteps: [{{take: {{model: base}}}}]\n")
    r = run_cli("apply", plan, "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "has only pickled weights (pytorch_model.bin)" in r.output and "--allow-pickle" in r.output
    r = run_cli("apply", plan, "-o", tmp_path / "out", "--allow-pickle", "-q")
    assert r.exit_code == 0, r.output
    got, want = load_tensors(tmp_path / "out"), load_tensors(base)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_pickle_with_code_is_refused_even_with_opt_in(tmp_path, base):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pk = tmp_path / "evil"
    pk.mkdir()
    shutil.copy(base / "config.json", pk / "config.json")
    torch.save({"x": Evil()}, pk / "pytorch_model.bin", pickle_module=pickle)
    plan = write_plan(tmp_path, f"models: {{base: {pk}}}\nsteps: [{{take: {{model: base}}}}]\n")
    r = run_cli("validate", plan, "--allow-pickle")
    assert r.exit_code == 1 and "cannot load with weights_only=True" in r.output and "pwned" not in r.output


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


def _first(h):
    return next(k for k in h if k != "__metadata__")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header claims 1000000000000 bytes; the limit is"),
        (lambda p: p.write_bytes(struct.pack("<Q", 5000) + b"{}" * 10), "header claims 5000 bytes but the file has only"),
        (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"not json"), "header is not valid JSON"),
        (lambda p: p.write_bytes(b"abc"), "too short for a safetensors header"),
        (lambda p: _rewrite_header(p, lambda h: h[_first(h)].update(dtype="F33")), "unknown dtype 'F33'"),
        (lambda p: _rewrite_header(p, lambda h: h[_first(h)].update(shape=[-1, 4])), "invalid shape [-1, 4]"),
        (lambda p: _rewrite_header(p, lambda h: h[_first(h)].update(shape=[3, 3])), "does not match dtype"),
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "the file is truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 64), "safetensors data is contiguous"),
        (
            lambda p: _rewrite_header(
                p, lambda h: h.pop(sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[1])
            ),
            "leaving a gap after tensor",
        ),
    ],
)
def test_corrupt_safetensors_header(tmp_path, base, corrupt, message):
    import resource

    corrupt(base / "model.safetensors")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    assert "model.safetensors" in out and message in out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB: nothing sized by the claim


def test_free_space_is_checked_before_writing(tmp_path, base, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    plan = write_plan(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}, {{stack: {{times: 2}}}}]\n")
    need = surgery.validate(plan).program.bytes_out
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    r = run_cli("apply", plan, "-o", tmp_path / "out")
    assert r.exit_code == 1 and f"the output needs {need + (1 << 20):,} bytes but only 1,000 are free" in r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.surgery-partial").exists()


def test_overlapping_offsets(tmp_path, base):
    def overlap(h):
        names = [k for k in h if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: h[k]["data_offsets"][0])[:2]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]

    _rewrite_header(base / "model.safetensors", overlap)
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    assert "overlap tensor" in out


def test_config_disagreeing_with_tensors(tmp_path, base):
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    (base / "config.json").write_text(json.dumps(cfg))
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    assert "num_hidden_layers = 6 but the tensors hold layers 0..3" in out


def test_config_without_layer_count(tmp_path, base):
    cfg = json.loads((base / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (base / "config.json").write_text(json.dumps(cfg))
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    assert "config.json has no layer count (num_hidden_layers)" in out and "set num_hidden_layers: 4" in out


def test_index_pointing_outside_the_folder(tmp_path, base):
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    out = validate_error(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    assert "outside the model folder: '../../etc/passwd'" in out


def test_existing_output_needs_force(tmp_path, base):
    plan = write_plan(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("apply", plan, "-o", out)
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces model folders only: this one holds someone's file
    r = run_cli("apply", plan, "-o", out, "--force", "-q")
    assert r.exit_code == 1 and "--force replaces only a model folder" in r.output and "'keep.txt'" in r.output
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert run_cli("apply", plan, "-o", out, "--force", "-q").exit_code == 0  # empty: fine
    (out / "extra.txt").write_text("x")  # a surgery output (with a stray file) is replaced whole
    r = run_cli("apply", plan, "-o", out, "--force", "-q")
    assert r.exit_code == 0 and not (out / "extra.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_output_inside_source_refused(tmp_path, base):
    plan = write_plan(tmp_path, f"models: {{base: {base}}}\nsteps: [{{take: {{model: base}}}}]\n")
    for target in (base, base / "sub"):
        r = run_cli("apply", plan, "-o", target, "--force")
        assert r.exit_code == 1 and "inside (or is) the folder of source model 'base'" in r.output
    assert (base / "model.safetensors").exists() and not (base / "sub").exists()


def test_yaml_hazards(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    with pytest.raises(PlanError, match="alias bomb"):
        surgery.load_plan(write_plan(tmp_path, bomb, "bomb.yaml"))
    with pytest.raises(PlanError, match=r"dup.yaml:3: duplicate key 'steps'"):
        surgery.load_plan(write_plan(tmp_path, "models: {a: x}\nsteps: []\nsteps: []\n", "dup.yaml"))
    with pytest.raises(PlanError, match="unsupported YAML value"):
        surgery.load_plan(write_plan(tmp_path, "models: !!python/object/apply:os.system ['true']\n", "tag.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PlanError, match=r"latin1.yaml:1: not UTF-8"):
        surgery.load_plan(tmp_path / "latin1.yaml")
    with pytest.raises(PlanError, match="deeper than"):
        surgery.load_plan(write_plan(tmp_path, "a: " + "[" * 200 + "]" * 200 + "\n", "deep.yaml"))
    with pytest.raises(PlanError, match=r"broken.yaml:3: not valid YAML.*at line 2"):
        surgery.load_plan(write_plan(tmp_path, "models:\n  a: [1, 2\nsteps: []\n", "broken.yaml"))


def test_all_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        surgery.load_plan(tmp_path / "missing.yaml")
    assert issubclass(CheckpointError, ValueError)


@pytest.mark.slow
def test_cli_real_process_prints_no_traceback(tmp_path):
    plan = write_plan(tmp_path, "models:\n  base: ./nowhere\nsteps:\n  - take: {model: base}\n")
    p = subprocess.run([sys.executable, "-m", "surgery.cli", "apply", str(plan), "-o", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr
