"""Hostile or corrupt inputs beyond headers, and property-based tests over generated plans."""

from __future__ import annotations

import json
import os
import resource
import shutil
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import surgery
from surgery.errors import SurgeryError

from .conftest import load_tensors, write_plan


@pytest.fixture
def sharded(models, tmp_path):
    """A private copy of the tiny Llama split into two shards with an index."""
    dst = tmp_path / "sharded"
    plan = write_plan(
        tmp_path / "mk", f"models: {{b: {models('llama')}}}\nsteps: [{{take: {{model: b}}}}]\noutput: {{shard_size: 100KB}}\n"
    )
    surgery.apply(plan, dst, progress=False)
    return dst


def invalid(tmp_path, model) -> str:
    rep = surgery.validate(write_plan(tmp_path, f"models: {{a: {model}}}\nsteps: [{{take: {{model: a}}}}]\n", "p.yaml"))
    assert not rep.valid
    return "\n".join(str(p) for p in rep.problems)


def test_index_symlink_leading_out(sharded, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shards = sorted(sharded.glob("model-*.safetensors"))
    shutil.move(shards[0], outside)
    os.symlink(outside, shards[0])
    assert "outside the model folder" in invalid(tmp_path, sharded)


def test_missing_shard_and_tensor_in_two_shards(sharded, tmp_path):
    shards = sorted(sharded.glob("model-*.safetensors"))
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    # the index places a tensor in a file whose header does not hold it
    index["weight_map"]["model.norm.weight"] = (
        shards[0].name if index["weight_map"]["model.norm.weight"] != shards[0].name else shards[1].name
    )
    index_path.write_text(json.dumps(index))
    assert "says tensor 'model.norm.weight' is in" in invalid(tmp_path, sharded)
    # no index, and two files holding the same tensors
    index_path.unlink()
    shutil.copy(shards[0], sharded / "zz-copy.safetensors")
    assert "also in" in invalid(tmp_path, sharded)
    # an index naming a shard that is gone
    (sharded / "zz-copy.safetensors").unlink()
    index["weight_map"]["model.norm.weight"] = shards[-1].name
    index_path.write_text(json.dumps(index))
    shards[1].unlink()
    assert f"names '{shards[1].name}', which is missing" in invalid(tmp_path, sharded)


@pytest.mark.parametrize(
    "step, message",
    [
        ("stack: {times: 1000000000}", "less than or equal to 64"),
        ("take: {model: a, layers: [0, 99999999999]}", "exceeds the limit of 10000 layers"),
        ("expand: {groups: 1, per_group: 100000}", "less than or equal to 64"),
    ],
)
def test_huge_requests_are_refused_before_any_work(models, tmp_path, step, message):
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps:\n  - take: {{model: a}}\n  - {step}\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rep = surgery.validate(plan)
    assert not rep.valid and message in str(rep.problems[0])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KB: no blow-up


def test_huge_header_claim_allocates_nothing(models, tmp_path):
    import struct

    bad = tmp_path / "bad"
    shutil.copytree(models("llama"), bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.write(struct.pack("<Q", 90 * 1024 * 1024))  # under the 100 MB cap, over the file's size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "but the file has only" in invalid(tmp_path, bad)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000


# ---------------------------------------------------------------------------------------------
# property-based: generated plans, valid and invalid

OPS = st.sampled_from(["take", "stack", "dus", "expand", "drop", "scale", "merge", "bogus"])
small = st.integers(min_value=-2, max_value=12)


@st.composite
def step(draw):
    op = draw(OPS)
    rng = draw(st.one_of(st.none(), st.tuples(small, small).map(list)))
    body = {
        "take": {"model": draw(st.sampled_from(["a", "b", "zz"])), **({"layers": rng} if rng else {})},
        "stack": {"times": draw(st.integers(0, 5)), **({"layers": rng} if rng else {})},
        "dus": draw(st.sampled_from([{"trim": draw(small)}, {"layers": draw(small)}, {}])),
        "expand": {"groups": draw(st.integers(0, 5)), "init": draw(st.sampled_from(["identity", "copy", "zero", "random", "x"]))},
        "drop": {"layers": rng or [0, 1]},
        "scale": {"factor": draw(st.floats(-2, 2, allow_nan=False)), **({"layers": rng} if rng else {})},
        "merge": {
            "method": draw(st.sampled_from(["slerp", "linear", "nope"])),
            "models": ["a", "b"],
            **draw(st.sampled_from([{"t": 0.5}, {"weights": [1, 2]}, {}])),
        },
        "bogus": {"x": 1},
    }[op]
    if draw(st.booleans()) and draw(st.booleans()):
        body[draw(st.text(string.ascii_lowercase, min_size=1, max_size=5))] = 1  # maybe an unknown key
    return {op: body}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step(), min_size=1, max_size=4), dtype=st.sampled_from([None, "bfloat16", "float16", "fp8"]))
def test_generated_plans(models, tmp_path_factory, steps, dtype):
    """validate raises nothing but located user errors; when valid, apply writes exactly what it said."""
    import yaml

    folder = tmp_path_factory.mktemp("gen")
    doc = {"models": {"a": str(models("llama")), "b": str(models("llama", noise=0.02))}, "steps": steps}
    if dtype:
        doc["output"] = {"dtype": dtype}
    plan = write_plan(folder, yaml.safe_dump(doc))
    rep = surgery.validate(plan)
    if not rep.valid:
        assert rep.problems and all(p.where and p.where.startswith(str(plan)) for p in rep.problems), rep.text()
        return
    try:
        res = surgery.apply(plan, folder / "out", progress=False)
    except SurgeryError as e:  # never for a valid plan
        raise AssertionError(f"validate said valid, apply failed: {e}") from None
    got = load_tensors(res.path)
    want = {t.name: (t.recipe.shape, t.recipe.nbytes) for t in rep.program.tensors}
    assert {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in got.items()} == want
    assert res.bytes_written == rep.program.bytes_out
