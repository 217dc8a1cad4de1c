"""Bad input to the newer commands, by class (issue 23): every member is a located error with exit
1 and no traceback, nothing non-finite is printed as a result, configs never outrank tensors, and
checks come before the work they protect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli import main
from tests.conftest import write_plan


def _run(*args, expect_exit: int = 1):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == expect_exit, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    return r.output


def _copy(models, tmp_path, name: str = "m", family: str = "llama") -> Path:
    dst = tmp_path / name
    shutil.copytree(models(family), dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _text(tmp_path) -> Path:
    p = tmp_path / "held.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\n" * 200)
    return p


# ---- huge numbers and impossible paths: validate catches what apply catches -------------------------


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_impossible_numbers_and_paths_in_a_plan_are_located(models, tmp_path, command):
    m = models("llama")
    cases = {
        "digits.yaml": (f"models: {{m: {m}}}\nsteps: [{{take: {{model: m, layers: [0, {'9' * 5000}]}}}}]\n", "digits.yaml:2"),
        "bigint.yaml": (f"models: {{m: {m}}}\nsteps: [{{take: {{model: m}}}}]\nseed: {10**30}\n", "bigint.yaml:3"),
        "longpath.yaml": (f"models: {{m: ./{'x' * 5000}}}\nsteps: [{{take: {{model: m}}}}]\n", "longpath.yaml:1"),
    }
    for name, (text, where) in cases.items():
        plan = write_plan(tmp_path, text, name)
        args = [command, plan] + (["-o", tmp_path / "out"] if command == "apply" else [])
        out = _run(*args)
        assert where in out, out
    assert not (tmp_path / "out").exists()


# ---- the tensors are the truth ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,change,said",
    [
        ("llama", {"hidden_size": 16}, "hidden_size = 16"),
        ("llama", {"head_dim": 4}, "head size"),
        ("llama", {"vocab_size": 100}, "vocab_size = 100"),
        ("llama", {"intermediate_size": 48}, "intermediate_size = 48"),
        ("llama", {"num_key_value_heads": 4}, "num_key_value_heads"),
        ("qwen3", {"head_dim": 16}, "head size"),
        ("gpt2", {"n_embd": 48}, "n_embd = 48"),
        ("phi3", {"intermediate_size": 32}, "2 x intermediate_size = 64"),
    ],
)
def test_a_config_that_contradicts_the_tensors_is_refused_by_every_command(models, tmp_path, family, change, said):
    bad = _copy(models, tmp_path, family=family)
    _edit_config(bad, **change)
    plan = write_plan(tmp_path, f"models: {{m: {bad}}}\nsteps: [{{take: {{model: m}}}}, {{widen: {{intermediate: 512}}}}]\n")
    out = _run("validate", plan)
    assert "config.json says" in out and said in out and "the config and the weights disagree" in out, out
    _run("apply", plan, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    text = _text(tmp_path)
    for cmd in (["eval", bad, "--data", text], ["analyze", bad, "--data", text, "--samples", "2", "--seq-len", "8"]):
        out = _run(*cmd)
        assert "config.json says" in out, out


def test_a_widen_error_is_said_once(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{m: {models('llama')}}}\nsteps: [{{take: {{model: m}}}}, {{widen: {{hidden: 40, heads: 5}}}}]\n")
    out = _run("validate", plan)
    assert out.count("the new counts must keep that ratio") == 1, out


# ---- surgery.json is read through one validated model -----------------------------------------------


@pytest.mark.parametrize(
    "field,value,said",
    [
        ("widened", {"sizes": {"intermediate": 96}, "init": "split", "tensors": "*"}, "widened.tensors"),
        ("widened", {"sizes": {"intermediate": 96}, "init": "split", "tensors": ["a", 3]}, "widened.tensors"),
        ("new_layers", "1", "new_layers"),
        ("new_layers", [1.5], "new_layers"),
        ("layer_map", [{"layer": 0, "made": "copy", "new": "yes"}], "layer_map.0.new"),
    ],
)
def test_a_damaged_surgery_json_never_widens_what_trains(models, tmp_path, field, value, said):
    plan = write_plan(tmp_path, f"models: {{m: {models('llama')}}}\nsteps: [{{take: {{model: m}}}}, {{widen: {{intermediate: 96}}}}]\n")
    grown = tmp_path / "grown"
    _run("apply", plan, "-o", grown, "-q", expect_exit=0)
    prov = json.loads((grown / "surgery.json").read_text())
    prov[field] = value
    (grown / "surgery.json").write_text(json.dumps(prov))
    data = _text(tmp_path)
    cfg = tmp_path / "t.yaml"
    trainable = "new-params" if field == "widened" else "new-layers"
    cfg.write_text(f"model: {grown}\ndata: {{files: [{data}], seq_len: 16}}\nsteps: 1\ntrainable: {trainable}\n")
    out = _run("train", cfg, "-o", tmp_path / "run")
    assert "surgery.json" in out and said in out, out
    assert not (tmp_path / "run").exists()


# ---- numbers read from files are bounded; computations never print inf or nan ------------------------


def _fake_run(folder: Path, *, step=None, loss=None, micro_batch=2, data=None, world="1") -> Path:
    folder.mkdir(parents=True)
    summary = {
        "mixture": {"domains": [{"name": "a", "proportion": 0.5}, {"name": "b", "proportion": 0.5}]},
        "config": {"micro_batch": micro_batch, "grad_accum": 1, "data": data if data is not None else {"seq_len": 16}},
        "world_size": 1 if world == "1" else world,
    }
    recs = [
        {
            "step": s,
            "stage": 1,
            "tokens": s * 32,
            "flops": s * 100.0,
            "eval_loss": 2.0,
            "eval_loss_by_domain": {"a": 1 + 3 / s, "b": 1 + 2 / s},
        }
        for s in range(1, 9)
    ]
    if step is not None:
        recs[2]["step"] = step
    if loss is not None:
        recs[3]["eval_loss_by_domain"]["a"] = loss
    (folder / "train.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


@pytest.mark.parametrize(
    "kind,said",
    [
        ("huge-int", "'step' is"),
        ("string", "'step' is '5'"),
        ("huge-loss", "eval_loss_by_domain"),
        ("data-list", "config.data is not a mapping"),
    ],
)
def test_mix_fit_and_plot_refuse_hostile_run_folders(tmp_path, kind, said):
    kw = {"huge-int": {"step": int("9" * 400)}, "string": {"step": "5"}, "huge-loss": {"loss": 1e308}, "data-list": {"data": [1, 2]}}[kind]
    bad = _fake_run(tmp_path / "bad", **kw)
    good = _fake_run(tmp_path / "good")
    out = _run("mix", "fit", bad, good)
    assert said in out, out
    if kind != "data-list":
        out = _run("plot", bad, "-o", tmp_path / "f.png")
        assert said in out and not (tmp_path / "f.png").exists()


def test_plot_refuses_a_format_it_cannot_write_before_drawing(tmp_path):
    good = _fake_run(tmp_path / "good")
    out = _run("plot", good, "-o", tmp_path / "f.xyz")
    assert ".xyz" in out and ".png" in out and not (tmp_path / "f.xyz").exists()


def test_absurd_mixture_weights_are_refused_where_they_enter(models, tmp_path):
    data = _text(tmp_path)
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(
        f"model: {models('llama')}\ndata:\n  sources:\n    - {{name: a, files: [{data}], weight: 1e308}}\n"
        f"    - {{name: b, files: [{data}], weight: 1e308}}\n  seq_len: 16\nsteps: 2\n"
    )
    for cmd in (["train", cfg, "-o", tmp_path / "run"], ["mix", cfg]):
        out = _run(*cmd)
        assert "mix.yaml:4" in out and "less than or equal to" in out, out


@pytest.fixture
def nan_model(models, tmp_path) -> Path:
    from safetensors.torch import load_file, save_file

    m = _copy(models, tmp_path, "nan")
    f = next(m.glob("*.safetensors"))
    t = load_file(f)
    t["model.layers.1.mlp.up_proj.weight"][:] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    return m


@pytest.mark.slow
def test_non_finite_measurements_are_errors_not_results(nan_model, tmp_path):
    data = _text(tmp_path)
    out = _run("analyze", nan_model, "--data", data, "--samples", "2", "--seq-len", "16", "--suggest", "drop:1")
    assert "not finite" in out and "nan ->" not in out, out
    out = _run("eval", nan_model, "--data", data)
    assert "not finite" in out and "perplexity" not in out.split("error")[0], out


# ---- exit 2 means a bug: these are user errors -----------------------------------------------------


def test_a_tokenizer_that_needs_remote_code_is_refused_by_eval_and_train(models, tmp_path):
    m = _copy(models, tmp_path)
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tok.Tok", None]}
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    data = _text(tmp_path)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {m}\ndata: {{files: [{data}], seq_len: 16}}\nsteps: 1\n")
    for cmd in (["eval", m, "--data", data], ["train", cfg, "-o", tmp_path / "run"]):
        out = _run(*cmd)
        assert "tokenizer needs remote code" in out and "tokenizer_config.json" in out, out


@pytest.mark.parametrize("damage", ["truncated", "zeroed"])
def test_eval_on_a_damaged_shard_is_located(models, tmp_path, damage):
    m = _copy(models, tmp_path)
    shard = next(m.glob("*.safetensors"))
    size = shard.stat().st_size
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(size // 2)
    else:
        shard.write_bytes(b"\0" * size)
    out = _run("eval", m, "--data", _text(tmp_path))
    assert shard.name in out, out


def test_analyze_against_a_model_of_another_width_is_refused_before_any_work(models, tmp_path):
    from surgery.tiny import build_tiny

    wide = build_tiny("llama", tmp_path / "wide", hidden_size=64)
    out = _run("analyze", models("llama"), "--data", _text(tmp_path), "--against", wide, "--samples", "2", "--seq-len", "8")
    assert "hidden size is 64" in out and "32" in out, out


# ---- checks before spending -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,said",
    [
        ("mask_steps: 2", "adds neither"),
        ("trainable: new-layers", "adds no new layers"),
        ("trainable: new-params", "no `widen` step"),
    ],
)
def test_a_grow_config_that_cannot_work_is_refused_when_the_run_starts(models, tmp_path, line, said):
    data = _text(tmp_path)
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(
        f"model: {models('llama')}\ndata: {{files: [{data}], seq_len: 16}}\nmicro_batch: 2\nsteps: 6\n"
        f"grow:\n  at_tokens: 64\n  {line}\n  plan:\n    models: {{s: X}}\n    steps: [{{take: {{model: s}}}}, {{stack: {{times: 2}}}}]\n"
    )
    out = _run("train", cfg, "-o", tmp_path / "run")
    assert said in out and "grow.yaml:7" in out, out
    assert not (tmp_path / ".run.surgery-train").exists()  # nothing was trained


def test_mix_and_train_judge_a_short_domain_against_the_same_budget(models, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": "alpha beta gamma delta " * 40}) + "\n" for _ in range(30)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": "one two three four " * 40}) + "\n" for _ in range(3)))
    cfg = tmp_path / "mx.yaml"
    cfg.write_text(
        f"model: {models('llama')}\ndata:\n  sources:\n    - {{name: a, files: [{tmp_path / 'a.jsonl'}], weight: 1}}\n"
        f"    - {{name: b, files: [{tmp_path / 'b.jsonl'}], weight: 1}}\n  seq_len: 32\n  exhausted: stop\n  eval_fraction: 0\n"
        "micro_batch: 4\nsteps: 40\n"
    )
    said_mix = _run("mix", str(cfg))
    said_train = _run("train", str(cfg), "-o", str(tmp_path / "run"))
    assert "source 'b' holds" in said_mix and said_mix.splitlines()[0] == said_train.splitlines()[0]
    cfg.write_text(cfg.read_text().replace("steps: 40", "steps: 2"))
    assert "source 'b'" not in _run("mix", str(cfg), expect_exit=0)


# ---- verify answers for the small files --------------------------------------------------------------


def test_verify_checks_config_json(models, tmp_path):
    plan = write_plan(tmp_path, f"models: {{m: {models('llama')}}}\nsteps: [{{take: {{model: m}}}}]\n")
    out = tmp_path / "out"
    _run("apply", plan, "-o", out, "-q", expect_exit=0)
    good = (out / "config.json").read_text()
    (out / "config.json").write_text("garbage{")
    assert "config.json" in _run("verify", out)
    (out / "config.json").write_text(good.replace('"num_hidden_layers": 4', '"num_hidden_layers": 3'))
    assert "says 3 layers; surgery.json records 4" in _run("verify", out)


# ---- memory: long records are tokenized in pieces, from any reader ----------------------------------


def test_long_records_are_cut_into_bounded_pieces():
    from surgery.data.sources import PIECE_CHARS, split_document

    text = ("word " * 30 + "\n") * 20000 + "x" * (3 * PIECE_CHARS)  # lines, then one line longer than a piece
    pieces = list(split_document(text))
    assert "".join(p for p, _, _ in pieces) == text and len(pieces) > 4
    assert max(len(p) for p, _, _ in pieces) <= PIECE_CHARS
    assert [f for _, f, _ in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert all(p.endswith("\n") for p, _, _ in pieces[:3])  # cut at line ends where there are some
    assert list(split_document("short")) == [("short", True, True)]


@pytest.mark.slow
def test_suggested_plans_parse_whatever_the_model_folder_is_called(models, tmp_path):
    odd = tmp_path / "run #3: best"
    shutil.copytree(models("llama"), odd)
    out = tmp_path / "rep"
    _run("analyze", odd, "--data", _text(tmp_path), "--samples", "4", "--seq-len", "16", "--suggest", "drop:1", "-o", out, expect_exit=0)
    plan = out / "suggest-drop-1.yaml"
    text = _run("validate", plan, expect_exit=0)
    assert "run #3: best" in text


@pytest.mark.parametrize(
    "command,target,said",
    [
        (["eval", "m", "--data", "x"], "surgery.train.evaluate.evaluate", "nothing was completed; run the command again"),
        (["train", "cfg.yaml"], "surgery.train.train", "`surgery train --resume` continues"),
        (["apply", "plan.yaml"], "surgery.api.apply", "`surgery apply --resume` continues"),
    ],
)
def test_ctrl_c_says_what_is_left_for_that_command(monkeypatch, command, target, said):
    import importlib

    mod, name = target.rsplit(".", 1)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(mod), name, interrupted)
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 130 and said in r.output, r.output
    assert command[0] == "apply" or "apply --resume" not in r.output


def test_surgery_json_is_read_as_one_versioned_type(tmp_path, models):
    """read_provenance is the one reader of surgery.json: its format is checked (a newer one is a
    located error saying so), the record round-trips what was written, and verify, recompute and
    training report a damaged record through it, located."""
    import surgery
    from surgery.errors import SurgeryError
    from surgery.io.provenance import read_provenance
    from surgery.io.verify import verify_output as verify

    plan = write_plan(tmp_path, f"models: {{a: {models('llama')}}}\nsteps: [{{take: {{model: a}}}}, {{stack: {{times: 2}}}}]\n")
    out = surgery.apply(plan, tmp_path / "out", progress=False).path
    raw = json.loads((out / "surgery.json").read_text())
    prov = read_provenance(out)
    assert prov.format == "surgery/1" and prov.record() == raw and prov.shards == raw["output"]["shards"]
    assert verify(out) == []
    bad = tmp_path / "newer"
    shutil.copytree(out, bad)
    (bad / "surgery.json").write_text(json.dumps({**raw, "format": "surgery/9"}))
    with pytest.raises(SurgeryError) as e:
        read_provenance(bad)
    assert "surgery/9" in str(e.value) and "newer" in str(e.value) and str(bad / "surgery.json") in str(e.value)
    problems = verify(bad)
    assert problems and "surgery/9" in str(problems[0]) and str(bad / "surgery.json") in problems[0].where


def test_training_refuses_a_damaged_surgery_json_before_it_trains(tmp_path, models):
    """The model's surgery.json is read (as the type it is) when the run starts: a damaged one is a
    located error before any step, not a failure when the trained model is published."""
    import shutil

    from surgery.errors import SurgeryError
    from surgery.train import train
    from surgery.train.corpus import write_pydoc_corpus

    m = tmp_path / "m"
    shutil.copytree(models("llama"), m)
    (m / "surgery.json").write_text(json.dumps({"format": "surgery/9", "layer_map": []}))
    corpus = write_pydoc_corpus(tmp_path / "c.jsonl")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {m}\noutput: {tmp_path / 'out'}\ndata: {{files: [{corpus}], seq_len: 32}}\nsteps: 2\nmicro_batch: 2\n")
    with pytest.raises(SurgeryError) as e:
        train(cfg, progress=False, echo=lambda *a: None)
    assert "surgery/9" in str(e.value) and str(m / "surgery.json") in str(e.value)
    assert not (tmp_path / ".out.surgery-train").exists() and not (tmp_path / "out").exists()
