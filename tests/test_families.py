"""Every operation on every supported family: outputs load with transformers, copies are bitwise,
identity expansion keeps the logits, and layer counts and per-layer config lists follow the layer map."""

from __future__ import annotations

import pytest
import torch

import surgery
from surgery.tiny import logits

from .conftest import FAMILIES, load_tensors, read_json, write_plan

PREFIX = {"gpt2": "transformer.h.", "gpt_neox": "gpt_neox.layers."}
NUM_KEY = {"gpt2": "n_layer"}


def split(name: str, prefix: str):
    if not name.startswith(prefix):
        return None
    i, _, rest = name[len(prefix) :].partition(".")
    return int(i), rest


def check_bitwise(out_dir, src_dir, layer_sources: list[int], prefix: str, zeroed=lambda layer, suffix: False):
    """Every output tensor equals its source tensor bit for bit (or is zero where `zeroed` says)."""
    src, out = load_tensors(src_dir), load_tensors(out_dir)
    src_cfg = read_json(src_dir / "config.json")
    expected = set()
    for name in src:
        s = split(name, prefix)
        if s is None:
            if name == "lm_head.weight" and src_cfg.get("tie_word_embeddings"):
                continue
            expected.add(name)
    for j in range(len(layer_sources)):
        for name in src:
            s = split(name, prefix)
            if s and s[0] == 0:
                expected.add(f"{prefix}{j}.{s[1]}")
    assert set(out) == expected
    for name, t in out.items():
        s = split(name, prefix)
        if s is None:
            ref = src[name]
        else:
            ref = src[f"{prefix}{layer_sources[s[0]]}.{s[1]}"]
            if zeroed(s[0], s[1]):
                ref = torch.zeros_like(ref)
        assert t.dtype == ref.dtype and t.shape == ref.shape, name
        assert torch.equal(t.view(torch.uint8), ref.contiguous().view(torch.uint8)), f"{name} differs from its source"


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_expand_keeps_logits(family, models, tmp_path):
    src = models(family)
    plan = write_plan(
        tmp_path,
        f"""
models: {{base: {src}}}
steps:
  - take: {{model: base}}
  - expand: {{groups: 2, per_group: 1, init: identity}}
""",
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    assert res.num_layers == 6 and res.new_layers == [2, 5]
    before, after = logits(src), logits(res.path)
    assert after.shape == before.shape
    diff = (after - before).abs().max().item()
    assert diff <= 1e-6, f"{family}: identity expansion changed logits by {diff}"

    fam = surgery.api.open_checkpoint("x", "x", src).family
    cfg = read_json(res.path / "config.json")
    assert cfg[NUM_KEY.get(family, "num_hidden_layers")] == 6
    layer_sources = [0, 1, 1, 2, 3, 3]
    src_cfg = read_json(src / "config.json")
    if "layer_types" in src_cfg:
        assert cfg["layer_types"] == [src_cfg["layer_types"][i] for i in layer_sources]
    check_bitwise(res.path, src, layer_sources, fam.layer_prefix, zeroed=lambda j, suffix: j in (2, 5) and fam.is_output_projection(suffix))
    # the zeroed set is exactly the attention and MLP output projections (weights and biases)
    zeroed = sorted(
        s
        for s in load_tensors(src)
        if split(s, fam.layer_prefix) and split(s, fam.layer_prefix)[0] == 0 and fam.is_output_projection(split(s, fam.layer_prefix)[1])
    )
    assert zeroed, family
    prov = read_json(res.path / "surgery.json")
    assert prov["new_layers"] == [2, 5]
    assert [r["made"] for r in prov["layer_map"]] == ["copy", "copy", "identity", "copy", "copy", "identity"]


@pytest.mark.parametrize("family", FAMILIES)
def test_copy_ops_are_bitwise_and_load(family, models, tmp_path):
    src = models(family)
    plan = write_plan(
        tmp_path,
        f"""
models: {{base: {src}}}
steps:
  - take: {{model: base, layers: [0, 4]}}
  - dus: {{trim: 1}}                   # 0 1 2 1 2 3
  - stack: {{times: 2, layers: [0, 2]}} # 0 1 0 1 2 1 2 3
  - drop: {{layers: [7, 8]}}            # 0 1 0 1 2 1 2
  - take: {{model: base, layers: [3, 4]}}
""",
    )
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    layer_sources = [0, 1, 0, 1, 2, 1, 2, 3]
    prov = read_json(res.path / "surgery.json")
    assert [r["sources"][0][1] for r in prov["layer_map"]] == layer_sources
    fam = surgery.api.open_checkpoint("x", "x", src).family
    check_bitwise(res.path, src, layer_sources, fam.layer_prefix)
    cfg, src_cfg = read_json(res.path / "config.json"), read_json(src / "config.json")
    assert cfg[NUM_KEY.get(family, "num_hidden_layers")] == 8
    if "layer_types" in src_cfg:
        assert cfg["layer_types"] == [src_cfg["layer_types"][i] for i in layer_sources]
    out = logits(res.path)
    assert out.shape == logits(src).shape and torch.isfinite(out).all()


def test_qwen3_window_threshold_and_layer_types(models, tmp_path):
    """Qwen3 with sliding layers from max_window_layers=2: [full, full, sliding, sliding]."""
    src = models("qwen3")
    assert read_json(src / "config.json")["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    plan = write_plan(tmp_path, f"models: {{base: {src}}}\nsteps: [{{take: {{model: base}}}}, {{stack: {{times: 2}}}}]\n")
    report = surgery.validate(plan)
    assert report.valid
    cfg = report.program.config
    assert cfg["layer_types"] == (["full_attention"] * 2 + ["sliding_attention"] * 2) * 2
    assert cfg["max_window_layers"] == 2  # layers 0,1 are full; the rest are not a prefix
    assert any("max_window_layers" in str(w) for w in report.warnings)
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    import transformers

    m = transformers.AutoConfig.from_pretrained(res.path)
    assert m.layer_types == cfg["layer_types"] and m.num_hidden_layers == 8


def test_tied_embeddings_stay_tied(models, tmp_path):
    src = models("gemma2")
    assert read_json(src / "config.json")["tie_word_embeddings"] is True
    plan = write_plan(tmp_path, f"models: {{base: {src}}}\nsteps: [{{take: {{model: base}}}}]\n")
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    names = set(load_tensors(res.path))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert read_json(res.path / "config.json")["tie_word_embeddings"] is True


def test_gpt2_conv1d_orientation_preserved(models, tmp_path):
    src = models("gpt2")
    out = load_tensors(src)
    assert out["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D: [in, out]
    plan = write_plan(tmp_path, f"models: {{base: {src}}}\nsteps: [{{take: {{model: base, layers: [1, 3]}}}}]\n")
    res = surgery.apply(plan, tmp_path / "o", progress=False)
    got = load_tensors(res.path)
    assert torch.equal(got["transformer.h.0.mlp.c_fc.weight"], out["transformer.h.1.mlp.c_fc.weight"])
    assert torch.equal(got["transformer.wpe.weight"], out["transformer.wpe.weight"])
