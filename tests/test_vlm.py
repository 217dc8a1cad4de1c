"""Vision-language checkpoints (LLaVA-style): layer operations act on the language model's layers
(text_config), the vision tower and projector are non-layer tensors; outputs load with
transformers' image-text-to-text auto class and run. Both tensor-name layouts transformers has
written for LLaVA are covered."""

from __future__ import annotations

import json

import pytest
import torch

import surgery
from surgery.tiny import build_tiny_llava, llava_logits

from .conftest import load_tensors, write_plan


@pytest.fixture(scope="module")
def llavas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return (build_tiny_llava(root / "a"), build_tiny_llava(root / "b", noise=0.02), build_tiny_llava(root / "c", noise=0.04))


def test_vlm_layers_are_the_language_models(llavas, tmp_path):
    a, _, _ = llavas
    rep = surgery.validate(write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}]\n"))
    assert rep.valid and rep.program.num_layers == 2 and rep.program.family.name == "llava"
    names = [t.name for t in rep.program.tensors]
    assert any(n.startswith("vision_tower.") for n in names) and any(n.startswith("multi_modal_projector.") for n in names)


@pytest.mark.slow
def test_identity_expansion_and_copies_keep_the_function(llavas, tmp_path):
    a, _, _ = llavas
    base = llava_logits(a)
    for name, steps in (
        ("copy", "[{take: {model: a}}]"),
        ("expand", "[{take: {model: a}}, {expand: {groups: 2, init: identity}}]"),
        ("stack", "[{take: {model: a, layers: [0, 1]}}, {take: {model: a, layers: [1, 2]}}]"),
    ):
        res = surgery.apply(write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: {steps}\n", f"{name}.yaml"), tmp_path / name, progress=False)
        assert torch.equal(llava_logits(res.path), base), name
    cfg = json.loads((tmp_path / "expand" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4 and "num_hidden_layers" not in cfg
    assert cfg["vision_config"]["num_hidden_layers"] == 2  # the vision tower is not the layer stack


def test_gstack_grows_only_the_language_model(llavas, tmp_path):
    a, _, _ = llavas
    res = surgery.apply(
        write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}, {{stack: {{times: 2}}}}]\n"),
        tmp_path / "g",
        progress=False,
    )
    t, src = load_tensors(res.path), load_tensors(a)
    assert res.num_layers == 4
    assert torch.equal(t["language_model.model.layers.3.mlp.up_proj.weight"], src["language_model.model.layers.1.mlp.up_proj.weight"])
    assert llava_logits(res.path).shape[-1] == 64


# method -> (shared parameters, models, base), as in mergekit's *_VLM_merge tests
VLM_METHODS = {
    "linear": ("", "ab", None),
    "slerp": ("parameters: {t: 0.5}", "ab", "a"),
    "nuslerp": ("parameters: {nuslerp_row_wise: false, nuslerp_flatten: false}", "ab", "c"),
    "task_arithmetic": ("", "ab", "c"),
    "ties": ("parameters: {density: 0.3}", "ab", "c"),
    "dare_ties": ("parameters: {density: 0.66}", "ab", "c"),
    "breadcrumbs": ("", "ab", "c"),
    "model_stock": ("", "bc", "a"),
    "model_stock_filterwise": ("parameters: {filter_wise: true}", "bc", "a"),
}


@pytest.mark.parametrize("method", list(VLM_METHODS))
def test_mergekit_vlm_configs_run_and_load(llavas, tmp_path, method):
    """mergekit's test_basic_merges VLM configs (two_model_config on tiny LLaVAs)."""
    paths = dict(zip("abc", llavas, strict=True))
    params, pair, base = VLM_METHODS[method]
    m1, m2 = paths[pair[0]], paths[pair[1]]
    cfg = write_plan(
        tmp_path,
        f"merge_method: {method.removesuffix('_filterwise')}\n"
        + (f"base_model: {paths[base]}\n" if base else "")
        + f"models:\n  - model: {m1}\n    parameters: {{weight: 0.6}}\n  - model: {m2}\n"
        f"    parameters: {{weight: 0.4}}\ndtype: bfloat16\n{params}\n",
        "config.yml",
    )
    a, b = m1, m2
    res = surgery.apply(cfg, tmp_path / "out", progress=False)
    logits = llava_logits(res.path)
    assert logits.shape == (1, 72, 64) and torch.isfinite(logits).all()
    if method == "linear":
        A, B, out = load_tensors(a), load_tensors(b), load_tensors(res.path)
        for k in A:  # vision tower and projector included
            want = ((0.6 * A[k] + 0.4 * B[k]) / 1.0).to(torch.bfloat16)
            assert (out[k].float() - want.float()).abs().max() <= 2 * want.float().abs().max() * 2**-8, k


def _new_layout(src, dst):
    """The same LLaVA saved with today's tensor names (model.language_model.*, model.vision_tower.*, ...)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))
    renames += (("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))
    out = {}
    for k, v in load_tensors(src).items():
        new = next((n + k[len(o) :] for o, n in renames if k.startswith(o)), k)
        out[new] = v.contiguous()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["saved-before-4.52", "today"])
def test_width_growth_of_the_language_model(llavas, tmp_path, layout):
    """`widen` on a VLM: the language model grows as Llama does (stream, heads, MLP; split keeps the
    function exactly, image and text together), the projector's output (and its inner layer, as
    wide as the stream in transformers' LLaVA) grows with the stream; the vision tower is untouched.
    Both tensor-name layouts; zero/random units with masks start from the small model's function."""
    import transformers

    from surgery.train.masks import fade_in_new_layers

    a = llavas[0] if layout != "today" else _new_layout(llavas[0], tmp_path / "today")
    base = llava_logits(a)
    for w in ("{heads: 32}", "{hidden: 64}", "{hidden: 64, heads: 32, intermediate: 96}"):
        out = surgery.apply(
            write_plan(tmp_path, f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {w}}}]\n"),
            tmp_path / "o",
            progress=False,
            force=True,
        ).path
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["text_config"]["hidden_size"] == (64 if "hidden" in w else 32) and cfg["vision_config"]["hidden_size"] == 64
        assert (llava_logits(out) - base).abs().max().item() <= 1e-6, w
    t = load_tensors(out)
    proj = "multi_modal_projector.linear_2.weight" if layout != "today" else "model.multi_modal_projector.linear_2.weight"
    assert t[proj].shape == (64, 64)
    plan = write_plan(
        tmp_path,
        f"models: {{a: {a}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 64, heads: 32, init: random, std: 0.3}}}}]\n",
        "r.yaml",
    )
    out = surgery.apply(plan, tmp_path / "r", progress=False).path
    model = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    cb = fade_in_new_layers(model, out, 4, "cfg", small_dir=a)
    cb.on_train_begin(None, type("S", (), {"global_step": 0})(), None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (1, 72), generator=g)
    ids[0, 2:66] = model.config.image_token_index
    with torch.no_grad():
        masked = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=g)).logits
    assert (masked - base).abs().max().item() <= 1e-5  # m = 0: the small model, image features included
