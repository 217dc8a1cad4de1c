"""`widen`: the MLP grows in width; split and zero keep the function exactly, random does not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.tiny import logits

from .conftest import load_tensors, write_plan

DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "mixtral", "qwen2_moe", "qwen3_moe"]


def _inter(path) -> int:
    c = json.loads((path / "config.json").read_text())
    return c.get("moe_intermediate_size") or c.get("intermediate_size") or c.get("n_inner") or 4 * c["n_embd"]


@pytest.mark.slow
@pytest.mark.parametrize("family", DENSE)
def test_split_and_zero_keep_the_function_for_every_dense_family(models, tmp_path, family):
    m = models(family)
    old = _inter(m)
    base = logits(m)
    odd = (
        old + old // 2 + {"mixtral": 4, "qwen2_moe": 0, "qwen3_moe": 0}.get(family, 3)
    )  # transformers' fused MoE kernel needs 16-byte rows
    for init, new in (("split", 2 * old), ("split", odd), ("zero", old + 16), ("split, shares: random", 2 * old)):
        tag = init.split(",")[0] + ("-random" if "random" in init else "")
        plan = write_plan(
            tmp_path,
            f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: {new}, init: {init}}}}}]\n",
            f"{tag}-{new}.yaml",
        )
        out = surgery.apply(plan, tmp_path / f"{tag}-{new}", progress=False).path
        assert _inter(out) == new
        assert (logits(out) - base).abs().max().item() <= 1e-5, (family, init, new)


def test_split_copies_rows_and_divides_columns(models, tmp_path):
    m = models("llama")
    plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 160}}}}]\n")
    src, out = load_tensors(m), load_tensors(surgery.apply(plan, tmp_path / "o", progress=False).path)
    up, down = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    assert out[up].shape == (160, 32) and out[down].shape == (32, 160)
    assert torch.equal(out[up][:64], src[up]) and torch.equal(out[up][64:128], src[up]) and torch.equal(out[up][128:], src[up][:32])
    # units 0..31 have 3 copies (0, 64, 128), units 32..63 have 2
    assert torch.allclose(out[down][:, 0], src[down][:, 0] / 3) and torch.allclose(out[down][:, 64], src[down][:, 0] / 3)
    assert torch.allclose(out[down][:, 40], src[down][:, 40] / 2)
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], src["model.layers.1.self_attn.q_proj.weight"])


def test_random_is_reproducible_and_changes_the_function(models, tmp_path):
    m = models("llama")
    text = f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 80, init: random, std: 0.05, seed: 3}}}}]\n"
    a = surgery.apply(write_plan(tmp_path, text, "a.yaml"), tmp_path / "a", progress=False).path
    b = surgery.apply(write_plan(tmp_path, text, "b.yaml"), tmp_path / "b", progress=False).path
    ta, tb = load_tensors(a), load_tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    new_rows = ta["model.layers.0.mlp.up_proj.weight"][64:]
    assert 0.03 < new_rows.std().item() < 0.07
    assert (logits(a) - logits(m)).abs().max().item() > 1e-4


def test_widen_with_depth_steps_and_its_errors(models, tmp_path):
    m = models("llama")
    ok = write_plan(
        tmp_path,
        f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 96}}}}, {{stack: {{times: 2}}}}]\n",
        "ok.yaml",
    )
    rep = surgery.validate(ok)
    assert rep.valid and rep.program.num_layers == 8 and "widened: MLP 96 (split)" in rep.program.stack[7].how()
    cases = {
        "late.yaml": (
            f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 96}}}}, {{take: {{model: a}}}}]\n",
            "put `widen` after the last step",
        ),
        "shrink.yaml": (f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 32}}}}]\n", "only adds units"),
        "std.yaml": (
            f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 96, std: 0.1}}}}]\n",
            "`std` only applies",
        ),
    }
    for name, (text, expect) in cases.items():
        rep = surgery.validate(write_plan(tmp_path, text, name))
        assert not rep.valid and expect in str(rep.problems[0]) and f"{name}:" in rep.problems[0].where, (name, rep.problems)
    r = CliRunner().invoke(main, ["export", "--mergekit", str(ok)])
    assert r.exit_code == 1 and "widen has no mergekit equivalent" in r.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "llama-tied"]
)
def test_hidden_growth_keeps_the_function(models, tmp_path, family):
    """The residual stream k times wider as k copies: norms see the same RMS, what reads it is divided
    by k, Gemma's sqrt(hidden) embedding scale and tied embeddings are compensated."""
    from surgery.tiny import build_tiny

    m = build_tiny("llama", tmp_path / "tied", tie_word_embeddings=True) if family == "llama-tied" else models(family)
    base = logits(m)
    for w, hidden in (("{hidden: 64}", 64), ("{hidden: 96, intermediate: 100}", 96)):
        plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {w}}}]\n", f"h{hidden}.yaml")
        out = surgery.apply(plan, tmp_path / f"h{hidden}", progress=False).path
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["hidden_size"] == hidden and cfg["head_dim"] == 8
        assert (logits(out) - base).abs().max().item() <= 5e-6, (family, w)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_gpt2_and_neox_grow_their_stream_and_heads_together(models, tmp_path, family):
    """GPT-2 and NeoX have no head size of their own (hidden / heads): hidden growth copies the heads
    too. GPT-2's Conv1D layouts (heads are the columns of c_attn and the rows of c_proj), its position
    embedding copied, the tied head's final LayerNorm dividing gain and bias, n_inner (null: 4 x
    n_embd) written so the MLP keeps its units; NeoX's query_key_value holds each head's q, k and v
    side by side, its partial rotary is unchanged (the head size is kept), its untied embed_out divided."""
    m = models(family)
    keys = ("n_embd", "n_head", "n_inner") if family == "gpt2" else ("hidden_size", "num_attention_heads", "intermediate_size")
    base = logits(m)
    for w, hidden, inner in (("{hidden: 64}", 64, 128), ("{hidden: 96, intermediate: 200}", 96, 200), ("{hidden: 64, heads: 8}", 64, 128)):
        plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {w}}}]\n", f"g{hidden}.yaml")
        out = surgery.apply(plan, tmp_path / f"g{hidden}-{inner}-{len(w)}", progress=False).path
        cfg = json.loads((out / "config.json").read_text())
        want_inner = inner if family == "gpt2" or "intermediate" in w else 64  # NeoX states its MLP size
        assert tuple(cfg[k] for k in keys) == (hidden, hidden // 8, want_inner), cfg
        assert (logits(out) - base).abs().max().item() <= 5e-6, w
    for w, key in (("{heads: 8}", "heads"), ("{hidden: 64, heads: 12}", "heads"), ("{hidden: 64, kv_heads: 8}", "kv_heads")):
        rep = surgery.validate(write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {w}}}]\n", "bad.yaml"))
        assert not rep.valid and "grow only with the hidden size" in str(rep.problems[0]) and "bad.yaml:2" in rep.problems[0].where, w


def test_hidden_growth_errors(models, tmp_path):
    import shutil

    m = models("llama")
    guessed = tmp_path / "mystery"  # an unknown model type: its family is guessed from tensor names, with no width data
    shutil.copytree(m, guessed)
    cfg = json.loads((guessed / "config.json").read_text())
    (guessed / "config.json").write_text(json.dumps({**cfg, "model_type": "mystery-lm"}))
    for name, text, expect in (
        ("small.yaml", f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 16}}}}]\n", "only adds units"),
        ("guessed.yaml", f"models: {{a: {guessed}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 64}}}}]\n", "architecture entry"),
        ("none.yaml", f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{}}}}]\n", "give `intermediate`"),
    ):
        rep = surgery.validate(write_plan(tmp_path, text, name))
        assert not rep.valid and expect in str(rep.problems[0]) and name in rep.problems[0].where, (name, rep.problems)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"])
def test_head_growth_keeps_the_function(models, tmp_path, family):
    """Copied heads (with their key/value groups, GQA ratio kept) and o_proj columns shared among
    the copies: the same attention output; combined with hidden and MLP growth."""
    m = models(family)
    base = logits(m)
    for w in ("{heads: 8}", "{heads: 8, kv_heads: 4, hidden: 64, intermediate: 100}"):
        plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {w}}}]\n", "h.yaml")
        out = surgery.apply(plan, tmp_path / "o", progress=False, force=True).path
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 8)
        assert (logits(out) - base).abs().max().item() <= 5e-6, (family, w)
    rep = surgery.validate(
        write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{heads: 8, kv_heads: 3}}}}]\n", "bad.yaml")
    )
    assert not rep.valid and "keep that ratio" in str(rep.problems[0]) and "bad.yaml" in rep.problems[0].where


@pytest.mark.slow
def test_surgery_json_records_what_grew_and_new_params_trains_it(models, tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    m = models("llama")
    plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 96}}}}]\n")
    out = surgery.apply(plan, tmp_path / "wide", progress=False).path
    w = json.loads((out / "surgery.json").read_text())["widened"]
    assert w["sizes"] == {"intermediate": 96} and len(w["tensors"]) == 4 * 5  # gate and up (weights, biases), down
    write_pydoc_corpus(tmp_path / "train.jsonl", eval_path=tmp_path / "eval.jsonl")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        f"model: {out}\noutput: {tmp_path / 'trained'}\ndata: {{files: [{tmp_path / 'train.jsonl'}], seq_len: 32}}\n"
        "steps: 2\nmicro_batch: 2\ntrainable: new-params\nlr: 1e-2\n"
    )
    res = train(cfg, progress=False, echo=lambda *a: None)
    before, after = load_tensors(out), load_tensors(res.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(w["tensors"])


def test_a_non_multiple_hidden_size_is_approximate_and_says_by_how_much(models, tmp_path):
    """Units copied unevenly: norms see another RMS. validate warns (approximate-growth); on the tiny
    Llama the largest logit moves by ~0.03 against logits of ~0.4 (measured here, bounded below)."""
    m = models("llama")
    plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 48}}}}]\n")
    rep = surgery.validate(plan)
    w = [x for x in rep.warnings if x.code == "approximate-growth"]
    assert rep.valid and len(w) == 1 and "plan.yaml:2" in w[0].where and "use a multiple of 32" in w[0].fix
    out = surgery.apply(plan, tmp_path / "o", progress=False).path
    diff = (logits(out) - logits(m)).abs().max().item()
    assert 1e-4 < diff < 0.1, diff
    assert CliRunner().invoke(main, ["validate", str(plan), "--strict"]).exit_code == 1


@pytest.mark.parametrize("hidden", [64, 48])  # a whole multiple and not: one code path, the same refusal
def test_a_matrix_the_family_does_not_describe_is_refused(models, tmp_path, hidden):
    import dataclasses

    from surgery import registry

    with registry.scoped() as reg:
        fam = reg.families["llama"]
        partial = dataclasses.replace(fam, hidden_in=tuple(x for x in fam.hidden_in if "mlp" not in x[0]))
        reg.families["llama"] = partial
        reg.by_model_type["llama"] = partial
        plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: {hidden}}}}}]\n")
        rep = surgery.validate(plan)
    assert not rep.valid and "does not say how it grows" in str(rep.problems[0]) and "plan.yaml:" in rep.problems[0].where


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_zero_and_random_hidden_units(models, tmp_path, family):
    """G_zero / G_random for the residual stream: new units appended; the embeddings' new columns zero
    (G_zero) or normal(0, std) (seeded), the old ones untouched; norms a neutral gain for the new units
    (1; 0 for Gemma's 1 + w; LayerNorm biases 0) and, under G_zero, RMS gains rescaled; the model
    loads and runs."""
    import transformers

    m = models(family)
    old = load_tensors(m)
    for init in ("zero", "random, std: 0.05, seed: 3"):
        tag = init.split(",")[0]
        plan = write_plan(
            tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 64, init: {init}}}}}]\n", f"{tag}.yaml"
        )
        out = surgery.apply(plan, tmp_path / tag, progress=False).path
        new = load_tensors(out)
        emb = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
        extra = new[emb][:, 32:]
        if tag == "zero":
            assert not extra.any()
        else:
            assert 0.03 < float(extra.std()) < 0.07  # normal(0, 0.05)
        if family == "gemma3":  # Gemma's sqrt(hidden) embedding scale grew: the old units keep their magnitude
            assert torch.allclose(new[emb][:, :32], old[emb] * (32 / 64) ** 0.5)
        else:
            assert torch.equal(new[emb][:, :32], old[emb])
        norm = "transformer.h.0.ln_1" if family == "gpt2" else "model.layers.0.input_layernorm"
        gain = new[f"{norm}.weight"]
        g_old = old[f"{norm}.weight"]
        if tag == "zero" and family != "gpt2":  # the paper's Eq. 33: RMS gains times sqrt(d / D) (Gemma: 1 + w)
            want = (1 + g_old) * 0.5**0.5 - 1 if family == "gemma3" else g_old * 0.5**0.5
            assert torch.allclose(gain[:32], want, atol=1e-7)
        else:
            assert torch.equal(gain[:32], g_old)
        assert torch.all(gain[32:] == (0.0 if family == "gemma3" else 1.0))
        if family == "gpt2":
            assert not new[f"{norm}.bias"][32:].any()
        logits = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=torch.tensor([[3, 4, 5]])).logits
        assert torch.isfinite(logits).all()
    again = surgery.apply(plan, tmp_path / "again", progress=False).path  # seeded: the same draw
    assert torch.equal(load_tensors(again)[emb], new[emb])


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe", "gpt2", "gpt_neox"]
)
def test_zero_and_random_heads(models, tmp_path, family):
    """G_zero / G_random for attention heads: new query heads appended after the old ones and new
    key/value heads after theirs (query head h still reads group h // g), their q/k/v rows and the
    o_proj columns that read them zero or normal(0, std): `zero` keeps the function exactly (a zero
    head contributes nothing), `random` does not; the old rows are untouched. GPT-2 and NeoX grow
    their heads with the stream (no head size of their own): checked through the tensors."""
    m = models(family)
    old, base = load_tensors(m), logits(m)
    w = "hidden: 64" if family in ("gpt2", "gpt_neox") else "heads: 8, kv_heads: 4"
    for init in ("zero", "random, std: 0.05, seed: 1"):
        tag = init.split(",")[0]
        text = f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{{w}, init: {init}}}}}]\n"
        plan = write_plan(tmp_path, text, f"{tag}.yaml")
        out = surgery.apply(plan, tmp_path / tag, progress=False).path
        new = load_tensors(out)
        if family not in ("gpt2", "gpt_neox", "phi3"):  # a q_proj of its own: the old heads' rows are the old rows
            q = "model.layers.1.self_attn.q_proj.weight"
            assert new[q].shape == (64, 32) and torch.equal(new[q][:32], old[q])
            extra = new[q][32:]
            assert (not extra.any()) if tag == "zero" else 0.03 < float(extra.std()) < 0.07
        if tag == "zero" and family not in ("gpt2", "gpt_neox"):
            assert (logits(out) - base).abs().max().item() <= 1e-6, family
        elif tag == "random":
            assert (logits(out) - base).abs().max().item() > 1e-3, family


@pytest.mark.slow
@pytest.mark.parametrize(
    "family",
    ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "llama-tied", "gemma3-tied"]
    + ["mixtral", "qwen2_moe", "qwen3_moe"],
)
def test_masks_fade_in_new_stream_units_heads_and_mlp_units(models, tmp_path, family):
    """Masked width growth (MSG): with the stream, heads and MLP grown with random units, m = 0 is the
    small model's function (masked norm statistics, writers' new units times m, new heads and units
    times m before the projection reading them), m = 1 the grown model bit for bit, and m = 1/2
    neither; tied heads, Gemma's scaled embedding and fused experts (masked at their output) included."""
    import transformers

    from surgery.tiny import build_tiny
    from surgery.train.masks import fade_in_new_layers

    if family.endswith("-tied"):
        small = build_tiny(family[: -len("-tied")], tmp_path / "tied", tie_word_embeddings=True)
    else:
        small = models(family)
    w = "hidden: 64, intermediate: 160" if family in ("gpt2", "gpt_neox") else "hidden: 64, heads: 8, kv_heads: 4, intermediate: 100"
    if "moe" in family or family == "mixtral":  # fused experts: masked at their combined output (new units inside them are refused)
        w = "hidden: 64, heads: 8, kv_heads: 4"
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{widen: {{{w}, init: random, std: 0.3}}}}]\n")
    grown = surgery.apply(plan, tmp_path / "grown", progress=False).path
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    # msg: MSG's stages (MLP units, the stream, heads; each 4 steps; of what the widen names: GPT-2's and
    # NeoX's heads grow with the stream here, the MoE's MLP units stay), new heads masked at q, k, v
    two = "moe" in family or family in ("mixtral", "gpt2", "gpt_neox")
    for style, stages in (("msg", 2 if two else 3), ("together", 1)):
        model = transformers.AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32).eval()
        with torch.no_grad():
            unmasked = model(input_ids=ids).logits
            ref = transformers.AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32).eval()(input_ids=ids).logits
            assert (unmasked - ref).abs().max() > 0.1
            cb = fade_in_new_layers(model, grown, 4, "cfg", small_dir=small, style=style)
            cb.on_train_begin(None, type("S", (), {"global_step": 0})(), None)
            assert (model(input_ids=ids).logits - ref).abs().max().item() <= 2e-6, (family, style)  # m = 0: the small model
            seen = []
            for step in range(2, 4 * stages + 1, 2):
                cb.on_step_end(None, type("S", (), {"global_step": step})(), None)
                seen.append(model(input_ids=ids).logits)
            assert all((x - ref).abs().max() > 1e-2 for x in seen[:-1]) and all((x - unmasked).abs().max() > 1e-2 for x in seen[:-1])
            assert all((x - y).abs().max() > 1e-4 for x, y in zip(seen, seen[1:], strict=False))  # every stage moves the function
            assert torch.equal(seen[-1], unmasked), (family, style)  # every m = 1: bit for bit
    if family == "llama":  # split units are copies, not new: nothing to fade in
        from surgery.errors import PlanError

        split = surgery.apply(
            write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{widen: {{intermediate: 96}}}}]\n", "s.yaml"),
            tmp_path / "split",
            progress=False,
        ).path
        with pytest.raises(PlanError, match="adds neither"):
            fade_in_new_layers(model, split, 4, "cfg", small_dir=small)


def test_masks_refuse_fused_experts_and_learn_refuses_non_copies(models, tmp_path):
    """Two refusals, located: width masks cannot hook transformers' fused MoE expert weights, and
    LiGO's depth operator starts only from layers that are copies (or identity blocks)."""
    import transformers

    from surgery.errors import PlanError
    from surgery.train.ligo import _operator_init
    from surgery.train.masks import fade_in_new_layers

    small = models("mixtral")
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{widen: {{intermediate: 96, init: random}}}}]\n")
    grown = surgery.apply(plan, tmp_path / "grown", progress=False).path
    model = transformers.AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32)
    with pytest.raises(PlanError) as e:
        fade_in_new_layers(model, grown, 4, "cfg.yaml:7", small_dir=small)
    assert "fused" in str(e.value) and "cfg.yaml:7" in str(e.value)
    import re

    with pytest.raises(PlanError) as e:
        _operator_init([{"layer": 0, "made": "zero", "sources": [["s", 0]]}], 2, ["mlp.w"], re.compile("(?!)"), "cfg.yaml:9")
    assert "copies" in str(e.value) and "cfg.yaml:9" in str(e.value) and "operator: plan" in str(e.value)


def _masked_width() -> str:
    """test_mutations' masked-growth run with width growth in place of new layers."""
    from .test_mutations import MASKED

    step = "- widen: {hidden: 64, heads: 8, kv_heads: 4, intermediate: 96, init: random, std: 0.05}"
    # MSG's three stages (MLP units, stream, heads) of 2 steps: the same 6 steps of ramp
    return MASKED.replace("- expand: {groups: 2, init: random, std: 0.05}", step).replace("mask_steps: 6", "mask_steps: 2")


@pytest.mark.slow
def test_masked_width_growth_trains_and_resumes_exactly(tmp_path, models):
    """`grow.mask_steps` on width growth in a real run: killed inside the ramp and resumed, the run
    equals an uninterrupted one bitwise (the masks follow the global step)."""
    pytest.importorskip("accelerate")
    from .test_train import killed_and_resumed

    ta, tb, _ = killed_and_resumed(tmp_path, models("llama"), _masked_width())
    assert ta["model.embed_tokens.weight"].shape[1] == 64 and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "llama-tied", "gemma3-tied"]
)
def test_learned_width_operator_starts_at_the_split_and_learns(models, tmp_path, family):
    """G_learn in width (LiGO's expansion matrices, one pair per kind of unit shared by every layer,
    with its depth operator): with no steps the materialised model is the plan's split output (stack
    x2 then widen stream, heads and MLP); a few steps lower its own training loss, and the written
    checkpoint computes exactly that loss when loaded."""
    import transformers

    from surgery.tiny import build_tiny
    from surgery.train.ligo import learn_growth

    if family.endswith("-tied"):
        small = build_tiny(family[: -len("-tied")], tmp_path / "tied", tie_word_embeddings=True)
    else:
        small = models(family)
    w = "hidden: 64, intermediate: 160" if family in ("gpt2", "gpt_neox") else "hidden: 64, heads: 8, kv_heads: 4, intermediate: 100"
    shares = "random" if family in ("llama", "gemma3-tied", "gpt2", "phi3") else "even"  # LiGO starts at the plan's own shares
    steps = f"[{{take: {{model: s}}}}, {{stack: {{times: 2}}}}, {{widen: {{{w}, shares: {shares}}}}}]"
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: {steps}\n")
    grown = surgery.apply(plan, tmp_path / "grown", progress=False).path
    split = load_tensors(grown)
    quiet = lambda *a: None  # noqa: E731
    learn_growth(small, grown, [], steps=0, lr=0.01, where="t", echo=quiet)
    start = load_tensors(grown)
    assert all((start[k] - split[k]).abs().max() <= 1e-6 for k in split), family
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 16), generator=g)
    batches = [{"input_ids": ids, "labels": ids}] * 4  # one batch, four steps: its loss must go down
    rec = learn_growth(small, grown, batches, steps=4, lr=0.01, where="t", echo=quiet)
    assert rec["loss_after"] < rec["loss_before"] and "width" in rec
    assert rec["width"]["A:stream"]["moved"] > 0 and rec["width"]["A:stream"]["shape"] == [64, 32]
    model = transformers.AutoModelForCausalLM.from_pretrained(grown, dtype=torch.float32).eval()
    with torch.no_grad():
        loaded = sum(model(**b).loss.item() for b in batches) / len(batches)
    assert abs(loaded - rec["loss_after"]) < 1e-4, (loaded, rec["loss_after"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "phi3", "gpt2", "gpt_neox"])
def test_the_papers_learned_width_operator_keeps_old_units_and_ties_its_sides(models, tmp_path, family):
    """G_learn as the Gstack paper's code has it (`operator: learn`): one expansion [I; R] per kind of
    unit, tied between in- and out-side, on rows. At step 0 every grown layer's tensor holds its
    source layer's (l mod n: stacking's D) in its top-left corner, whatever the fused layout (GPT-2's
    c_attn, Phi-3's qkv and gate_up, NeoX's per-head q|k|v), and the new rows and columns are not
    zero; the random part is seeded; a few steps lower the loss; the record has one matrix per kind."""
    import re

    from surgery.train.ligo import learn_growth

    small = models(family)
    w = "hidden: 64, intermediate: 160" if family in ("gpt2", "gpt_neox") else "hidden: 64, heads: 8, kv_heads: 4, intermediate: 100"
    steps = f"[{{take: {{model: s}}}}, {{gstack: {{operator: direct, factor: 2}}}}, {{widen: {{{w}, init: zero}}}}]"
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: {steps}\n")
    grown = surgery.apply(plan, tmp_path / "grown", progress=False).path
    twin = tmp_path / "twin"
    shutil.copytree(grown, twin)
    quiet = lambda *a: None  # noqa: E731
    learn_growth(small, grown, [], steps=0, lr=0.01, where="t", echo=quiet, variant="paper", seed=3)
    learn_growth(small, twin, [], steps=0, lr=0.01, where="t", echo=quiet, variant="paper", seed=3)
    start, old = load_tensors(grown), load_tensors(small)
    assert all(torch.equal(start[k], v) for k, v in load_tensors(twin).items())  # seeded
    n = max(int(m.group(1)) for k in old if (m := re.search(r"\.(\d+)\.", k))) + 1

    def parts(name, t, folder):  # a fused tensor's parts, each grown on its own
        c = json.loads((folder / "config.json").read_text())
        if "gate_up_proj" in name:
            return t.chunk(2, 0)
        if "qkv_proj" in name:
            d = c["hidden_size"] // c["num_attention_heads"]
            return t.split([c["num_attention_heads"] * d, c["num_key_value_heads"] * d, c["num_key_value_heads"] * d], 0)
        if "c_attn" in name:
            return t.chunk(3, -1)
        return [t]  # NeoX's per-head q|k|v: the old heads come first

    checked = 0
    for k, v in start.items():
        m = re.search(r"\.(\d+)\.", k)
        if not m:
            continue
        src = old[k.replace(f".{m.group(1)}.", f".{int(m.group(1)) % n}.", 1)]
        for new, was in zip(parts(k, v, grown), parts(k, src, small), strict=True):
            corner = new[tuple(slice(0, s) for s in was.shape)]
            assert torch.allclose(corner, was, rtol=0, atol=1e-6), k  # Gemma's 1 + w gains: (1 + w) - 1 rounds
            if new.dim() == 2 and new.shape != was.shape:
                assert new.abs().sum() > corner.abs().sum(), k  # the new units are random, not zero
        checked += 1
    assert checked > 10
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 16), generator=g)
    batches = [{"input_ids": ids, "labels": ids}] * 4
    rec = learn_growth(small, twin, batches, steps=4, lr=0.01, where="t", echo=quiet, variant="paper")
    assert rec["operator"] == "learn" and rec["loss_after"] < rec["loss_before"]
    assert rec["width"]["A:stream"]["shape"] == [64, 32] and rec["width"]["A:stream"]["tied"]
    assert not any(k.startswith("B:") for k in rec["width"])


def test_learned_width_operator_refusals(models, tmp_path):
    """Our LiGO width operator (`learn-split`) starts from the split: a zero/random widen is refused;
    Mixtral's fused experts are not described to it (its depth operator works): both located."""
    from surgery.errors import PlanError
    from surgery.train.ligo import learn_growth

    small = models("llama")
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{widen: {{hidden: 64, init: zero}}}}]\n")
    grown = surgery.apply(plan, tmp_path / "zero", progress=False).path
    with pytest.raises(PlanError) as e:
        learn_growth(small, grown, [], steps=1, lr=0.01, where="cfg.yaml:4", echo=None, variant="split")
    assert "init: split" in str(e.value) and "cfg.yaml:4" in str(e.value)
    small = models("mixtral")
    plan = write_plan(tmp_path, f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{widen: {{hidden: 64}}}}]\n", "m.yaml")
    grown = surgery.apply(plan, tmp_path / "moe", progress=False).path
    with pytest.raises(PlanError) as e:
        learn_growth(small, grown, [], steps=1, lr=0.01, where="cfg.yaml:5", echo=None)
    assert "does not describe" in str(e.value) and "experts" in str(e.value) and "cfg.yaml:5" in str(e.value)


def test_qwen_moe_grows_experts_shared_expert_and_dense_mlp_by_one_ratio(models, tmp_path):
    """Qwen2-MoE has three MLP sizes: `intermediate` sets moe_intermediate_size (every expert) and the
    shared expert and dense MLP grow by the same ratio; the router and the shared expert's gate read
    the stream. Exact; validate lists the config changes and warns when fused experts get rows the
    grouped kernels cannot run (not a multiple of 16 bytes)."""
    m = models("qwen2_moe")
    plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 24, hidden: 64}}}}]\n")
    rep = surgery.validate(plan)
    assert rep.valid and not [w for w in rep.warnings if "16 bytes" in w.what]
    out = surgery.apply(plan, tmp_path / "o", progress=False).path
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["intermediate_size"], cfg["hidden_size"]) == (
        24,
        72,
        96,
        64,
    )
    t = load_tensors(out)
    assert t["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (24, 64)
    assert t["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (64, 72)
    assert t["model.layers.0.mlp.gate.weight"].shape == (4, 64) and t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert (logits(out) - logits(m)).abs().max().item() <= 5e-6
    bad = surgery.validate(
        write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{intermediate: 26}}}}]\n", "b.yaml")
    )
    [w] = [w for w in bad.warnings if "16 bytes" in w.what]
    assert "b.yaml:2" in w.where and "32" in w.fix


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox", "phi3", "qwen2_moe", "llama-tied", "gemma3-tied"])
def test_random_shares_keep_the_function_and_break_the_symmetry(models, tmp_path, family):
    """Split with even shares: a unit's copies get identical gradients and stay copies under training
    (validate warns, symmetric-split). `shares: random` gives each copy a seeded share of what reads
    its unit (summing to 1: the same function, tied heads and Gemma's scaled embedding included), so
    one training step already tells the copies apart."""
    import transformers

    from surgery.tiny import build_tiny

    if family.endswith("-tied"):
        m = build_tiny(family[: -len("-tied")], tmp_path / "tied", tie_word_embeddings=True)
    else:
        m = models(family)
    w = "hidden: 64, intermediate: 160" if family in ("gpt2", "gpt_neox") else "hidden: 64, heads: 8, kv_heads: 4, intermediate: 128"
    if family == "qwen2_moe":
        w = "hidden: 64, heads: 8, kv_heads: 4, intermediate: 32"
    base = logits(m)
    layer = {"gpt2": "transformer.h.1.", "gpt_neox": "gpt_neox.layers.1."}.get(family, "model.layers.1.")
    writer = {"gpt2": "attn.c_proj.weight", "gpt_neox": "attention.dense.weight"}.get(family, "self_attn.o_proj.weight")
    for shares in ("even", "random"):
        plan = write_plan(
            tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{{w}, shares: {shares}}}}}]\n", f"{shares}.yaml"
        )
        rep = surgery.validate(plan)
        assert rep.valid and any(x.code == "symmetric-split" for x in rep.warnings) == (shares == "even")
        out = surgery.apply(plan, tmp_path / shares, progress=False).path
        assert (logits(out) - base).abs().max().item() <= 5e-6, (family, shares)
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        t = dict(model.named_parameters())[layer + writer].detach()
        if family == "gpt2":
            t = t.T  # Conv1D: [in, out]
        copies = (t[:32] - t[32:64]).abs().max().item()  # stream unit j and its copy j + 32 (o_proj's rows)
        assert (copies == 0.0) == (shares == "even"), (family, shares, copies)
    text = f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{hidden: 64, init: zero, shares: random}}}}]\n"
    rep = surgery.validate(write_plan(tmp_path, text, "bad.yaml"))
    assert not rep.valid and "init: split" in str(rep.problems[0]) and "bad.yaml" in rep.problems[0].where


def test_learn_from_a_plan_it_cannot_start_from_fails_before_training(tmp_path, models):
    """`operator: learn-split` with a grow plan it cannot start from (new units that are not copies)
    is a located error when the run starts, not after stage 1 has trained (the paper's `learn` takes
    only the widened shapes from the plan, so it starts from any widen)."""
    extra = (
        "grow:\n  at_tokens: 2048\n  operator: learn-split\n  learn_steps: 2\n  plan:\n    models: {small: TRAINED}\n"
        "    steps:\n      - take: {model: small}\n      - widen: {hidden: 64, init: zero}\n"
    )
    e = _refused_before_training(tmp_path, models, extra)
    assert "init: split" in str(e) and "train.yaml:" in str(e)


@pytest.mark.slow
def test_msg_stages_that_outlast_the_run_are_refused_before_training(tmp_path, models):
    """MSG's staged masks take mask_steps per stage (MLP units, stream, heads: 3 here): a run with
    fewer steps after growth than that is refused at its start, located, with both fixes; the same
    budget with `masks: together` (one stage) is accepted."""
    extra = (
        "grow:\n  at_tokens: 2048\n  mask_steps: 3\n  plan:\n    models: {small: TRAINED}\n"
        "    steps:\n      - take: {model: small}\n      - widen: {hidden: 64, heads: 8, kv_heads: 4, intermediate: 96, init: random}\n"
    )
    e = _refused_before_training(tmp_path, models, extra)
    assert "3 x 3 stages" in str(e) and "train.yaml:" in str(e) and "masks: together" in str(e)
    assert "mask_steps <= 1" in str(e)
    # one stage of 3 steps fits the 4 steps after growth: the run starts (stopped after its first step)
    from surgery.train import train

    from .test_train import config, quiet

    corpus = tmp_path / "corpus"
    res = train(
        config(tmp_path, corpus, models("llama"), extra.replace("mask_steps: 3", "mask_steps: 3\n  masks: together"), steps=8),
        force=True, progress=False, echo=quiet, stop_after=1,
    )  # fmt: skip
    assert res.path is None and res.steps == 1


def _refused_before_training(tmp_path, models, extra: str):
    """A grow config `surgery train` must refuse at its start: the PlanError, with nothing trained."""
    from surgery.errors import PlanError
    from surgery.train import train

    from .test_train import config, quiet, write_pydoc_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    write_pydoc_corpus(corpus / "train.jsonl", eval_path=corpus / "eval.jsonl")
    with pytest.raises(PlanError) as e:
        train(config(tmp_path, corpus, models("llama"), extra, steps=8), progress=False, echo=quiet)
    assert not (tmp_path / ".out.surgery-train" / "stage-1").exists()
    return e.value


def test_a_widened_config_transformers_refuses_is_an_error(models, tmp_path):
    """Llama's config refuses a hidden size that is not a multiple of the heads: such an output could
    not be loaded, so the plan is invalid, located, with the fix; Qwen2's config accepts it (the head
    size is explicit) and the grown model loads and keeps its function."""
    for family, valid in (("llama", False), ("qwen2", True)):
        m = models(family)
        plan = write_plan(tmp_path, f"models: {{a: {m}}}\nsteps: [{{take: {{model: a}}}}, {{widen: {{heads: 6}}}}]\n", f"{family}.yaml")
        rep = surgery.validate(plan)
        assert rep.valid == valid, rep.problems
        if not valid:
            assert "transformers refuses" in str(rep.problems[0]) and f"{family}.yaml:2" in rep.problems[0].where
            assert "heads that divide" in rep.problems[0].fix
        else:
            out = surgery.apply(plan, tmp_path / family, progress=False).path
            assert (logits(out) - logits(m)).abs().max().item() <= 5e-6


@pytest.mark.parametrize(
    "widen, expect",
    [
        ("{heads: 6}", "transformers refuses the widened config"),  # Llama: hidden 32 is not a multiple of 6 heads
        ("{hidden: 64, init: zero, shares: random}", "`shares` is for init: split"),
        ("{heads: 8, kv_heads: 3}", "keep that ratio"),
    ],
)
def test_widen_refusals_through_the_cli(models, tmp_path, widen, expect):
    """The CLI prints each widen refusal with the plan's file:line, no traceback, and exits 1 (validate
    and apply alike; apply writes nothing)."""
    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps:\n  - take: {{model: a}}\n  - widen: {widen}\n")
    for args in (["validate", str(plan)], ["apply", str(plan), "-o", str(tmp_path / "out")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1 and expect in r.output and f"{plan}:4" in r.output, r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
