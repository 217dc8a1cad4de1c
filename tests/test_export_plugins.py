"""`surgery export --mergekit` round trips, `surgery mergekit`, and third-party plugins."""

from __future__ import annotations

import importlib.metadata as md
import subprocess

import pytest
import torch
import yaml
from click.testing import CliRunner

import surgery
from surgery import plugins, registry
from surgery.cli import main
from surgery.errors import SurgeryError

from .conftest import load_tensors, write_plan
from .test_mergekit_compat import MERGEKIT, within_ulps

needs_mergekit = pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is in the test extra; install it")


def export(plan_path):
    r = CliRunner().invoke(main, ["export", "--mergekit", str(plan_path)])
    return r


@pytest.mark.slow
@needs_mergekit
def test_export_round_trip_passthrough_identity(models, tmp_path):
    src = models("mistral")
    plan = write_plan(
        tmp_path,
        f"""
models: {{base: {src}}}
steps:
  - take: {{model: base}}
  - dus: {{trim: 1}}
  - expand: {{groups: 2, init: identity}}
  - scale: {{layers: [0, 1], filter: up_proj, factor: 0.5}}
output: {{dtype: bfloat16}}
""",
    )
    r = export(plan)
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "exported.yml"
    cfg.write_text(r.output)
    assert yaml.safe_load(r.output)["merge_method"] == "passthrough"
    p = subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ours = load_tensors(surgery.apply(plan, tmp_path / "ours", progress=False).path)
    theirs = load_tensors(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not ours["model.layers.3.self_attn.o_proj.weight"].any()


@pytest.mark.slow
@needs_mergekit
def test_export_round_trip_slerp(models, tmp_path):
    a, b = models("mistral"), models("mistral", noise=0.02)
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a}, b: {b}}}
steps:
  - merge: {{method: slerp, models: [a, b], t: [0, 1], overrides: [{{filter: mlp, t: 0.3}}]}}
input_dtype: float16
""",
    )
    r = export(plan)
    assert r.exit_code == 0, r.output
    cfg = tmp_path / "exported.yml"
    cfg.write_text(r.output)
    p = subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mk")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    ours = load_tensors(surgery.apply(plan, tmp_path / "ours", progress=False).path)
    theirs = load_tensors(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    # inputs are cast to float16 and slerp results stored in it before the float32 output cast:
    # the values are float16 numbers, so one float16 ulp is the comparison's resolution
    assert all(torch.equal(ours[k], ours[k].half().float()) for k in ours)
    assert all(within_ulps(ours[k].half(), theirs[k].half()) for k in ours)


@pytest.mark.parametrize(
    "steps, message",
    [
        ("[{take: {model: a}}, {expand: {groups: 2, init: random}}]", "init: random has no mergekit equivalent"),
        ("[{take: {model: a}}, {merge: {method: slerp, models: [a, b], t: 0.5}}]", "applies one merge_method to every slice"),
        ("[{merge: {method: slerp, models: [a, b], t: [0, 1]}}, {drop: {layers: [1, 2]}}]", "reordered or cut by later steps"),
    ],
)
def test_export_refuses_what_mergekit_cannot_express(models, tmp_path, steps, message):
    a, b = models("mistral"), models("mistral", noise=0.02)
    plan = write_plan(tmp_path, f"models: {{a: {a}, b: {b}}}\nsteps: {steps}\n")
    r = export(plan)
    assert r.exit_code == 1 and message in r.output and "plan.yaml:" in r.output


@pytest.mark.slow
@needs_mergekit
def test_surgery_mergekit_command_with_identity_method(models, tmp_path):
    """LLaMA Pro as one mergekit config, run by mergekit with surgery's method: equal to `expand`."""
    src = models("mixtral")
    cfg = write_plan(
        tmp_path,
        f"""
merge_method: surgery_identity
slices:
  - sources: [{{model: {src}, layer_range: [0, 2]}}]
  - sources: [{{model: {src}, layer_range: [1, 2], parameters: {{identity: true}}}}]
  - sources: [{{model: {src}, layer_range: [2, 4]}}]
  - sources: [{{model: {src}, layer_range: [3, 4], parameters: {{identity: true}}}}]
""",
        "config.yml",
    )
    p = subprocess.run(["surgery", "mergekit", str(cfg), str(tmp_path / "mk")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = write_plan(tmp_path, f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 2}}}}]\n")
    ours = surgery.apply(plan, tmp_path / "ours", progress=False).path
    theirs = load_tensors(tmp_path / "mk")
    # mergekit writes Mixtral experts fused (transformers 5's mlp.experts.down_proj), surgery keeps the
    # per-expert form of its input; surgery_identity zeroes the fused form: compare as models
    assert not theirs["model.layers.2.mlp.experts.down_proj"].any() and theirs["model.layers.1.mlp.experts.down_proj"].any()
    from surgery.tiny import logits

    base = logits(src)
    assert (logits(ours) - base).abs().max().item() <= 1e-6
    assert (logits(tmp_path / "mk") - base).abs().max().item() <= 1e-6


@pytest.fixture
def clean_registries():
    with registry.scoped() as reg:  # a copy of the loaded registry, thrown away after the test
        yield reg


def _ep(name: str, value: str):
    return md.EntryPoint(name=name, value=value, group=plugins.GROUP)


def test_third_party_plugin_adds_a_method_and_a_step(models, tmp_path, clean_registries):
    infos = plugins.load_plugins(entry_points=[_ep("fake", "tests.fake_plugin:register")])
    fake = next(i for i in infos if i.name == "fake")
    assert fake.methods == ["test_midpoint"] and fake.steps == ["reverse_layers"]
    a, b = models("llama"), models("llama", noise=0.02)
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a}, b: {b}}}
steps:
  - merge: {{method: test_midpoint, models: [a, b], parameters: {{alpha: 0.25}}}}
  - reverse_layers: {{}}
""",
    )
    out = load_tensors(surgery.apply(plan, tmp_path / "out", progress=False).path)
    A, B = load_tensors(a), load_tensors(b)
    k_out, k_in = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert torch.allclose(out[k_out], 0.25 * A[k_in] + 0.75 * B[k_in], atol=1e-7)
    # a duplicate name is refused, naming both owners
    with pytest.raises(SurgeryError, match="'test_midpoint' .* already registered by"):
        plugins.load_plugins(entry_points=[_ep("fake2", "tests.fake_plugin:register")])


def test_a_plugin_that_clashes_half_way_leaves_nothing_behind(clean_registries):
    """Registration is one transaction: fake's method is new, its step clashes with a built-in."""
    before = (clean_registries.method_names(), dict(clean_registries.steps), list(clean_registries.plugins))
    with pytest.raises(SurgeryError, match="plan step 'take' .* already defined"):
        plugins.load_plugins(entry_points=[_ep("clash", "tests.fake_plugin:clashing")])
    assert (clean_registries.method_names(), dict(clean_registries.steps), list(clean_registries.plugins)) == before
    assert "test_midpoint2" not in clean_registries.method_names()


@pytest.mark.slow
def test_plugin_methods_resolve_on_the_first_call_in_a_fresh_process(tmp_path, models):
    """`plan_from_text` with a plugin's method works on the first call, without any CLI or API
    entry point having loaded the plugins first (the grow path of `surgery train` goes there)."""
    import sys as _sys

    a = models("mistral")
    code = (
        f"from surgery.plan import plan_from_text\n"
        f"p = plan_from_text('models: {{a: {a}, b: {a}}}\\nsteps: [{{merge: {{method: ties, models: [a, b], "
        f"base: a, parameters: {{weight: 0.5, density: 0.5}}}}}}]\\n')\n"
        f"print(p.steps[0].method)\n"
    )
    r = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ties", r.stderr


def test_plugin_that_fails_to_load(clean_registries):
    with pytest.raises(SurgeryError, match=r"plugin 'bad' .* failed to load: ModuleNotFoundError"):
        plugins.load_plugins(entry_points=[_ep("bad", "no_such_module_xyz:register")])


@pytest.mark.slow
def test_core_never_imports_mergekit(models, tmp_path):
    """With the plugin installed, mergekit is imported only when a plan uses one of its methods."""
    import sys as _sys

    a = models("mistral")
    native = write_plan(tmp_path, f"models: {{a: {a}, b: {a}}}\nsteps: [{{merge: {{method: slerp, models: [a, b], t: 0.5}}}}]\n")
    code = (
        "import sys, surgery\nfrom surgery.cli import main\n"
        f"r = surgery.apply({str(native)!r}, {str(tmp_path / 'o')!r}, progress=False)\n"
        "from click.testing import CliRunner\nCliRunner().invoke(main, ['--help'])\n"
        "print('mergekit' in sys.modules)\n"
    )
    p = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "False"
    import ast
    import pathlib

    for f in pathlib.Path(surgery.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [n.name for n in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] == "mergekit" for n in names), f"{f.name} imports mergekit"


def test_late_error_paths_are_located(models, tmp_path):
    a = models("mistral")
    plan = write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}]\nchat_template: nosuch\n")
    r = CliRunner().invoke(main, ["validate", str(plan)])
    assert r.exit_code == 1 and "plan.yaml:3: unknown chat template name 'nosuch'" in r.output
    ok = write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}]\n", "ok.yaml")
    target = tmp_path / "exported.yml"
    target.write_text("mine")
    r = CliRunner().invoke(main, ["export", "--mergekit", str(ok), "-o", str(target)])
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output and "Traceback" not in r.output
    assert target.read_text() == "mine"
    r = CliRunner().invoke(main, ["export", "--mergekit", str(ok), "-o", str(target), "--force"])
    assert r.exit_code == 0 and yaml.safe_load(target.read_text())["merge_method"] == "passthrough"
