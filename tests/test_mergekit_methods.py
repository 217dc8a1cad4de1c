"""Every mergekit method that surgery runs through the mergekit plugin: same tensors as mergekit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import surgery
from surgery.plugins import load_plugins

from .conftest import load_tensors, write_plan
from .test_mergekit_compat import MERGEKIT, within_ulps

pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is in the test extra; install it")

# method -> (base?, per-model parameters for the 2 non-base models, shared parameters)
CASES = {
    "task_arithmetic": (True, [{"weight": 0.6}, {"weight": [0.2, 0.8]}], {"lambda": 0.9}),
    "ties": (True, [{"weight": 0.6, "density": 0.5}, {"weight": [0.2, 0.8], "density": 0.7}], {"normalize": True}),
    "dare_ties": (True, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}], {}),
    "dare_linear": (True, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}], {}),
    "breadcrumbs": (True, [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.9}], {}),
    "breadcrumbs_ties": (True, [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.9}], {}),
    "della": (True, [{"weight": 0.6, "density": 1.0, "epsilon": 0.0}, {"weight": 0.4, "density": 1.0, "epsilon": 0.0}], {}),
    "della_linear": (True, [{"weight": 0.6, "density": 1.0, "epsilon": 0.0}, {"weight": 0.4, "density": 1.0, "epsilon": 0.0}], {}),
    "model_stock": (True, [{}, {}], {}),
    "karcher": (False, [{}, {}], {"max_iter": 5}),
    "multislerp": (True, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "sce": (True, [{}, {}], {"select_topk": 0.5}),
    "nearswap": (True, [{}], {"t": 0.01}),
    "arcee_fusion": (True, [{}], {}),
    "ram": (True, [{}, {}], {}),
    "ramplus_tl": (True, [{}, {}], {"r": 0.2}),
}


def config(method: str, a, b, c) -> str:
    base, per, shared = CASES[method]
    lines = ["models:"]
    for m, params in zip((b, c)[: len(per)], per, strict=True):
        lines.append(f"  - model: {m}")
        if params:
            lines.append(f"    parameters: {params}")
    if base:
        lines.append(f"base_model: {a}")
    lines.append(f"merge_method: {method}")
    if shared:
        lines.append(f"parameters: {shared}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


FLOAT32_KERNELS = {"arcee_fusion", "ramplus_tl"}  # documented in README (mergekit compatibility)

MK_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    with open(cfg) as f:
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(f)), out, options=MergeOptions())
"""


# mergekit's published examples, pointed at tiny local models: ties.yml (gradient densities,
# filtered weights, three fine-tunes) and a bio-merge-shaped dare_ties (density 1: mergekit's
# random masks cannot be reproduced, see README)
EXAMPLES = {
    "example-ties": """
models:
  - model: {b}
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: {c}
    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}
  - model: {d}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {a}
parameters: {{normalize: true, int8_mask: true}}
dtype: float16
""",
    "example-bio-merge": """
models:
  - model: {b}
    parameters: {{density: 1.0, weight: 0.5}}
  - model: {c}
    parameters: {{density: 1.0, weight: 0.3}}
  - model: {d}
    parameters: {{density: 1.0, weight: 0.2}}
merge_method: dare_ties
base_model: {a}
parameters: {{int8_mask: true}}
dtype: bfloat16
""",
}


@pytest.fixture(scope="module")
def mergekit_outputs(models, tmp_path_factory):
    """All configs through mergekit in one process (its import takes seconds)."""
    a, b, c = models("mistral", seed=0), models("mistral", seed=0, noise=0.02), models("mistral", seed=0, noise=0.04)
    d = models("mistral", seed=0, noise=0.03)
    root = tmp_path_factory.mktemp("mk-methods")
    args = []
    for method in CASES:
        cfg = write_plan(root / method, config(method, a, b, c), "config.yml")
        args += [str(cfg), str(root / method / "mergekit")]
    for name, text in EXAMPLES.items():
        cfg = write_plan(root / name, text.format(a=a, b=b, c=c, d=d), "config.yml")
        args += [str(cfg), str(root / name / "mergekit")]
    p = subprocess.run([sys.executable, "-c", MK_RUNNER, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def test_plugin_covers_every_mergekit_method():
    from mergekit import merge_methods
    from surgery_mergekit import METHODS, NATIVE

    assert sorted(m.spec.name for m in merge_methods.registered_methods()) == sorted(METHODS + NATIVE)
    assert any(p.name == "mergekit" for p in load_plugins())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES) + list(EXAMPLES))
def test_method_matches_mergekit(method, mergekit_outputs):
    folder = mergekit_outputs / method
    ours = load_tensors(surgery.apply(folder / "config.yml", folder / "surgery", progress=False).path)
    theirs = load_tensors(folder / "mergekit")
    assert sorted(ours) == sorted(theirs)
    dtype = torch.float16 if method == "example-ties" else torch.bfloat16
    for k in theirs:
        assert ours[k].dtype == dtype, k
        t = theirs[k]
        if method in FLOAT32_KERNELS:
            # mergekit writes this kernel's float32 result as is, ignoring `dtype: bfloat16`; surgery
            # fixes every output dtype before computing (headers come first) and keeps the config's
            assert t.dtype == torch.float32
            t = t.to(dtype)
        assert within_ulps(ours[k], t), f"{method} {k}: max diff {(ours[k].float() - t.float()).abs().max()}"


def test_random_methods_are_seeded(models, tmp_path):
    a, b, c = models("mistral", seed=0), models("mistral", seed=0, noise=0.02), models("mistral", seed=0, noise=0.04)
    text = config("dare_ties", a, b, c).replace("'density': 1.0", "'density': 0.5")
    assert "0.5" in text
    cfg = write_plan(tmp_path, text, "config.yml")
    runs = [load_tensors(surgery.apply(cfg, tmp_path / f"o{i}", progress=False, seed=s).path) for i, s in enumerate((7, 7, 8))]
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(runs[0][k], runs[1][k]) and not torch.equal(runs[0][k], runs[2][k])


def test_missing_plugin_message(tmp_path, models):
    from surgery import registry

    a = models("mistral")
    plan = write_plan(tmp_path, f"models: {{a: {a}, b: {a}}}\nsteps: [{{merge: {{method: ties, models: [a, b]}}}}]\n")
    with registry.scoped(registry.builtin_registry()):  # surgery without its plugins
        rep = surgery.validate(plan)
    assert not rep.valid and "mergekit plugin is not installed" in str(rep.problems[0])
    assert "pip install -e plugins/surgery-mergekit" in str(rep.problems[0])
