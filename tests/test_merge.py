"""slerp and linear against a float64 reference of mergekit's formulas."""

from __future__ import annotations

import math

import pytest
import torch

import surgery
from surgery.plan.settings import gradient_at

from .conftest import load_tensors, read_json, write_plan


def slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp in float64: whole-tensor normalisation, lerp when |cos| > 0.9995."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm().item(), b64.norm().item()
    an = a64 / na if na > 1e-8 else a64
    bn = b64 / nb if nb > 1e-8 else b64
    dot = max(-1.0, min(1.0, float((an * bn).sum())))
    if abs(dot) > 0.9995:
        res = (1 - t) * a64 + t * b64
    else:
        th = math.acos(dot)
        res = math.sin((1 - t) * th) / math.sin(th) * a64 + math.sin(t * th) / math.sin(th) * b64
    return res.reshape(a.shape)


def linear_ref(ws, xs, normalize=True):
    res = sum(w * x.double() for w, x in zip(ws, xs, strict=True))
    return res / sum(ws) if normalize else res


def close(out: torch.Tensor, ref: torch.Tensor, name: str):
    assert out.dtype == torch.float32
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 4e-7 * max(scale, 1e-3), f"{name}: off by {err} (scale {scale})"


@pytest.fixture(scope="module")
def pair(models):
    return models("llama", seed=0), models("llama", seed=0, noise=0.02)


def test_gradient_matches_mergekit_rule():
    assert gradient_at(0.3, 0.9) == 0.3
    assert gradient_at((0.0, 1.0), 0.25) == 0.25
    assert gradient_at((0.0, 0.5, 0.3, 0.7, 1.0), 0.5) == 0.3
    assert gradient_at((0.0, 0.5, 0.3, 0.7, 1.0), 0.6) == pytest.approx(0.3 + 0.4 * 0.4)
    assert gradient_at((0.2, 0.8), 1.0) == 0.8


def test_slerp_gradient_with_overrides(pair, tmp_path):
    a_dir, b_dir = pair
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a_dir}, b: {b_dir}}}
steps:
  - merge:
      method: slerp
      models: [a, b]
      t: [0, 0.5, 1]
      overrides:
        - {{filter: self_attn, t: 0.25}}
        - {{filter: mlp, t: [1, 0]}}
""",
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    A, B, out = load_tensors(a_dir), load_tensors(b_dir), load_tensors(res.path)
    n = 4
    checked = 0
    for name, t_out in out.items():
        if ".layers." in name:
            i = int(name.split(".")[2])
            pos = i / (n - 1)
            if "self_attn" in name:
                t = 0.25
            elif "mlp" in name:
                t = gradient_at((1.0, 0.0), pos)
            else:
                t = gradient_at((0.0, 0.5, 1.0), pos)
        else:
            t = 0.0  # embeddings, final norm and lm_head: the gradient at its start, like mergekit
        close(t_out, slerp_ref(t, A[name], B[name]), name)
        checked += 1
    assert checked == len(A)
    # not a copy of either input: the merge really mixed them
    w = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(out[w], A[w]) and not torch.equal(out[w], B[w])


def test_slerp_colinear_uses_lerp(models, tmp_path):
    a_dir = models("llama", seed=0)
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a_dir}, b: {a_dir}}}
steps:
  - merge: {{method: slerp, models: [a, b], t: 0.3}}
""",
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    A, out = load_tensors(a_dir), load_tensors(res.path)
    for name in A:
        close(out[name], slerp_ref(0.3, A[name], A[name]), name)


def test_linear_weights_gradient_and_normalize(pair, tmp_path):
    a_dir, b_dir = pair
    for normalize in (True, False):
        plan = write_plan(
            tmp_path / str(normalize),
            f"""
models: {{a: {a_dir}, b: {b_dir}}}
steps:
  - merge:
      method: linear
      models: [a, b]
      weights: [0.3, [1.0, 0.0]]
      normalize: {str(normalize).lower()}
""",
        )
        res = surgery.apply(plan, tmp_path / str(normalize) / "out", progress=False)
        A, B, out = load_tensors(a_dir), load_tensors(b_dir), load_tensors(res.path)
        for name, t_out in out.items():
            pos = int(name.split(".")[2]) / 3 if ".layers." in name else 0.0
            ws = [0.3, gradient_at((1.0, 0.0), pos)]
            if normalize and sum(ws) == 0:
                continue
            close(t_out, linear_ref(ws, [A[name], B[name]], normalize), name)


def test_merge_per_model_ranges_and_layer_map(pair, tmp_path):
    a_dir, b_dir = pair
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a_dir}, b: {b_dir}}}
steps:
  - take: {{model: a, layers: [0, 1]}}
  - merge:
      method: linear
      models: [{{model: a, layers: [1, 3]}}, {{model: b, layers: [2, 4]}}]
      weights: [1, 1]
""",
    )
    report = surgery.validate(plan)
    assert report.valid, report.text()
    assert [r["sources"] for r in report.layer_map] == [[["a", 0]], [["a", 1], ["b", 2]], [["a", 2], ["b", 3]]]
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    A, B, out = load_tensors(a_dir), load_tensors(b_dir), load_tensors(res.path)
    k = "mlp.down_proj.weight"
    close(out[f"model.layers.2.{k}"], linear_ref([1, 1], [A[f"model.layers.2.{k}"], B[f"model.layers.3.{k}"]]), k)
    # non-layer tensors come from the first model when the first step is not a merge
    assert torch.equal(out["model.embed_tokens.weight"], A["model.embed_tokens.weight"])


def test_merge_bf16_output_dtype(pair, tmp_path):
    a_dir, b_dir = pair
    plan = write_plan(
        tmp_path,
        f"""
models: {{a: {a_dir}, b: {b_dir}}}
steps: [{{merge: {{method: slerp, models: [a, b], t: 0.5}}}}]
output: {{dtype: bfloat16}}
""",
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    A, B, out = load_tensors(a_dir), load_tensors(b_dir), load_tensors(res.path)
    name = "model.layers.0.mlp.gate_proj.weight"
    assert out[name].dtype == torch.bfloat16
    ref = slerp_ref(0.5, A[name], B[name])
    # stored in the input dtype (fp32), then rounded once to bf16: equal to the reference rounded to bf16
    # except where the fp32 value sits on a bf16 rounding boundary
    mismatch = (out[name] != ref.float().to(torch.bfloat16)).float().mean().item()
    assert mismatch < 1e-3
    assert read_json(res.path / "config.json")["dtype"] == "bfloat16"
