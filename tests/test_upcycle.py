"""Sparse upcycling (`upcycle`): dense MLPs into experts behind a router, in the family's MoE layout."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.tiny import build_tiny, logits

from .conftest import kill_once_a_shard_is_written, load_tensors, write_plan

# a Llama without biases (Mixtral has no place for them); Qwen3 whose layers all attend the same way
DENSE = {
    "llama": dict(attention_bias=False, mlp_bias=False),
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(use_sliding_window=False),
}
MOE = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: build_tiny(f, root / f, **kw) for f, kw in DENSE.items()}


def _plan(tmp_path, model, step: str, name: str = "plan.yaml"):
    return write_plan(tmp_path, f"models: {{a: {model}}}\nsteps: [{{take: {{model: a}}}}, {{upcycle: {step}}}]\n", name)


@pytest.mark.parametrize("family", list(DENSE))
@pytest.mark.parametrize("router", ["zero", "uniform"])
def test_identical_experts_behind_a_uniform_router_keep_the_dense_function(dense, tmp_path, family, router):
    """Every expert is the dense MLP (bitwise; Qwen2-MoE's routed down projections halved, its shared
    expert the MLP and its gate zero), the router zero: the MoE's logits are the dense model's, and
    transformers loads it as the family's MoE."""
    import transformers

    m = dense[family]
    out = surgery.apply(_plan(tmp_path, m, f"{{experts: 4, top_k: 2, router: {router}}}"), tmp_path / "moe", progress=False).path
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert cfg.model_type == MOE[family] and cfg.num_experts_per_tok == 2
    assert (logits(out) - logits(m)).abs().max().item() <= 1e-5, family
    old, new = load_tensors(m), load_tensors(out)
    spec = surgery.registry.current().families[family].upcycle
    prefix = "model.layers.1."
    for e in range(4):
        for k in ("gate", "up", "down"):
            want = old[prefix + spec["dense"][k]]
            if k == "down" and spec.get("shared"):
                want = want * 0.5
            assert torch.equal(new[prefix + spec["experts"][k].format(e=e)], want)
    assert not new[prefix + spec["router"]].any() and new[prefix + spec["router"]].shape == (4, want.shape[0])
    assert not any(prefix + spec["dense"][k] in new for k in ("gate", "up", "down"))
    if spec.get("shared"):
        assert torch.equal(new[prefix + spec["shared"]["down"]], old[prefix + spec["dense"]["down"]])
        assert not new[prefix + spec["shared"]["router"]].any()


def test_a_random_router_is_seeded_and_changes_the_routing(dense, tmp_path):
    m = dense["qwen3"]
    a = surgery.apply(
        _plan(tmp_path, m, "{experts: 4, top_k: 1, router: random, std: 0.5, seed: 3}", "a.yaml"), tmp_path / "a", progress=False
    )
    b = surgery.apply(
        _plan(tmp_path, m, "{experts: 4, top_k: 1, router: random, std: 0.5, seed: 3}", "b.yaml"), tmp_path / "b", progress=False
    )
    c = surgery.apply(
        _plan(tmp_path, m, "{experts: 4, top_k: 1, router: random, std: 0.5, seed: 4}", "c.yaml"), tmp_path / "c", progress=False
    )
    ta, tb, tc = load_tensors(a.path), load_tensors(b.path), load_tensors(c.path)
    r = "model.layers.0.mlp.gate.weight"
    assert torch.equal(ta[r], tb[r]) and not torch.equal(ta[r], tc[r]) and 0.3 < float(ta[r].std()) < 0.7
    # identical experts: whichever expert a token goes to, the function is the dense one (top-1, weight 1)
    assert (logits(a.path) - logits(m)).abs().max().item() <= 1e-5


def test_some_layers_stay_dense_where_the_moe_allows_it(dense, tmp_path):
    """Qwen-MoE keeps dense layers (mlp_only_layers); Mixtral has none, so `layers` there is refused, located."""
    import transformers

    m = dense["qwen3"]
    out = surgery.apply(_plan(tmp_path, m, "{experts: 2, top_k: 1, layers: [1, 3]}"), tmp_path / "some", progress=False).path
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 3]
    t = load_tensors(out)
    assert "model.layers.0.mlp.gate_proj.weight" in t and "model.layers.1.mlp.experts.1.down_proj.weight" in t
    assert (logits(out) - logits(m)).abs().max().item() <= 1e-5
    transformers.AutoModelForCausalLM.from_pretrained(out)
    rep = surgery.validate(_plan(tmp_path, dense["llama"], "{experts: 2, layers: [1, 3]}", "mix.yaml"))
    assert not rep.valid and "no dense layers" in str(rep.problems[0]) and "mix.yaml:2" in rep.problems[0].where


@pytest.mark.parametrize(
    "step, expect",
    [
        ("{experts: 0}", "experts: 0 is not a number of experts from 1 to 1024"),
        ("{experts: [], top_k: 1}", "experts: 0 is not a number"),
        ("{experts: [{model: a}], top_k: 1, router: cheap_embed}", "expert 0 has none"),
        ("{experts: 2, router: cheap_embed}", "cheap_embed needs positive_prompts"),
        ("{experts: [{model: zz, positive_prompts: [x]}], top_k: 1}", "'zz' is not one of the plan's models"),
        ("{experts: 2, top_k: 3}", "more than the 2 experts"),
        ("{experts: 2, std: 0.1}", "`std` is for router: random"),
        ("{experts: 2, router: learned}", "'random', 'uniform_random', 'cheap_embed', 'hidden' or 'hidden_avg'"),
        ("{experts: [{model: a}, {model: a, positive_prompts: [x]}], top_k: 1, router: hidden}", "expert 0 has none"),
        ("{experts: 2, shared: {model: a}}", "mixtral has no shared expert"),
        ("{experts: 2, noise: -0.1}", "noise"),
        ("{experts: [{model: a, noise_scale: -1}], top_k: 1}", "noise_scale"),
    ],
)
def test_bad_upcycle_steps_are_located_errors(dense, tmp_path, step, expect):
    rep = surgery.validate(_plan(tmp_path, dense["llama"], step))
    assert not rep.valid and expect in str(rep.problems[0]) and "plan.yaml:2" in rep.problems[0].where


def test_models_the_moe_cannot_hold_are_refused(dense, models, tmp_path):
    """A family with no MoE to grow into, a Llama with attention biases (Mixtral has none), a Qwen3
    mixing sliding and full layers, two upcycles: each a located error naming the fix; nothing written."""
    cases = [
        (models("gemma2"), "{experts: 2}", "not available for family gemma"),
        (models("llama"), "{experts: 2}", "attention_bias"),
        (build_tiny("qwen3", tmp_path / "q3"), "{experts: 2}", "one attention window"),
    ]
    for i, (m, step, expect) in enumerate(cases):
        rep = surgery.validate(_plan(tmp_path, m, step, f"p{i}.yaml"))
        assert not rep.valid and expect in str(rep.problems[0]) and f"p{i}.yaml:2" in rep.problems[0].where, rep.problems
        assert rep.problems[0].fix
    twice = write_plan(
        tmp_path,
        f"models: {{a: {dense['llama']}}}\nsteps: [{{take: {{model: a}}}}, {{upcycle: {{experts: 2}}}}, {{upcycle: {{experts: 4}}}}]\n",
        "twice.yaml",
    )
    rep = surgery.validate(twice)
    assert not rep.valid and "upcycled already" in str(rep.problems[0])
    r = CliRunner().invoke(main, ["apply", str(tmp_path / "p1.yaml"), "-o", str(tmp_path / "never")])
    assert r.exit_code == 1 and "attention_bias" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "never").exists()


def test_validate_shows_the_experts_and_the_new_config(dense, tmp_path):
    """The layer map and config changes show the experts; a zero router is warned about (top-k of
    equal logits always picks the first experts), a random one is not."""
    r = CliRunner().invoke(main, ["validate", str(_plan(tmp_path, dense["mistral"], "{experts: 8, top_k: 2}"))])
    assert r.exit_code == 0, r.output
    assert "upcycled: 8 experts, top-2, zero router" in r.output and "mistral -> mixtral" in r.output
    rep = surgery.validate(_plan(tmp_path, dense["mistral"], "{experts: 8, top_k: 2}", "zero.yaml"))
    [w] = [w for w in rep.warnings if w.code == "symmetric-experts"]
    assert "the same 2 experts for every token" in w.what and "router: random" in w.fix and "zero.yaml:2" in w.where
    rep = surgery.validate(_plan(tmp_path, dense["mistral"], "{experts: 8, top_k: 2, router: random}", "random.yaml"))
    assert not [w for w in rep.warnings if w.code == "symmetric-experts"]


def test_the_router_loss_joins_the_training_loss_only(dense, tmp_path):
    """enable_router_aux_loss: in training the loss is the language-model loss + coef x the router's
    load-balancing loss (transformers' own); in evaluation it is the language-model loss alone; 0 turns
    it off; a dense model has no router (None)."""
    import transformers

    from surgery.train.moe import enable_router_aux_loss

    out = surgery.apply(
        _plan(tmp_path, dense["mistral"], "{experts: 4, top_k: 2, router: random, std: 0.5}"), tmp_path / "moe", progress=False
    ).path
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert enable_router_aux_loss(model, 0.25) == 0.25
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    lm = model(input_ids=ids, labels=ids)
    assert lm.aux_loss is None
    model.train()
    torch.manual_seed(0)
    both = model(input_ids=ids, labels=ids)
    assert both.aux_loss is not None and both.aux_loss.item() > 0
    assert torch.allclose(both.loss, lm.loss + 0.25 * both.aux_loss, atol=1e-5)
    off = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert enable_router_aux_loss(off, 0.0) == 0.0 and off.train()(input_ids=ids, labels=ids).aux_loss is None
    assert enable_router_aux_loss(transformers.AutoModelForCausalLM.from_pretrained(dense["mistral"]), None) is None


@pytest.mark.slow
def test_an_upcycled_model_trains_and_its_experts_part(dense, tmp_path):
    """`surgery train` on an upcycled Mixtral: the router loss is on (train.json says with which
    coefficient), FLOPs count k/E of the experts, the router leaves zero, and metrics.jsonl has the
    experts' load and the balance term."""
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    out = surgery.apply(_plan(tmp_path, dense["llama"], "{experts: 4, top_k: 2}"), tmp_path / "moe", progress=False).path
    corpus = write_pydoc_corpus(tmp_path / "c" / "train.jsonl", eval_path=tmp_path / "c" / "eval.jsonl")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: {out}\noutput: {tmp_path / 'trained'}\ndata: {{files: [{corpus}], eval_files: [{tmp_path / 'c' / 'eval.jsonl'}], "
        "seq_len: 64}\nlr: 3e-3\nmicro_batch: 4\nsteps: 4\nwarmup: 0\n"
    )
    res = train(cfg, progress=False, echo=lambda *a: None)
    summary = json.loads((res.path / "train.json").read_text())
    assert summary["stages"][0]["router_aux_loss_coef"] == 0.001 and res.eval_loss is not None
    dense_flops = summary["stages"][0]["flops_per_token"]
    from surgery.train.flops import flops_per_token

    assert dense_flops == flops_per_token(out, 64)["flops_per_token"] < flops_per_token(out, 64)["matmul_params"] * 6 * 2
    trained = load_tensors(res.path)
    assert trained["model.layers.0.block_sparse_moe.gate.weight"].abs().max() > 0
    # each training record has the experts' load (shares summing to 1) and the router's balance term
    recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
    loads = [r for r in recs if "loss" in r]
    assert loads and all(len(r["expert_load"]) == 4 and abs(sum(r["expert_load"]) - 1) < 1e-3 for r in loads)
    assert all(0.0 < r["router_balance"] <= 4.0 + 1e-6 for r in loads)
    assert sorted(loads[0]["expert_load"]) == [0.0, 0.0, 0.5, 0.5]  # a zero router: top-2 of equal logits, the same 2 for all


def test_export_writes_mergekit_moe_where_it_can_and_refuses_the_rest_located(dense, models, tmp_path):
    """`export --mergekit` of an upcycle writes mergekit-moe's config (copies behind a random N(0, 1)
    gate here); what mergekit-moe cannot express is refused at the step's line, nothing written."""
    import yaml

    r = CliRunner().invoke(main, ["export", str(_plan(tmp_path, dense["llama"], "{experts: 4, router: random, std: 1.0}")), "--mergekit"])
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.output)
    assert cfg["gate_mode"] == "random" and cfg["architecture"] == "mixtral" and cfg["experts_per_token"] == 2
    assert cfg["experts"] == [{"source_model": str(dense["llama"])}] * 4 and "mergekit-moe" in r.output.splitlines()[0]
    q = dense["qwen3"]
    two = "[{model: a, positive_prompts: [x]}, {model: a, positive_prompts: [y]}]"
    r = CliRunner().invoke(
        main, ["export", str(_plan(tmp_path, dense["llama"], f"{{experts: {two}, router: cheap_embed}}", "ce.yaml")), "--mergekit"]
    )
    assert r.exit_code == 0 and "--i-understand-this-is-not-useful-without-training" in r.output.splitlines()[1], r.output
    cases = [
        (dense["llama"], "{experts: 4}", "mergekit-moe has no zero router"),
        (dense["llama"], "{experts: 4, router: random}", "this router's std is 0.02"),
        (q, "{experts: 2, router: random, std: 1.0, layers: [1, 3]}", "keeps some layers dense"),
        (dense["qwen2"], "{experts: 2, router: random, std: 1.0}", "give `shared: {model, positive_prompts}`"),
        (dense["qwen2"], f"{{experts: {two}, top_k: 1, router: cheap_embed, shared: {{model: a}}}}", "shared expert has no prompts"),
    ]
    for i, (m, step, expect) in enumerate(cases):
        r = CliRunner().invoke(main, ["export", str(_plan(tmp_path, m, step, f"p{i}.yaml")), "--mergekit", "-o", str(tmp_path / "m.yml")])
        assert r.exit_code == 1 and expect in r.output and f"p{i}.yaml:2" in r.output, (i, r.output)
        assert "Traceback" not in r.output
    other = f"models: {{a: {dense['qwen2']}, b: {build_tiny('qwen2', tmp_path / 'other', seed=3)}}}\nsteps:\n  - take: {{model: a}}\n"
    own = write_plan(tmp_path, other + "  - upcycle: {experts: 2, router: random, std: 1.0, shared: {model: b}}\n", "own.yaml")
    r = CliRunner().invoke(main, ["export", str(own), "--mergekit"])
    assert r.exit_code == 1 and "opens only the base model and the routed experts' models" in r.output and "own.yaml:4" in r.output
    cut = write_plan(
        tmp_path,
        f"models: {{a: {q}}}\nsteps: [{{take: {{model: a, layers: [0, 2]}}}}, {{upcycle: {{experts: 2, router: random, std: 1.0}}}}]\n",
        "cut.yaml",
    )
    r = CliRunner().invoke(main, ["export", str(cut), "--mergekit", "-o", str(tmp_path / "m.yml")])
    assert r.exit_code == 1 and "changes or reorders them first" in r.output and "cut.yaml:2" in r.output
    assert not (tmp_path / "m.yml").exists()


@pytest.mark.slow
def test_a_killed_upcycle_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL once the first shard is written, then --resume: the output equals a clean run's bytes
    (the experts are copies, the random router is drawn from its seed whichever run writes it)."""
    import os
    import subprocess
    import sys

    from surgery.synthetic import write_synthetic_llama

    src = write_synthetic_llama(tmp_path / "src", (128, 4, 512, 8000, 4, 2, False), dtype="float32")
    plan = write_plan(
        tmp_path,
        f"models: {{a: {src}}}\nsteps: [{{take: {{model: a}}}}, {{upcycle: {{experts: 4, router: random, seed: 1}}}}]\n"
        "output: {shard_size: 1MB}\n",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "surgery.cli", "apply", str(plan), "-q", "--workers", "1"]
    subprocess.run(base + ["-o", str(tmp_path / "clean")], check=True, env=env)
    reference = {f.name: f.read_bytes() for f in (tmp_path / "clean").glob("*.safetensors")}
    assert len(reference) > 3
    staging, out = tmp_path / ".out.surgery-partial", tmp_path / "out"
    kill_once_a_shard_is_written(base + ["-o", str(out)], staging, env)
    assert not out.exists() or (out / "model.safetensors.index.json").exists()
    subprocess.run(base + ["-o", str(out)] + (["--resume"] if staging.exists() else []), check=True, env=env)
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == reference


def _same_as_mergekit_moe(cfg, tmp_path, out: str = "ours") -> dict:
    """Run `cfg` with mergekit-moe and with `surgery apply`; every tensor equal once transformers has
    loaded both (mergekit-moe writes the fused expert layout, surgery the per-expert one). Ours."""
    import subprocess

    import transformers

    subprocess.run(["mergekit-moe", str(cfg), str(tmp_path / f"mk-{out}")], check=True, capture_output=True)
    r = CliRunner().invoke(main, ["apply", str(cfg), "-o", str(tmp_path / out), "-q"])
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"mk-{out}", dtype=torch.float32).state_dict()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32).state_dict()
    assert set(theirs) == set(ours)
    assert [n for n in theirs if not torch.equal(theirs[n], ours[n])] == []
    return ours


MOE_CONFIG = """base_model: {base}
{arch}gate_mode: {gate}
dtype: float32
experts_per_token: {k}
experts:
  - source_model: {e1}
    positive_prompts: ["def f(x): return x", "import os"]
  - source_model: {e2}
    positive_prompts: ["the cat sat on the mat"]
    negative_prompts: ["import os"]
"""


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["cheap_embed", "hidden", "hidden_avg"])
@pytest.mark.parametrize("family, arch, k", [("llama", "", 2), ("qwen3", "architecture: qwen3\n", 1)])
def test_mergekit_moe_configs_run_unchanged_and_match_mergekit_moe(tmp_path, family, arch, k, gate):
    """A mergekit-moe config (FrankenMoE: experts from two other models, gates from their prompts:
    token embeddings, or the base model's hidden states at the last position or averaged) run by
    `surgery apply`: every tensor equals mergekit-moe's own output, bitwise, once both are loaded by
    transformers (mergekit-moe writes the fused expert layout, surgery the per-expert one), for
    Mixtral and Qwen3-MoE outputs."""
    import shutil

    if shutil.which("mergekit-moe") is None:
        pytest.skip("mergekit-moe is not installed")
    kw = DENSE[family]
    models = [build_tiny(family, tmp_path / f"m{i}", seed=i, **kw) for i in range(3)]
    cfg = tmp_path / "moe.yml"
    cfg.write_text(MOE_CONFIG.format(base=models[0], arch=arch, gate=gate, k=k, e1=models[1], e2=models[2]))
    ours = _same_as_mergekit_moe(cfg, tmp_path)
    router = ours["model.layers.0.mlp.gate.weight"]
    # one unit row per expert (hidden gates are computed in bfloat16, as mergekit-moe computes them)
    assert router.shape[0] == 2 and torch.allclose(router.norm(dim=-1), torch.ones(2), atol=1e-2)


def test_what_mergekit_moe_does_and_surgery_does_not_is_a_located_error(dense, tmp_path):
    """An unknown gate, DeepSeek outputs (remote code), Qwen2-MoE from Llama models, an architecture
    the base model cannot make, two shared experts: located errors naming the key and the fix;
    uniform_random is run as a seeded normal of its variance, with a located note."""
    m, q2, q3 = dense["llama"], dense["qwen2"], dense["qwen3"]
    base = MOE_CONFIG.format(base=m, arch="", gate="hidden", k=2, e1=m, e2=m)
    ungated = base.replace("hidden", "cheap_embed") + f"shared_experts: [{{source_model: {m}}}]\n"
    gated = base.replace("hidden", "cheap_embed") + f"shared_experts: [{{source_model: {m}, positive_prompts: [x]}}]\n"
    on = lambda model, text: text.replace(f"base_model: {m}", f"base_model: {model}")  # noqa: E731
    two = on(q2, base) + f"shared_experts: [{{source_model: {q2}, positive_prompts: [x]}}, {{source_model: {q2}}}]\n"
    cases = [
        (base.replace("gate_mode: hidden", "gate_mode: hidden_first"), "gate_mode 'hidden_first' is not one of", 2),
        (ungated, "DeepSeek MoE", 11),
        (base.replace("gate_mode: hidden", "architecture: deepseek\ngate_mode: random"), "DeepSeek MoE", 2),
        (gated, "Qwen2-MoE with zero attention biases", 11),
        (base.replace("gate_mode: hidden", "architecture: qwen3\ngate_mode: random"), "into mixtral only", 2),
        (on(q3, base).replace("gate_mode: hidden", "architecture: mixtral\ngate_mode: hidden"), "into qwen3 only", 2),
        (base.replace("gate_mode: hidden", "architecture: phi\ngate_mode: hidden"), "'phi' is not one of mergekit-moe's", 2),
        (two, "2 shared experts", 11),
        (on(q3, base) + f"shared_experts: [{{source_model: {q3}, positive_prompts: [x]}}]\n", "qwen3 MoE has no shared", 11),
    ]
    # values of the wrong kind: located, never an internal error
    cases += [
        (base + "shared_experts: 5\n", "shared_experts is a list of (at most one) experts, got int", 11),
        (base + f"shared_experts: {{source_model: {m}}}\n", "got dict", 11),
        (base + "shared_experts: [5]\n", "each of shared_experts is a mapping", 11),
        (base.replace("gate_mode: hidden", "gate_mode: [hidden]"), "gate_mode is a name, got list", 2),
        (base.replace("experts_per_token: 2", "experts_per_token: two"), "experts_per_token is a whole number", 4),
        (base.replace("experts_per_token: 2", "experts_per_token: true"), "experts_per_token is a whole number", 4),
    ]
    for i, (text, expect, line) in enumerate(cases):
        cfg = tmp_path / f"c{i}.yml"
        cfg.write_text(text)
        r = CliRunner().invoke(main, ["validate", str(cfg)])
        assert r.exit_code == 1 and expect in r.output and f"c{i}.yml:{line}" in r.output, (i, r.output)
        assert "Traceback" not in r.output and "internal error" not in r.output
    cfg = tmp_path / "u.yml"
    cfg.write_text(base.replace("gate_mode: hidden", "gate_mode: uniform_random"))
    rep = surgery.validate(cfg)
    assert rep.valid and any(w.code == "approximate-gate" and "u.yml:2" in w.where for w in rep.warnings)
    out = surgery.apply(cfg, tmp_path / "u", progress=False).path
    r0 = load_tensors(out)["model.layers.0.block_sparse_moe.gate.weight"]
    assert abs(float(r0.std()) - (1 / (3 * r0.shape[1])) ** 0.5) < 0.5 * (1 / (3 * r0.shape[1])) ** 0.5


SHARED_CONFIG = """base_model: {base}
architecture: qwen
gate_mode: {gate}
dtype: float32
experts:
  - source_model: {e1}
    positive_prompts: ["def f(x): return x", "import os"]
  - source_model: {e2}
    positive_prompts: ["the cat sat on the mat"]
    residual_scale: 0.5
shared_experts:
  - source_model: {shared}
    positive_prompts: ["hello world"]
    negative_prompts: ["import os"]
    residual_scale: 0.25
"""


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["cheap_embed", "hidden", "hidden_avg"])
def test_a_qwen2_moe_with_a_shared_expert_matches_mergekit_moe(tmp_path, gate):
    """mergekit-moe's Qwen MoE output (Qwen2 experts from two models, a shared expert from a third
    with its gate from its own prompts, residual scales): surgery's output equals mergekit-moe's,
    bitwise, every tensor (the routed experts are not halved: the shared expert is the config's)."""
    import shutil

    if shutil.which("mergekit-moe") is None:
        pytest.skip("mergekit-moe is not installed")
    models = [build_tiny("qwen2", tmp_path / f"m{i}", seed=i) for i in range(3)]
    cfg = tmp_path / "moe.yml"
    # mergekit-moe 0.1.5 opens only the base and routed experts' models: the shared one must be among them
    cfg.write_text(SHARED_CONFIG.format(base=models[0], gate=gate, e1=models[1], e2=models[2], shared=models[0]))
    ours = _same_as_mergekit_moe(cfg, tmp_path)
    g = ours["model.layers.1.mlp.shared_expert_gate.weight"]
    assert g.shape[0] == 1 and abs(float(g.norm()) - 1) < 1e-2  # its own unit row, from its prompts
    dense = load_tensors(models[0])
    assert torch.equal(ours["model.layers.1.mlp.shared_expert.down_proj.weight"], dense["model.layers.1.mlp.down_proj.weight"] * 0.25)
    if gate == "cheap_embed":  # and back: `export --mergekit` writes a config mergekit-moe makes the same model from
        r = CliRunner().invoke(main, ["export", str(cfg), "--mergekit", "-o", str(tmp_path / "back.yml")])
        assert r.exit_code == 0, r.output
        again = _same_as_mergekit_moe(tmp_path / "back.yml", tmp_path, "again")
        assert set(again) == set(ours) and [n for n in ours if not torch.equal(again[n], ours[n])] == []


def test_a_shared_expert_from_its_own_model_and_seeded_noise(dense, tmp_path):
    """`shared:` takes the shared expert from any model of the base's shape (mergekit-moe 0.1.5 cannot:
    it never opens a model that gives no routed expert), its gate zero without prompts; `noise` adds
    N(0, noise) to every expert from the step's seed: the same plan gives the same bytes, each expert
    its own draw, the dense MLP plus noise of that scale; an expert's own noise_scale wins."""
    q = dense["qwen2"]
    other = build_tiny("qwen2", tmp_path / "other", seed=7)
    step = "{experts: 3, top_k: 1, noise: 0.01, seed: 5, shared: {model: b, residual_scale: 0.5}}"
    text = f"models: {{a: {q}, b: {other}}}\nsteps: [{{take: {{model: a}}}}, {{upcycle: {step}}}]\n"
    outs = [surgery.apply(write_plan(tmp_path, text, f"p{i}.yaml"), tmp_path / f"o{i}", progress=False).path for i in range(2)]
    t0, t1 = load_tensors(outs[0]), load_tensors(outs[1])
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)
    old, mine = load_tensors(q), load_tensors(other)
    up = "model.layers.1.mlp.up_proj.weight"
    diffs = [t0[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] - old[up] for e in range(3)]
    assert all(0.007 < float(d.std()) < 0.013 for d in diffs) and not torch.equal(diffs[0], diffs[1])
    # the routed experts are not halved when the shared expert is given
    assert (t0["model.layers.1.mlp.experts.0.down_proj.weight"] - old["model.layers.1.mlp.down_proj.weight"]).std() < 0.013
    shared = t0["model.layers.1.mlp.shared_expert.down_proj.weight"] - mine["model.layers.1.mlp.down_proj.weight"] * 0.5
    assert 0.003 < float(shared.std()) < 0.007  # noise, then the residual scale (mergekit-moe's order)
    assert not t0["model.layers.1.mlp.shared_expert_gate.weight"].any()
    own = "{experts: [{model: a, noise_scale: 0.1}, {model: a}], top_k: 1, noise: 0.01}"
    t = load_tensors(surgery.apply(_plan(tmp_path, q, own, "own.yaml"), tmp_path / "own", progress=False).path)
    d0, d1 = (t[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] - old["model.layers.0.mlp.up_proj.weight"] for e in range(2))
    assert 0.07 < float(d0.std()) < 0.13 and 0.007 < float(d1.std()) < 0.013


def test_a_mergekit_moe_config_with_noise_runs_seeded_with_a_note(dense, tmp_path):
    m = dense["llama"]
    text = MOE_CONFIG.format(base=m, arch="", gate="random", k=2, e1=m, e2=m).replace(
        '    positive_prompts: ["the', '    noise_scale: 0.1\n    positive_prompts: ["the'
    )
    cfg = tmp_path / "n.yml"
    cfg.write_text(text)
    rep = surgery.validate(cfg)
    assert rep.valid and any(w.code == "seeded-noise" and "n.yml:9" in w.where for w in rep.warnings)
    a, b = (load_tensors(surgery.apply(cfg, tmp_path / x, progress=False).path) for x in "ab")
    w = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    assert torch.equal(a[w], b[w]) and 0.07 < float((a[w] - load_tensors(m)["model.layers.0.mlp.up_proj.weight"]).std()) < 0.13


def test_trainable_can_name_the_routers_or_the_experts(dense, tmp_path):
    """`trainable: routers` / `experts` (alone or in a list with patterns) pick a MoE's router (and
    shared-expert gate) or expert tensors, in transformers' in-memory layout; a dense model has none."""
    import transformers

    from surgery.errors import PlanError
    from surgery.train.config import TrainConfig
    from surgery.train.trainable import select_trainable

    out = surgery.apply(_plan(tmp_path, dense["qwen2"], "{experts: 2, top_k: 1}"), tmp_path / "moe", progress=False).path
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    routers, _ = select_trainable(model, "routers", out, "t.yaml:1")
    n = model.config.num_hidden_layers
    assert len(routers) == 2 * n and all(x.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for x in routers)
    experts, _ = select_trainable(model, ("experts", "model.norm.weight"), out, "t.yaml:1")
    assert "model.norm.weight" in experts and not experts & routers
    assert all(".experts." in x or "shared_expert." in x for x in experts - {"model.norm.weight"})
    with pytest.raises(PlanError, match="has none"):
        select_trainable(transformers.AutoModelForCausalLM.from_pretrained(dense["qwen2"]), "routers", dense["qwen2"], "t.yaml:1")
    with pytest.raises(ValueError, match="stand alone"):
        TrainConfig.model_validate({"model": "x", "data": {"files": ["x"]}, "trainable": ["all", "routers"]})


def test_a_shared_expert_of_another_shape_or_family_is_refused_located(dense, tmp_path):
    q = dense["qwen2"]
    wide = build_tiny("qwen2", tmp_path / "wide", intermediate_size=256)
    for i, (other, expect) in enumerate([(wide, "the shared expert's model 'b' has"), (dense["qwen3"], "a qwen3 model")]):
        text = f"models: {{a: {q}, b: {other}}}\nsteps:\n  - take: {{model: a}}\n  - upcycle: {{experts: 2, shared: {{model: b}}}}\n"
        plan = write_plan(tmp_path, text, f"s{i}.yaml")
        r = CliRunner().invoke(main, ["apply", str(plan), "-o", str(tmp_path / f"never{i}")])
        assert r.exit_code == 1 and expect in r.output and f"s{i}.yaml:4" in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / f"never{i}").exists()


def test_a_relative_base_model_is_read_from_the_configs_folder(tmp_path):
    """The base model's type is read relative to the mergekit-moe config (as every model path is),
    so a wrong `architecture` is caught there too; a base path no file system can hold is no crash."""
    build_tiny("qwen3", tmp_path / "models" / "q", use_sliding_window=False)
    cfg = tmp_path / "models" / "moe.yml"
    cfg.write_text(MOE_CONFIG.format(base="q", arch="architecture: mixtral\n", gate="hidden", k=1, e1="q", e2="q"))
    r = CliRunner().invoke(main, ["validate", str(cfg)])
    assert r.exit_code == 1 and "into qwen3 only" in r.output and "moe.yml:2" in r.output, r.output
    cfg.write_text(MOE_CONFIG.format(base='"a\\0b"', arch="", gate="hidden", k=1, e1="q", e2="q"))
    r = CliRunner().invoke(main, ["validate", str(cfg)])
    assert r.exit_code == 1 and "internal error" not in r.output and "Traceback" not in r.output, r.output


def test_a_qwen2_mergekit_moe_config_without_a_shared_expert_runs_with_a_note(dense, tmp_path):
    """mergekit-moe refuses it (its Qwen MoE needs one shared expert); surgery makes the dense MLP the
    shared expert, and says so where the base model is named."""
    q = dense["qwen2"]
    cfg = tmp_path / "q.yml"
    cfg.write_text(MOE_CONFIG.format(base=q, arch="", gate="cheap_embed", k=1, e1=q, e2=q))
    rep = surgery.validate(cfg)
    assert rep.valid and any(w.code == "dense-shared-expert" and "q.yml:1" in w.where for w in rep.warnings), rep.warnings


@pytest.mark.parametrize("gate, fn", [("cheap_embed", "prompt_router"), ("hidden", "_hidden_gates")])
def test_prompt_gates_are_computed_once_per_run_and_never_kept_across_runs(tmp_path, monkeypatch, gate, fn):
    """Every layer's router (and the embedding read, or the base model's pass, behind it) comes from
    one computation per run; a second run after the base model changed in place computes again (a
    process-wide cache would hand back the old model's gates)."""
    import surgery.engine.evaluate as ev

    calls = []
    real = getattr(ev, fn)
    monkeypatch.setattr(ev, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    base = build_tiny("llama", tmp_path / "base", seed=0, **DENSE["llama"])
    two = "[{model: a, positive_prompts: ['def f(x):']}, {model: a, positive_prompts: ['the cat'], negative_prompts: ['import os']}]"
    plan = _plan(tmp_path, base, f"{{experts: {two}, top_k: 1, router: {gate}}}")
    first = load_tensors(surgery.apply(plan, tmp_path / "a", progress=False).path)
    n_layers = sum(1 for k in first if k.endswith("block_sparse_moe.gate.weight"))
    assert n_layers > 1 and len(calls) == 1
    build_tiny("llama", tmp_path / "base", seed=1, **DENSE["llama"])  # the same folder, other weights
    second = load_tensors(surgery.apply(plan, tmp_path / "b", progress=False).path)
    assert len(calls) == 2
    r = "model.layers.1.block_sparse_moe.gate.weight"
    assert not torch.equal(first[r], second[r])
