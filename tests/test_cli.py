"""The CLI surface: inspect, validate's formats, the unknown-family fallback, help texts."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.tiny import logits

from .conftest import read_json, write_plan


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def test_inspect_text_and_json(models):
    src = models("mixtral")
    r = cli("inspect", src)
    assert r.exit_code == 0
    assert "family: mixtral (model_type mixtral)" in r.output and "layers: 4 under 'model.layers.{i}.'" in r.output
    assert "block_sparse_moe.experts.0.w2.weight" in r.output.split("output projections")[1]
    info = json.loads(cli("inspect", src, "--format", "json").output)
    assert info["num_layers"] == 4 and info["tied_embeddings"] is False and info["dtypes"] == {"F32": info["parameters"]}
    assert sorted(info["output_projections"]) == sorted(
        ["self_attn.o_proj.weight"] + [f"block_sparse_moe.experts.{e}.w2.weight" for e in range(4)]
    )
    assert "w1" not in " ".join(info["output_projections"])
    r = cli("inspect", src.parent / "nothing-here")
    assert r.exit_code == 1 and "model folder not found" in r.output


def test_validate_json_and_tensor_listing(models, tmp_path):
    src = models("gpt2")
    plan = write_plan(
        tmp_path, f"models: {{g: {src}}}\nsteps: [{{take: {{model: g}}}}, {{expand: {{groups: 2}}}}]\noutput: {{dtype: float16}}\n"
    )
    r = cli("validate", plan, "--format", "json")
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["format"] == "surgery.validate/2" and doc["valid"] is True and len(doc["plans"]) == 1
    d = doc["plans"][0]
    assert d["valid"] is True and d["passed"] is True and d["errors"] == []
    assert d["output"]["num_layers"] == 6 and d["output"]["new_layers"] == [2, 5] and d["output"]["dtype"] == "float16"
    assert d["output"]["config_changes"] == ["n_layer: 4 -> 6", "dtype: float32 -> float16"]
    assert d["sources"]["g"]["family"] == "gpt2" and d["sources"]["g"]["tied_embeddings"] is True
    r = cli("validate", plan, "--tensors")
    assert "transformer.h.2.attn.c_proj.weight  F16 [32, 32]  zeros as F16" in r.output
    bad = write_plan(tmp_path, f"models: {{g: {src}}}\nsteps: [{{take: {{model: h}}}}]\n", "bad.yaml")
    r = cli("validate", bad, "--format", "json")
    assert r.exit_code == 1
    d = json.loads(r.output)["plans"][0]
    assert d["valid"] is False and d["errors"][0]["where"].endswith("bad.yaml:2") and "unknown model 'h'" in d["errors"][0]["what"]


def test_unknown_family_falls_back_and_says_so(models, tmp_path):
    src = tmp_path / "mystery"
    shutil.copytree(models("llama"), src)
    cfg = read_json(src / "config.json")
    cfg["model_type"] = "mystery-lm"
    (src / "config.json").write_text(json.dumps(cfg))
    plan = write_plan(tmp_path, f"models: {{m: {src}}}\nsteps: [{{take: {{model: m}}}}, {{expand: {{groups: 2}}}}]\n")
    rep = surgery.validate(plan)
    assert rep.valid
    assert rep.program.family.guessed and rep.program.family.layer_prefix == "model.layers."
    assert any("unknown family" in str(w) for w in rep.warnings) and any("guessed by name" in str(w) for w in rep.warnings)
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    # the guess found o_proj and down_proj: restore the model type and check the function is kept
    out_cfg = read_json(res.path / "config.json")
    out_cfg["model_type"] = "llama"
    (res.path / "config.json").write_text(json.dumps(out_cfg))
    assert (logits(res.path) - logits(models("llama"))).abs().max().item() <= 1e-6


def test_help_teaches():
    r = cli("--help")
    assert r.exit_code == 0 and "surgery validate plan.yaml" in r.output and "expand" in r.output
    r = cli("apply", "--help")
    assert "--force" in r.output and "Examples:" in r.output
