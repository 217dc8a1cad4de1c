"""`surgery analyze`: layer similarity streamed one decoder layer at a time."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main

from .conftest import write_plan

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from surgery.train.corpus import write_pydoc_corpus

    root = tmp_path_factory.mktemp("analyze-data")
    write_pydoc_corpus(root / "train.jsonl", eval_path=root / "eval.jsonl")
    return root / "eval.jsonl"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "surgery-cache"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "mixtral", "qwen3"])
def test_streamed_states_equal_a_full_forward(models, held_out, family):
    import transformers

    from surgery.analyze import analyze

    m = models(family)
    a = analyze(m, [str(held_out)], samples=6, seq_len=24, micro_batch=4, keep_states=True)
    model = transformers.AutoModel.from_pretrained(m, dtype=torch.float32).eval()
    ids = a.inputs  # the exact sequences the analysis ran
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(a.num_layers):  # the states entering every layer
        assert torch.allclose(a.states[i], hs[i], rtol=1e-5, atol=1e-6), (family, i)
    assert len(a.distance) == a.num_layers and [len(r) for r in a.distance] == list(range(a.num_layers, 0, -1))
    assert all(0 <= v <= 1 for row in a.distance for v in row) and len(a.norms) == a.num_layers + 1


def test_identity_blocks_measure_zero_and_are_dropped_first(models, held_out, tmp_path):
    from surgery.analyze import analyze, suggest

    pro = surgery.apply(
        write_plan(
            tmp_path, f"models: {{b: {models('llama')}}}\nsteps: [{{take: {{model: b}}}}, {{expand: {{groups: 2, init: identity}}}}]\n"
        ),
        tmp_path / "pro",
        progress=False,
    )
    assert pro.new_layers == [2, 5]
    a = analyze(pro.path, [str(held_out)], samples=6, seq_len=24)
    assert a.distance[0][2] == 0.0 and a.distance[0][5] == 0.0 and a.block_influence[2] == 0.0
    half = analyze(pro.path, [str(held_out)], samples=6, seq_len=24, dtype="bfloat16")  # half the memory
    assert half.distance[0][2] == 0.0 and half.best_block[1] == 2
    assert abs(half.distance[0][0] - a.distance[0][0]) < 0.02
    assert all(a.distance[0][i] > 0 for i in (0, 1, 3, 4))
    assert a.best_block[1] == 2
    text, why = suggest(a, "drop:1", "m", str(pro.path))
    plan = write_plan(tmp_path, text, "drop.yaml")
    assert surgery.validate(plan).valid
    res = surgery.apply(plan, tmp_path / "dropped", progress=False)
    from surgery.tiny import logits

    # dropping an identity block gives back a model computing exactly what the original did
    assert res.num_layers == 5 and torch.equal(logits(res.path), logits(pro.path))
    for what in ("dus:6", "expand:3"):
        text, _ = suggest(a, what, "m", str(pro.path))
        assert surgery.validate(write_plan(tmp_path, text, what.replace(":", "-") + ".yaml")).valid


def test_cli_report_folder_json_and_against(models, held_out, tmp_path):
    runner = CliRunner()
    m, other = models("llama"), models("llama", noise=0.02)
    r = runner.invoke(
        main,
        [
            "analyze",
            str(m),
            "--data",
            str(held_out),
            "--samples",
            "4",
            "--seq-len",
            "16",
            "-o",
            str(tmp_path / "rep"),
            "--suggest",
            "drop:2",
            "--against",
            str(other),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "block to drop" in r.output and "--suggest drop:2" in r.output and "CKA" in r.output
    doc = json.loads((tmp_path / "rep" / "analysis.json").read_text())
    assert doc["format"] == "surgery.analyze/1" and doc["num_layers"] == 4 and len(doc["against"]["linear_cka_last_token"]) == 5
    assert (tmp_path / "rep" / "layers.png").stat().st_size > 1000
    r = runner.invoke(main, ["analyze", str(m), "--data", str(held_out), "--samples", "2", "--seq-len", "8", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.output)["samples"] == 2
    r = runner.invoke(main, ["analyze", str(m), "--data", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 1 and "nope.jsonl" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["analyze", str(m), "--data", str(held_out), "--samples", "2", "--seq-len", "8", "--suggest", "dus:5"])
    assert r.exit_code == 1 and "s is even" in r.output
