"""The Gstack paper's depth operators by name (`gstack: {operator, factor}`), laid out as its reference
code lays them, and the dead-parameter rule: new parameters no gradient can reach are warned about at
validate and refused by `train` unless acknowledged."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.errors import PlanError
from surgery.tiny import logits

from .conftest import FAMILIES, load_tensors, read_json, write_plan
from .test_families import check_bitwise


def _plan(tmp_path, src, step: str, name: str = "plan.yaml"):
    return write_plan(tmp_path, f"models: {{base: {src}}}\nsteps:\n  - take: {{model: base}}\n  - {step}\n", name)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_paper_g_zero_keeps_logits_in_prts_layout(family, models, tmp_path):
    """G↑zero (prts G_zero_depthwise.py): layer j followed by factor - 1 copies of itself whose
    attention-output and MLP down projections are zero; logits unchanged; the rest bitwise copies."""
    src = models(family)
    res = surgery.apply(_plan(tmp_path, src, "gstack: {operator: zero, factor: 3}"), tmp_path / "out", progress=False)
    n = read_json(src / "config.json").get("num_hidden_layers") or read_json(src / "config.json")["n_layer"]
    sources = [j for j in range(n) for _ in range(3)]
    assert res.num_layers == 3 * n and res.new_layers == [i for i in range(3 * n) if i % 3]
    diff = (logits(res.path) - logits(src)).abs().max().item()
    assert diff <= 1e-5, f"{family}: the paper's G_zero changed logits by {diff}"
    fam = surgery.api.open_checkpoint("x", "x", src).family
    check_bitwise(res.path, src, sources, fam.layer_prefix, zeroed=lambda j, suffix: j % 3 != 0 and fam.is_output_projection(suffix))
    prov = read_json(res.path / "surgery.json")
    assert {r["made"] for r in prov["layer_map"] if r["new"]} == {"identity"}
    assert prov["layer_map"][1]["step"] == "gstack zero: expand"


def test_gstack_direct_is_stack_and_random_goes_on_top(models, tmp_path):
    src = models("llama")
    a = surgery.apply(_plan(tmp_path, src, "gstack: {operator: direct, factor: 4}", "a.yaml"), tmp_path / "a", progress=False)
    b = surgery.apply(_plan(tmp_path, src, "stack: {times: 4}", "b.yaml"), tmp_path / "b", progress=False)
    ta, tb = load_tensors(a.path), load_tensors(b.path)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # G↑random (prts msg.py): the old layers first, then (factor - 1) * n new random layers on top
    r = surgery.apply(_plan(tmp_path, src, "gstack: {operator: random, factor: 3, std: 0.02, seed: 5}", "r.yaml"), tmp_path / "r")
    assert r.num_layers == 12 and r.new_layers == list(range(4, 12))
    t, s = load_tensors(r.path), load_tensors(src)
    prefix = "model.layers."
    assert all(torch.equal(t[f"{prefix}{i}.mlp.up_proj.weight"], s[f"{prefix}{i}.mlp.up_proj.weight"]) for i in range(4))
    new = [t[f"{prefix}{i}.mlp.up_proj.weight"] for i in range(4, 12)]
    assert all(0.01 < float(x.std()) < 0.03 for x in new) and not torch.equal(new[0], new[1])
    assert torch.equal(t[f"{prefix}5.input_layernorm.weight"], s[f"{prefix}3.input_layernorm.weight"])  # norms kept
    # the same seed gives the same bytes; the schema refuses what the operator cannot take
    again = surgery.apply(_plan(tmp_path, src, "gstack: {operator: random, factor: 3, std: 0.02, seed: 5}", "r2.yaml"), tmp_path / "r2")
    assert all(torch.equal(t[k], v) for k, v in load_tensors(again.path).items())
    for bad, expect in [
        ("gstack: {operator: zero, factor: 1}", "greater than or equal to 2"),
        ("gstack: {operator: zero, factor: 2, std: 0.1}", "only applies to operator: random"),
        ("gstack: {operator: learn, factor: 2}", "'direct', 'zero' or 'random'"),
    ]:
        r = CliRunner().invoke(main, ["validate", str(_plan(tmp_path, src, bad, "bad.yaml"))])
        assert r.exit_code == 1 and "bad.yaml:4" in r.output and expect in r.output, r.output


def _grads(path, layers: list[int]) -> dict[str, float]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: float(p.grad.abs().max()) for n, p in model.named_parameters() if any(f".layers.{i}." in n for i in layers)}


def test_an_all_zero_block_gets_no_gradient_and_the_papers_g_zero_does(models, tmp_path):
    """What the dead-parameters warning says, measured: every weight of an `init: zero` block has a
    zero gradient (and so after any number of steps); in the paper's G_zero the output projections
    get one at once (and through them everything else after the first step)."""
    src = models("llama")
    zero = surgery.apply(_plan(tmp_path, src, "expand: {groups: 4, per_group: 1, init: zero}", "z.yaml"), tmp_path / "z", progress=False)
    g = _grads(zero.path, zero.new_layers)
    # (this tiny Llama has biases: only the output biases move, and they feed nothing back)
    assert g and all(v == 0.0 for k, v in g.items() if "layernorm" not in k and not k.endswith(("o_proj.bias", "down_proj.bias"))), g
    paper = surgery.apply(_plan(tmp_path, src, "gstack: {operator: zero, factor: 2}", "p.yaml"), tmp_path / "p", progress=False)
    g = _grads(paper.path, paper.new_layers)
    assert all(g[k] > 0 for k in g if k.endswith(("o_proj.weight", "down_proj.weight"))), g


def test_dead_parameters_are_warned_at_validate(models, tmp_path):
    src = models("llama")
    for step, expect in [
        ("expand: {groups: 2, init: zero}", "layers 2, 5 are zero but for their norms"),
        ("widen: {intermediate: 96, init: zero}", "the gated MLP's new units (act(gate) * up with both zero)"),
    ]:
        plan = _plan(tmp_path, src, step)
        r = CliRunner().invoke(main, ["validate", str(plan)])
        assert r.exit_code == 0 and "[dead-parameters]" in r.output and expect in r.output and "plan.yaml:4" in r.output, r.output
        strict = CliRunner().invoke(main, ["validate", str(plan), "--strict"])
        assert strict.exit_code == 1
    clean = CliRunner().invoke(main, ["validate", str(_plan(tmp_path, src, "gstack: {operator: zero, factor: 2}"))])
    assert clean.exit_code == 0 and "dead-parameters" not in clean.output


@pytest.mark.slow
def test_train_refuses_dead_parameters_before_any_step_unless_allowed(models, tmp_path):
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    write_pydoc_corpus(tmp_path / "train.jsonl", eval_path=tmp_path / "eval.jsonl")
    data = f"data: {{files: [{tmp_path / 'train.jsonl'}], eval_files: [{tmp_path / 'eval.jsonl'}], seq_len: 32}}\nmicro_batch: 2\n"
    src = models("llama")
    grow = (
        f"model: {src}\n{data}steps: 4\ngrow:\n  at_tokens: 128\n  plan:\n    models: {{small: X}}\n"
        "    steps: [{take: {model: small}}, {expand: {groups: 2, init: zero}}]\n"
    )
    (tmp_path / "grow.yaml").write_text(grow)
    said = []
    with pytest.raises(PlanError, match="zero but for their norms") as e:
        train(tmp_path / "grow.yaml", out=tmp_path / "out", progress=False, echo=said.append)
    assert "allow_dead: true" in str(e.value) and "grow.yaml:" in str(e.value) and not said
    zero = surgery.apply(_plan(tmp_path, src, "expand: {groups: 2, init: zero}", "z.yaml"), tmp_path / "z", progress=False)
    (tmp_path / "new.yaml").write_text(f"model: {zero.path}\n{data}steps: 1\ntrainable: new-layers\n")
    with pytest.raises(PlanError, match="would train nothing"):
        train(tmp_path / "new.yaml", out=tmp_path / "out2", progress=False, echo=said.append)
    (tmp_path / "new.yaml").write_text(f"model: {zero.path}\n{data}steps: 1\ntrainable: new-layers\nallow_dead: true\n")
    assert train(tmp_path / "new.yaml", out=tmp_path / "out3", progress=False, echo=said.append).steps == 1


RMS_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "llama-tied"]


def _size(cfg: dict, *keys):
    return next(cfg[k] for k in keys if cfg.get(k))


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_paper_g_zero_in_width_keeps_logits(family, models, tmp_path):
    """G→zero (App. A.4): stream, heads and MLP grown at once, W' = [[W, A], [O, C]], E' = [E, O], RMS
    gains times sqrt(d / D) and epsilon times d / D (per-head q/k norms compensated in their
    projections): the grown model computes the small one's function."""
    from surgery.tiny import build_tiny

    src = build_tiny("llama", tmp_path / "tied", tie_word_embeddings=True) if family == "llama-tied" else models(family)
    cfg = read_json(src / "config.json")
    h, a = cfg["hidden_size"], cfg["num_attention_heads"]
    k = cfg.get("num_key_value_heads") or a
    i = _size(cfg, "intermediate_size", "moe_intermediate_size")
    step = f"widen: {{hidden: {h + 16}, heads: {2 * a}, kv_heads: {2 * k}, intermediate: {i + 32}, init: zero, std: 0.05}}"
    res = surgery.apply(_plan(tmp_path, src, step), tmp_path / "out", progress=False)
    diff = (logits(res.path) - logits(src)).abs().max().item()
    assert diff <= 1e-5, f"{family}: the paper's G_zero in width changed logits by {diff}"
    assert read_json(res.path / "config.json")["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"] * h / (h + 16))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_paper_g_zero_in_width_warns_for_layernorm(family, models, tmp_path):
    cfg = read_json(models(family) / "config.json")
    h = _size(cfg, "n_embd", "hidden_size")
    r = CliRunner().invoke(main, ["validate", str(_plan(tmp_path, models(family), f"widen: {{hidden: {2 * h}, init: zero}}"))])
    assert r.exit_code == 0 and "[approximate-growth]" in r.output and "LayerNorms also subtract a mean" in r.output, r.output


def test_paper_g_zero_blocks_and_gradients(models, tmp_path):
    """The blocks are the paper's, and every new weight is reachable: the writers' zero blocks (O) get
    a gradient at once through the random readers (A, C); a heads-only G_zero leaves the new heads'
    queries and keys without one, as the dead-parameters warning says."""
    src = models("llama")
    step = "widen: {hidden: 48, heads: 8, kv_heads: 4, intermediate: 96, init: zero, std: 0.05}"
    res = surgery.apply(_plan(tmp_path, src, step), tmp_path / "out", progress=False)
    t, s = load_tensors(res.path), load_tensors(src)
    o = t["model.layers.0.self_attn.o_proj.weight"]  # (48, 64): rows = stream units, columns = head units
    assert torch.equal(o[:32, :32], s["model.layers.0.self_attn.o_proj.weight"])
    assert not o[32:, :32].any() and o[:, 32:].std() > 0.03 and o[32:, 32:].std() > 0.03  # O zero; A and C random
    down = t["model.layers.0.mlp.down_proj.weight"]  # (48, 96)
    assert not down[32:, :64].any() and down[32:, 64:].std() > 0.03 and down[:32, 64:].std() > 0.03
    q = t["model.layers.0.self_attn.q_proj.weight"]  # (64, 48): rows = head units, columns = stream units
    assert not q[32:, :32].any() and q[:, 32:].std() > 0.03
    assert not t["model.embed_tokens.weight"][:, 32:].any() and t["lm_head.weight"][:, 32:].std() > 0.03
    g = _grads(res.path, [0, 1, 2, 3])
    for name in ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert g[name] > 0
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(res.path, dtype=torch.float32)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[1].self_attn.o_proj.weight.grad[32:, :32].abs().max() > 0  # O moves
    assert model.model.embed_tokens.weight.grad[:, 32:].abs().max() > 0
    # heads only: q/k of the new heads get no gradient, their values do
    heads = surgery.apply(_plan(tmp_path, src, "widen: {heads: 8, kv_heads: 4, init: zero}", "h.yaml"), tmp_path / "h", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(heads.path, dtype=torch.float32)
    model(input_ids=ids, labels=ids).loss.backward()
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.weight.grad[32:].abs().max() == 0 and attn.k_proj.weight.grad[16:].abs().max() == 0
    assert attn.v_proj.weight.grad[16:].abs().max() > 0
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "h.yaml")])
    assert "[dead-parameters]" in r.output and "query and key rows" in r.output, r.output


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_paper_g_random_on_top_at_mask_0_is_the_small_model(models, tmp_path, family):
    """G↑random (prts msg.py): the new layers on top, faded in by masks; at mask 0 the grown model
    computes the small one's logits bit for bit, at mask 1 its own."""
    import transformers

    from surgery.train.masks import fade_in_new_layers

    small = models(family)
    grown = surgery.apply(_plan(tmp_path, small, "gstack: {operator: random, factor: 2, std: 0.05}"), tmp_path / "g", progress=False)
    assert grown.new_layers == list(range(4, 8))
    model = transformers.AutoModelForCausalLM.from_pretrained(grown.path, dtype=torch.float32).eval()
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
    cb = fade_in_new_layers(model, grown.path, 4, "cfg")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits(small, ids))
        cb.on_step_end(None, type("S", (), {"global_step": 4})(), None)
        assert torch.equal(model(input_ids=ids).logits, unmasked)
