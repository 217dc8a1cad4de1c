"""The unit tier: the pure pieces tested directly, no model built, no file beyond tmp_path (each test
well under a second; `python -m pytest -m "not slow"` runs this file with the other fast tests)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from surgery.errors import PlanError, SurgeryError


# ---- the LR schedule -------------------------------------------------------------------------


def test_lr_factor_warmup_then_each_shape():
    from surgery.train.schedule import lr_factor

    assert [lr_factor(s, "cosine", 100, 4) for s in range(4)] == [1 / 5, 2 / 5, 3 / 5, 4 / 5]
    assert lr_factor(4, "cosine", 100, 4) == 1.0  # the peak, the first step after warmup
    assert lr_factor(52, "cosine", 100, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: the mean of peak and floor
    assert lr_factor(100, "cosine", 100, 4, 0.1) == pytest.approx(0.1)  # the floor at the end
    assert lr_factor(10_000, "cosine", 100, 4, 0.1) == pytest.approx(0.1)  # and held past it
    assert lr_factor(52, "linear", 100, 4) == pytest.approx(0.5) and lr_factor(100, "linear", 100, 4) == 0.0
    assert {lr_factor(s, "constant", 100, 4) for s in range(4, 200, 7)} == {1.0}
    with pytest.raises(ValueError, match="cosine, linear or constant"):
        lr_factor(50, "cosinus", 100, 4)


def test_a_stage_that_continues_a_schedule_follows_its_tail():
    """`grow: {schedule: continue}`: stage 2 starting at step 30 of a 100-step schedule reads the same
    factors as the uninterrupted schedule from step 30 on; `reset` starts its own."""
    from surgery.train.schedule import Schedule, lr_factor

    whole = Schedule("cosine", 100, 5, 0.1)
    tail = Schedule("cosine", 100, 5, 0.1, offset=30)
    assert [tail.factor(s) for s in range(70)] == [whole.factor(30 + s) for s in range(70)]
    reset = Schedule("cosine", 70, 5, 0.1)
    assert reset.factor(0) == lr_factor(0, "cosine", 70, 5, 0.1) < tail.factor(0)


# ---- stages of a run -------------------------------------------------------------------------


def _cfg(tmp_path: Path, extra: str = ""):
    from surgery.train.config import config_from_text

    return config_from_text(f"model: m\ndata: {{files: [a.txt], seq_len: 64}}\nmicro_batch: 8\nsteps: 100\n{extra}", tmp_path)


def test_plan_stages_without_and_with_growth(tmp_path):
    from surgery.train.stages import plan_stages

    [one], tps = plan_stages(_cfg(tmp_path), tmp_path)
    assert tps == 512 and (one.steps, one.schedule_steps, one.schedule_offset, one.step_offset) == (100, 100, 0, 0)
    grow = "grow: {at_tokens: 15000, plan: p.yaml}\n"  # ceil(15000 / 512) = 30 steps
    first, second = plan_stages(_cfg(tmp_path, grow), tmp_path)[0]
    assert (first.steps, first.schedule_steps) == (30, 30) and (second.steps, second.schedule_steps, second.schedule_offset) == (70, 70, 0)
    assert second.step_offset == 30 and second.model_dir is None  # the grown model, made when stage 1 ends
    first, second = plan_stages(_cfg(tmp_path, grow.replace("}", ", schedule: continue}")), tmp_path)[0]
    assert (first.schedule_steps, second.schedule_steps, second.schedule_offset) == (100, 100, 30)
    with pytest.raises(PlanError, match="not before the end of the run") as e:
        plan_stages(_cfg(tmp_path, "grow: {at_tokens: 51200, plan: p.yaml}\n"), tmp_path)
    assert "<config>:5" in str(e.value)


def test_flops_count_each_stage_at_its_own_size():
    from surgery.train.stages import Stage

    s = Stage(2, None, 70, "all", 70, 0, 30, 100, flops_per_token=10, flops_offset=1000.0)
    assert s.flops_at(30, 512) == 1000.0 and s.flops_at(40, 512) == 1000.0 + 10 * 512 * 10


def test_mask_stages_follow_msg_order_or_ramp_together():
    from surgery.train.masks import mask_stages

    every = {"intermediate": 96, "hidden": 64, "heads": 8, "kv_heads": 4}
    assert mask_stages(every, True, "msg") == {"intermediate": 0, "hidden": 1, "heads": 2, "layers": 0}
    assert mask_stages({"hidden": 64, "kv_heads": 4}, False, "msg") == {"hidden": 0, "heads": 1}  # kv heads go with the heads
    assert mask_stages(every, True, "together") == {"intermediate": 0, "hidden": 0, "heads": 0, "layers": 0}
    assert mask_stages({}, True, "msg") == {"layers": 0}


def test_report_to_names_are_checked_and_none_is_nothing(tmp_path):
    assert _cfg(tmp_path, "report_to: none\n").body.report_to == ()
    assert _cfg(tmp_path, "report_to: tensorboard, wandb, tensorboard\n").body.report_to == ("tensorboard", "wandb")
    with pytest.raises(PlanError, match="HF Trainer's integrations"):
        _cfg(tmp_path, "report_to: [tensorbored]\n")


def test_a_loaded_config_is_never_changed(tmp_path):
    """with_seq_len returns a new config; the loaded one keeps what it said (and is frozen)."""
    from surgery.train.config import config_from_text, with_seq_len

    cfg = config_from_text("model: m\ndata: {files: [a.txt], seq_len: 32}\nsteps: 3\n", tmp_path)
    assert with_seq_len(cfg, tmp_path) is cfg  # nothing to resolve: not even read from the model
    with pytest.raises(Exception):
        cfg.body.lr = 1.0


# ---- the engine's byte layout ------------------------------------------------------------------


def _tensor(name, file, offset, nbytes, shape=None):
    src = SimpleNamespace(file=Path(file), offset=offset, nbytes=nbytes)
    recipe = SimpleNamespace(src=src, dtype="F32", shape=shape or [nbytes // 4])
    return SimpleNamespace(name=name, recipe=recipe, nbytes=nbytes)


def test_copy_pieces_merge_contiguous_runs_and_cut_them_evenly():
    from surgery.engine.write import copy_pieces

    a, b, c = _tensor("a", "x", 0, 100), _tensor("b", "x", 100, 50), _tensor("c", "y", 0, 30)
    pieces = copy_pieces([(a, 0), (b, 100), (c, 150)], piece=64)
    assert [(p.file.name, p.src_offset, p.nbytes, p.dst_offset, p.tensors_done) for p in pieces] == [
        ("x", 0, 64, 0, 0),
        ("x", 64, 64, 64, 0),
        ("x", 128, 22, 128, 2),  # a and b are one run: both done with its last piece
        ("y", 0, 30, 150, 1),
    ]
    assert copy_pieces([(a, 0), (b, 200)], piece=1 << 20)[0].nbytes == 100  # not contiguous in the output: two runs


def test_shard_header_is_a_valid_padded_safetensors_header():
    from surgery.engine.write import shard_header

    shard = SimpleNamespace(tensors=[_tensor("w", "x", 4096, 64, [4, 4]), _tensor("b", "x", 4160, 16, [4])])
    head, offsets = shard_header(shard, {"format": "pt"})
    (n,) = struct.unpack("<Q", head[:8])
    assert n == len(head) - 8 and len(head) % 8 == 0 and offsets == [0, 64]
    meta = json.loads(head[8:])
    assert meta["__metadata__"] == {"format": "pt"}
    assert meta["w"] == {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]} and meta["b"]["data_offsets"] == [64, 80]


# ---- family data and the registry ---------------------------------------------------------------


def test_family_mlp_entries_have_names_and_bad_ones_are_refused():
    from surgery.arch import Family, MlpEntry
    from surgery.registry import current

    qwen = current().families["qwen_moe"]
    assert all(isinstance(e, MlpEntry) for e in qwen.mlp_in + qwen.mlp_out)
    keys = qwen.mlp_size_keys()
    assert keys[0] == qwen.intermediate_key and set(keys) == {
        "intermediate_size",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    }
    assert qwen.mlp_size_key("mlp.experts.3.down_proj.weight") == "moe_intermediate_size"
    assert current().families["mixtral"].stored_layouts("mlp.gate.weight") == (("block_sparse_moe.gate.weight",),)
    base = {k: v for k, v in json.loads(json.dumps(_family_dict("llama"))).items()}
    with pytest.raises(SurgeryError, match=r"\[pattern, dim, parts"):
        Family.from_dict({**base, "mlp_out": [["mlp\\.down_proj\\.weight", 1]]}, "plugin.json")
    with pytest.raises(SurgeryError, match="JSON object"):
        Family.from_dict({**base, "fused_experts": [["x"]]}, "plugin.json")


def _family_dict(name: str) -> dict:
    from importlib import resources

    return json.loads(resources.files("surgery").joinpath("architectures", f"{name}.json").read_text())


def test_a_failed_registry_transaction_leaves_nothing_behind():
    from surgery.registry import builtin_registry

    reg = builtin_registry()
    before = set(reg.families)
    fam = reg.families["llama"]
    with pytest.raises(RuntimeError):
        with reg.transaction():
            reg.families["llama-copy"] = fam
            raise RuntimeError("a plugin failed half way")
    assert set(reg.families) == before


def test_the_bimix_law_is_exact_on_its_own_curves():
    from surgery.train.mixture import Law, fit_law

    law = Law(A=2.0, alpha=0.3, B=5.0, beta=0.4, C=0.5)
    r, s = [0.2, 0.2, 0.2, 0.5, 0.5, 0.5], [100, 1000, 10000, 100, 1000, 10000]
    loss = [law(ri, si) for ri, si in zip(r, s, strict=True)]
    fit = fit_law(r, s, loss)
    assert all(math.isclose(fit(ri, si), li, rel_tol=1e-3) for ri, si, li in zip(r, s, loss, strict=True))


def test_expert_load_series_and_the_loss_figure_with_its_panel(tmp_path):
    """metrics.jsonl records of a MoE run -> one (tokens, share) series per expert and the balance
    term; loss.png gets the experts' panel (a taller figure); a dense run's has none."""
    import json

    from surgery.train.plot import expert_series, loss_curve

    shares = {1: [0.25, 0.75], 2: [0.5, 0.5], 3: [0.75, 0.25]}
    recs = [
        {"stage": 0, "step": s, "tokens": 64 * s, "loss": 2.0 - 0.1 * s, "expert_load": shares[s], "router_balance": 1.1}
        for s in range(1, 4)
    ]
    load, balance = expert_series(recs)
    assert load == [[(64, 0.25), (128, 0.5), (192, 0.75)], [(64, 0.75), (128, 0.5), (192, 0.25)]] and balance[0] == (64, 1.1)
    assert expert_series([{"tokens": 1, "loss": 1.0}]) == ([], [])
    pytest.importorskip("matplotlib")
    from PIL import Image

    heights = []
    for name, rows in (("moe", recs), ("dense", [{k: v for k, v in r.items() if k in ("stage", "step", "tokens", "loss")} for r in recs])):
        m = tmp_path / f"{name}.jsonl"
        m.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert loss_curve(m, tmp_path / f"{name}.png")
        heights.append(Image.open(tmp_path / f"{name}.png").size[1])
    assert heights[0] > heights[1] * 1.4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"stage": 0, "tokens": 1, "expert_load": ["x", 2]}) + "\n")
    from surgery.errors import PlanError
    from surgery.train.plot import read_metrics

    with pytest.raises(PlanError, match="bad.jsonl:1"):
        read_metrics(bad)
