"""`surgery train`, `surgery advise`, `surgery eval`: tiny models, the pydoc corpus, CPU only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from surgery.api import apply
from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.plan import plan_from_text
from surgery.train import train
from surgery.train.advise import gstack_growth_tokens
from surgery.train.config import config_from_text
from surgery.train.corpus import write_pydoc_corpus

from .conftest import load_tensors, read_json

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_pydoc_corpus(root / "train.jsonl", eval_path=root / "eval.jsonl")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one token cache for the session: the first test tokenizes, the rest reuse it
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "surgery-cache"))


@pytest.fixture(scope="session")
def llama_pro(models, tmp_path_factory):
    """The tiny Llama grown 4 -> 6 layers by identity expansion (new layers 2 and 5)."""
    out = tmp_path_factory.mktemp("pro") / "pro"
    apply(
        plan_from_text(
            f"models: {{base: {models('llama')}}}\nsteps:\n - take: {{model: base}}\n"
            " - expand: {groups: 2, per_group: 1, init: identity}\n"
        ),
        out,
        progress=False,
    )
    return out


def config(tmp_path: Path, corpus: Path, model: Path, extra: str = "", steps: int = 12) -> Path:
    p = tmp_path / "train.yaml"
    p.write_text(
        f"model: {model}\noutput: {tmp_path / 'out'}\n"
        f"data: {{files: [{corpus / 'train.jsonl'}], eval_files: [{corpus / 'eval.jsonl'}], seq_len: 64}}\n"
        f"lr: 3e-3\nmicro_batch: 8\nsteps: {steps}\neval_every: 1000\n{extra}"
    )
    return p


def quiet(*a, **k):
    pass


def killed_and_resumed(tmp_path: Path, model: Path, extra: str, steps: int = 10, stop_after: int = 5):
    """One run uninterrupted and the same run stopped after `stop_after` steps and resumed: their
    final weights, for a bitwise comparison."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_pydoc_corpus(corpus / "train.jsonl", eval_path=corpus / "eval.jsonl")
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir(), cut_dir.mkdir()
    full = train(config(full_dir, corpus, model, extra, steps=steps), progress=False, echo=quiet)
    assert train(config(cut_dir, corpus, model, extra, steps=steps), progress=False, echo=quiet, stop_after=stop_after).path is None
    again = train(config(cut_dir, corpus, model, extra, steps=steps), progress=False, echo=quiet, resume=True)
    return load_tensors(full.path), load_tensors(again.path), corpus


def test_advise_warns_outside_the_fitted_range_and_gives_no_snippet_past_the_budget():
    r = CliRunner().invoke(main, ["advise", "--params", "1.6M", "--tokens", "3M"])
    assert r.exit_code == 0, r.output
    assert "outside the 410.00M-3.00B parameters" in r.output and "not below the budget" in r.output and "at_tokens:" not in r.output
    j = json.loads(CliRunner().invoke(main, ["advise", "-N", "3B", "-D", "2T", "--format", "json"]).output)
    assert j["warnings"] == [] and j["snippet"] is True
    # the paper fitted the formula on 410M, 1.1B and 3B: its own 7B row is an extrapolation, said so
    j = json.loads(CliRunner().invoke(main, ["advise", "-N", "7B", "-D", "2T", "--format", "json"]).output)
    assert j["snippet"] is True and "outside the 410.00M-3.00B parameters" in j["warnings"][0]


@pytest.mark.slow
def test_a_missing_matplotlib_is_said_once(tmp_path, corpus, models, monkeypatch):
    import importlib.util

    import surgery.train.plot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(surgery.train.plot, "loss_curve", lambda *a, **k: False)
    said = []
    res = train(config(tmp_path, corpus, models("llama"), steps=2), progress=False, echo=said.append)
    assert not (res.path / "loss.png").exists()
    assert [m for m in said if "loss.png" in m] == [
        "warning: loss.png was not drawn: matplotlib is not installed (pip install matplotlib, or 'surgery[train]')"
    ]


def test_advise_reproduces_the_published_table():
    assert round(gstack_growth_tokens(7e9, 2e12) / 1e9, 2) == 11.11  # Llama2-7B at 2T
    assert round(gstack_growth_tokens(8e9, 15e12) / 1e9, 2) == 6.58  # Llama3-8B at 15T
    r = CliRunner().invoke(main, ["advise", "-N", "7B", "-D", "2T", "--layers", "32"])
    assert r.exit_code == 0, r.output
    assert "d = 11.11B tokens" in r.output and "8 layers" in r.output and "stack: {times: 4}" in r.output
    j = json.loads(CliRunner().invoke(main, ["advise", "-N", "8B", "-D", "15T", "--format", "json"]).output)
    assert j["growth_factor"] == 4 and abs(j["growth_tokens"] - 6.58e9) < 0.01e9
    bad = CliRunner().invoke(main, ["advise", "-N", "seven", "-D", "2T"])
    assert bad.exit_code == 1 and "not a count" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_training_lowers_the_loss(tmp_path, corpus, models):
    res = train(config(tmp_path, corpus, models("llama"), steps=30, extra="warmup: 2\n"), progress=False, echo=quiet)
    recs = [json.loads(ln) for ln in (res.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses
    assert res.eval_loss < 4.3 and res.perplexity == pytest.approx(torch.tensor(res.eval_loss).exp().item(), rel=1e-6)
    assert all({"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs if "loss" in r)
    assert recs[-1]["final"] and recs[-1]["tokens"] == 30 * 8 * 64
    assert (res.path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = read_json(res.path / "train.json")
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 512
    assert not (res.path / "training_args.bin").exists()  # no pickles in outputs
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(res.path)
    assert m.config.num_hidden_layers == 4
    assert transformers.AutoTokenizer.from_pretrained(res.path)("ab")["input_ids"]
    # the output is a checkpoint surgery reads too
    r = CliRunner().invoke(main, ["inspect", str(res.path)])
    assert r.exit_code == 0 and "layers: 4" in r.output


@pytest.mark.slow
def test_new_layers_train_and_everything_else_is_bitwise_unchanged(tmp_path, corpus, llama_pro):
    res = train(config(tmp_path, corpus, llama_pro, "trainable: new-layers\n"), progress=False, echo=quiet)
    before, after = load_tensors(llama_pro), load_tensors(res.path)
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k].view(-1).view(torch.uint8), after[k].view(-1).view(torch.uint8))}
    new = {k for k in before if k.startswith(("model.layers.2.", "model.layers.5."))}
    assert changed == new  # the inserted blocks trained (all their tensors), nothing else moved a bit
    assert res.trainable_params == sum(before[k].numel() for k in new)


@pytest.mark.slow
def test_bfloat16_checkpoints_stay_bfloat16_and_frozen_tensors_bitwise(tmp_path, corpus, models):
    src = tmp_path / "pro16"
    apply(
        plan_from_text(
            f"models: {{base: {models('llama', dtype='bfloat16')}}}\nsteps:\n - take: {{model: base}}\n"
            " - expand: {groups: 2, init: identity}\n"
        ),
        src,
        progress=False,
    )
    res = train(config(tmp_path, corpus, src, "trainable: new-layers\n", steps=4), progress=False, echo=quiet)
    before, after = load_tensors(src), load_tensors(res.path)
    assert {t.dtype for t in after.values()} == {torch.bfloat16}  # trained in fp32, saved as the input was
    assert read_json(res.path / "config.json")["dtype"] == "bfloat16"
    changed = {k for k in before if not torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))}
    assert changed and all(k.startswith(("model.layers.2.", "model.layers.5.")) for k in changed)


@pytest.mark.slow
def test_frozen_parameters_get_no_optimizer_state(tmp_path, corpus, llama_pro):
    cfg = config(tmp_path, corpus, llama_pro, "trainable: new-layers\nsave_every: 3\n", steps=6)
    res = train(cfg, progress=False, echo=quiet, stop_after=3)
    assert res.path is None and not (tmp_path / "out").exists()  # stopped early: no output folder
    ck = tmp_path / ".out.surgery-train" / "stage-1" / "checkpoints" / "checkpoint-3"
    state = torch.load(ck / "optimizer.pt", weights_only=True)
    n_tensors = len([k for k in load_tensors(llama_pro) if k.startswith(("model.layers.2.", "model.layers.5."))])
    assert len(state["state"]) == n_tensors
    assert sum(len(g["params"]) for g in state["param_groups"]) == n_tensors


@pytest.mark.slow
def test_freeze_embeddings_with_tied_weights(tmp_path, corpus, models):
    src = models("gpt2")
    assert read_json(src / "config.json").get("tie_word_embeddings", True)
    res = train(config(tmp_path, corpus, src, "freeze_embeddings: true\n", steps=4), progress=False, echo=quiet)
    before, after = load_tensors(src), load_tensors(res.path)
    assert torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], after["transformer.h.0.mlp.c_fc.weight"])


@pytest.mark.slow
def test_resume_continues_the_same_run(tmp_path, corpus, models):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full = train(config(a, corpus, models("llama"), "save_every: 4\n"), progress=False, echo=quiet)
    stopped = train(config(b, corpus, models("llama"), "save_every: 4\n"), progress=False, echo=quiet, stop_after=5)
    assert stopped.path is None and stopped.steps == 5
    again = train(config(b, corpus, models("llama"), "save_every: 4\n"), progress=False, echo=quiet, resume=True)
    ta, tb = load_tensors(full.path), load_tensors(again.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # bitwise: optimizer, schedule, RNG and data order restored
    la = [json.loads(x) for x in (full.path / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (again.path / "metrics.jsonl").read_text().splitlines()]
    strip = (
        [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in la],
        [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lb],
    )
    assert strip[0] == strip[1]  # records after the last checkpoint of the interrupted run were dropped
    assert not (b / ".out.surgery-train").exists()


GROW = """\
grow:
  at_tokens: 4096
  schedule: {schedule}
  plan:
    models: {{small: TRAINED}}
    steps:
      - take: {{model: small}}
      - stack: {{times: 4}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["reset", "continue"])
def test_grow_then_train_in_one_command(tmp_path, corpus, models, schedule):
    cfg = config(tmp_path, corpus, models("llama"), GROW.format(schedule=schedule) + "warmup: 2\nlog_every: 1\n", steps=14)
    res = train(cfg, progress=False, echo=quiet)
    c = read_json(res.path / "config.json")
    assert c["num_hidden_layers"] == 16  # 4 layers stacked 4x
    recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
    grow = [r for r in recs if r.get("event") == "grow"]
    assert grow == [
        {"step": 8, "stage": 2, "tokens": 4096, "flops": grow[0]["flops"], "event": "grow", "layers": 16, "params": grow[0]["params"]}
    ]
    lr1 = [r["lr"] for r in recs if "lr" in r and r["stage"] == 1]
    lr2 = [r["lr"] for r in recs if "lr" in r and r["stage"] == 2]
    assert len(lr1) == 8 and len(lr2) == 6
    if schedule == "reset":  # warmup again: the first stage-2 step is at a fresh warmup's LR
        assert lr2[0] == pytest.approx(lr1[0]) and max(lr2) > lr1[-1]
    else:  # one schedule over both stages: stage 2 goes on decaying from where stage 1 stopped
        assert lr2[0] < lr1[-1] and all(x >= y for x, y in zip(lr2, lr2[1:], strict=False))
    summary = read_json(res.path / "train.json")
    assert [s["layers"] for s in summary["stages"]] == [4, 16]
    # the grown model's folder is gone with the run's work folder: train.json says what stays true
    grown = summary["stages"][1]
    assert grown["model"].startswith("grown from stage 1's model at step 8") and ".surgery-train" not in json.dumps(grown)
    assert grown["grown"]["num_layers"] == 16 and len(grown["grown"]["shards"][0]["crc32"]) == 8
    # FLOPs: each stage at its own size (6N + 12 L d T per token), cumulative in metrics.jsonl and train.json
    from surgery.train.flops import flops_per_token

    small, big = flops_per_token(models("llama"), 64)["flops_per_token"], flops_per_token(res.path, 64)["flops_per_token"]
    assert small == 6 * 40960 + 12 * 4 * 32 * 64 and big == 6 * (4 * (40960 - 4096) + 4096) + 12 * 16 * 32 * 64
    by_step = {r["step"]: r["flops"] for r in recs if "loss" in r}
    assert by_step[8] == 8 * 512 * small and by_step[14] == 8 * 512 * small + 6 * 512 * big == summary["flops"]
    r = CliRunner().invoke(main, ["plot", str(res.path), "--x", "flops", "-o", str(tmp_path / "runs.png")])
    assert r.exit_code == 0 and (tmp_path / "runs.png").stat().st_size > 1000, r.output
    again = CliRunner().invoke(main, ["plot", str(res.path), "-o", str(tmp_path / "runs.png")])
    assert again.exit_code == 1 and "already exists" in again.output
    over = CliRunner().invoke(main, ["plot", str(res.path), "-o", str(res.path / "metrics.jsonl"), "--force"])
    assert over.exit_code == 1 and "a run's metrics.jsonl this command reads" in over.output and "Traceback" not in over.output
    assert res.steps == 14 and res.tokens == 14 * 512
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(res.path).config.num_hidden_layers == 16


@pytest.mark.slow
def test_growth_continues_the_data_and_matches_a_scratch_run(tmp_path, corpus, models, monkeypatch):
    """Gstack trains the grown model on fresh data: stage 2 continues the run's one training order
    (it does not replay stage 1), and a run from scratch with the same seed reads the same sequences
    at the same steps. Held-out loss is measured right after growth, and evaluations follow the run's
    global step, so both runs evaluate at the same steps."""
    from surgery.data.packing import Ordered

    read: list = []
    real = Ordered.__getitem__
    monkeypatch.setattr(Ordered, "__getitem__", lambda self, j: read.append(self.position(j)) or real(self, j))
    a, b = tmp_path / "grown", tmp_path / "scratch"
    a.mkdir(), b.mkdir()

    def every4(cfg):
        cfg.write_text(cfg.read_text().replace("eval_every: 1000", "eval_every: 4"))
        return cfg

    extra = "warmup: 2\nlog_every: 1\n"
    grown = train(every4(config(a, corpus, models("llama"), GROW.format(schedule="reset") + extra, steps=14)), progress=False, echo=quiet)
    grown_read, read[:] = list(read), []
    scratch = train(every4(config(b, corpus, models("llama"), extra, steps=14)), progress=False, echo=quiet)
    assert grown_read == read and len(read) == 14 * 8  # the same sequences, in the same order
    assert grown_read[64:72] != grown_read[:8] and len(set(grown_read)) == len(grown_read)  # stage 2 reads new ones
    evals = lambda res: [r["step"] for r in map(json.loads, (res.path / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]  # noqa: E731
    # growth at step 8: evaluated right after it (before training), then at global multiples of 4, the
    # end (14), and the final record
    assert evals(grown) == [4, 8, 8, 12, 14, 14] and evals(scratch) == [4, 8, 12, 14, 14]


@pytest.mark.slow
def test_two_processes_with_gloo_through_torchrun_ddp_and_fsdp2(tmp_path, corpus, models):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outs = {}
    for mode in ("ddp", "fsdp"):
        d = tmp_path / mode
        d.mkdir()
        cfg = config(d, corpus, models("llama"), "fsdp: true\n" if mode == "fsdp" else "", steps=4)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "surgery",
                "train",
                str(cfg),
                "-q",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        s = read_json(d / "out" / "train.json")
        assert s["world_size"] == 2 and s["tokens"] == 4 * 8 * 64 * 2  # two ranks, each a micro batch per step
        assert r.stdout.count("wrote ") == 1  # one process writes, one checkpoint
        outs[mode] = load_tensors(d / "out")
    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "out").config.num_hidden_layers == 4
    base = load_tensors(models("llama"))
    assert set(outs["ddp"]) == set(outs["fsdp"]) == set(base)
    for k in base:  # sharded training computes the same update as replicated training
        assert not torch.equal(outs["ddp"][k], base[k]), k
        torch.testing.assert_close(outs["fsdp"][k], outs["ddp"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_eval_perplexity_and_logit_difference(tmp_path, corpus, models, llama_pro):
    from surgery.train.evaluate import evaluate

    r = evaluate(llama_pro, [str(corpus / "eval.jsonl")], against=models("llama"), seq_len=64, max_tokens=3000)
    assert r["max_abs_logit_diff"] == 0.0 and r["perplexity"] == r["against_perplexity"]
    assert 0 < r["scored_tokens"] < r["tokens"]  # document starts are not scored across boundaries
    other = evaluate(models("llama", seed=1), [str(corpus / "eval.jsonl")], against=models("llama"), seq_len=64, stride=64, max_tokens=640)
    assert other["max_abs_logit_diff"] > 0.1
    cli = CliRunner().invoke(
        main,
        [
            "eval",
            str(llama_pro),
            "--data",
            str(corpus / "eval.jsonl"),
            "--against",
            str(models("llama")),
            "--seq-len",
            "64",
            "--max-tokens",
            "1000",
        ],
    )
    assert cli.exit_code == 0, cli.output
    assert "max |difference| 0," in cli.output


def test_packing_masks_document_starts_and_reads_every_format(tmp_path, models):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers

    from surgery.data.packing import Packed, Stream
    from surgery.data.sources import expand_sources
    from surgery.data.tokens import tokenize, tokenizer_fingerprint

    (tmp_path / "a.txt").write_text("abc\n\nde\n\nfgh")
    (tmp_path / "b.jsonl").write_text('{"text": "xy"}\n\n{"text": "z"}\n')
    pq.write_table(pa.table({"body": ["pq1", "pq22"]}), tmp_path / "c.parquet")
    tok = transformers.AutoTokenizer.from_pretrained(models("llama"))
    fp = tokenizer_fingerprint(models("llama"))
    cache = tmp_path / "cache"
    srcs = expand_sources(["a.txt", "*.jsonl"], tmp_path, "text", lambda i: f"x:{i}")
    parts = [tokenize(s, tok, fp, cache, "\n\n") for s in srcs]
    parts += [tokenize(s, tok, fp, cache, None) for s in expand_sources(["c.parquet"], tmp_path, "body", lambda i: "y")]
    eos = tok.eos_token_id
    docs = ["abc", "de", "fgh", "xy", "z", "pq1", "pq22"]
    stream = Stream(parts)
    expect = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert stream.slice(0, len(stream)).tolist() == expect
    seq = Packed(stream, 8, 0, len(stream) // 8)
    starts = {sum(len(d) + 1 for d in docs[:i]) for i in range(len(docs))}
    for i in range(len(seq)):
        item = seq[i]
        assert item["input_ids"].tolist() == expect[8 * i : 8 * i + 8]
        masked = {8 * i + j for j in range(8) if item["labels"][j] == -100}
        assert masked == {s for s in starts if 8 * i < s < 8 * i + 8}  # position 0 is never a target anyway
    # the cache is reused, not rebuilt
    metas = sorted(cache.glob("*.json"))
    stamp = [m.stat().st_mtime_ns for m in metas]
    tokenize(srcs[0], tok, fp, cache, "\n\n")
    assert [m.stat().st_mtime_ns for m in metas] == stamp and len(metas) == 3
    # a long .txt document is read in pieces yet stays one document
    from surgery.data import sources as data

    (tmp_path / "long.txt").write_text("line\n" * 50)
    old = data.PIECE_CHARS
    data.PIECE_CHARS = 32
    try:
        pieces = list(data.read_pieces(expand_sources(["long.txt"], tmp_path, "text", str)[0], None))
    finally:
        data.PIECE_CHARS = old
    assert len(pieces) > 3 and "".join(p for p, _, _ in pieces) == "line\n" * 50
    assert [f for _, f, _ in pieces] == [True] + [False] * (len(pieces) - 1)
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]


@pytest.mark.slow
def test_hf_dataset_saved_to_disk(tmp_path, models, corpus):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello world"] * 200}).save_to_disk(str(tmp_path / "ds"))
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"model: {models('llama')}\ndata: {{files: [{{dataset: ./ds}}], seq_len: 32, eval_fraction: 0}}\nsteps: 2\n")
    res = train(cfg, out=tmp_path / "o", progress=False, echo=quiet)
    assert res.path.is_dir() and res.eval_loss is None


@pytest.mark.parametrize(
    "text,extra,expect",
    [
        ("model: {m}\ndata: {{files: [{c}]}}\n", "", "give exactly one budget"),
        ("model: {m}\ndata: {{files: [{c}]}}\nsteps: 2\nlearning_rate: 1\n", "", "unknown key 'learning_rate'"),
        (
            "model: {m}\ndata: {{files: [{c}]}}\nsteps: 2\ntrainable: everything\n",
            "",
            "is not one of all, new-layers, new-params, routers, experts or a parameter-name",
        ),
        ("model: {m}\ndata: {{files: [{c}]}}\ntokens: lots\n", "", "not a count"),
        ("model: {m}\ndata: {{files: [nothing/*.txt]}}\nsteps: 2\n", "", "no files match"),
        ("model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 2\ntrainable: new-layers\n", "", "has none"),
        ("model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 2\ntrainable: 'nope.*'\n", "", "match no parameter"),
        ("model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 2\ntrainable: routers\n", "", "routers, and this model has none"),
        ("model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 2\ntrainable: [all, routers]\n", "", "stand alone"),
        (
            "model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 4\n"
            "grow: {{at_tokens: 1M, plan: {{models: {{s: X}}, steps: [{{take: {{model: s}}}}]}}}}\n",
            "",
            "is not before the end of the run",
        ),
        (
            "model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 4\n"
            "grow: {{at_tokens: 512, plan: {{models: {{s: X}}, steps: [{{take: {{model: t}}}}]}}}}\n",
            "",
            "unknown model 't'",
        ),
        ("model: {m}\ndata: {{files: [{c}], text_field: body, seq_len: 64}}\nsteps: 2\n", "", "no field 'body'"),
        ("model: {m}\ndata: {{files: [{{dataset: no-org/not-cached}}], seq_len: 64}}\nsteps: 2\n", "", "from the local cache"),
        ("model: {m}\ndata: {{files: [{c}], seq_len: 100000}}\nsteps: 2\n", "", "exceeds the model's context (128"),
        ("model: {m}\ndata: {{files: [{t}], seq_len: 64}}\nsteps: 2\n", "", "not enough for one training sequence"),
        ("model: {m}\ndata: {{files: [missing.jsonl], seq_len: 64}}\nsteps: 2\n", "", "data file not found"),
        ("model: {m}\ndata: {{files: [data.csv], seq_len: 64}}\nsteps: 2\n", "", "unknown data format '.csv'"),
        ("model: {m}\ndata: {{files: [broken.jsonl], seq_len: 64}}\nsteps: 2\n", "", "broken.jsonl:2: the line is not valid JSON"),
        ("model: {m}\ndata: {{files: [p.parquet], seq_len: 64}}\nsteps: 2\n", "", "no column 'text' (columns: body)"),
        ("model: {m}\ndata: {{files: [{c}], eval_files: [{t}], seq_len: 64}}\nsteps: 2\n", "", "less than one sequence of 64"),
        (
            "model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 4\ngrow: {{at_tokens: 512, plan: nope.yaml}}\n",
            "",
            "grow plan not found",
        ),
        (
            "model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 4\ngrow: {{at_tokens: 512, plan: {{models: {{s: X, t: Y}}, "
            "steps: [{{take: {{model: s}}}}]}}}}\n",
            "",
            "names exactly one model",
        ),
        (
            "model: {m}\ndata: {{files: [{c}], seq_len: 64}}\nsteps: 2\ntrainable: 'model.embed_tokens.*'\nfreeze_embeddings: true\n",
            "",
            "every parameter is frozen",
        ),
    ],
)
def test_bad_configs_are_located_errors(tmp_path, corpus, models, text, extra, expect):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = tmp_path / "bad.yaml"
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    cfg.write_text(text.format(m=models("llama"), c=corpus / "train.jsonl", t=tmp_path / "short.txt"))
    r = CliRunner().invoke(main, ["train", str(cfg), "-o", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1, r.output
    assert expect in r.output and "Traceback" not in r.output, r.output
    assert "bad.yaml:" in r.output or "train.jsonl" in r.output
    assert not (tmp_path / "o").exists()


def test_output_and_layer_map_errors(tmp_path, corpus, models):
    src = models("llama")
    copy = tmp_path / "copy"  # a surgery output without new layers
    apply(plan_from_text(f"models: {{b: {src}}}\nsteps: [{{take: {{model: b}}}}]\n"), copy, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {copy}\ndata: {{files: [{corpus / 'train.jsonl'}], seq_len: 64}}\nsteps: 2\ntrainable: new-layers\n")
    for args, expect in (
        (["-o", str(tmp_path / "o")], "the plan added no new layers"),
        ([], "no output folder given"),
        (["-o", str(copy / "inside")], "is inside the model being trained"),
    ):
        r = CliRunner().invoke(main, ["train", str(cfg), "-q", *args])
        assert r.exit_code == 1 and expect in r.output and "Traceback" not in r.output, r.output
        assert "c.yaml" in r.output or str(copy) in r.output
    assert not (tmp_path / "o").exists() and not (copy / "inside").exists()


def test_eval_errors(tmp_path, corpus, models):
    from surgery.tiny import build_tiny

    other = build_tiny("llama", tmp_path / "v96", vocab_size=96)
    (tmp_path / "one.txt").write_text("  \n")  # no document at all
    ev = str(corpus / "eval.jsonl")
    for args, expect in (
        ([str(models("llama")), "--data", ev, "--against", str(other)], "vocabulary 96 differs from the model's 128"),
        ([str(models("llama")), "--data", ev, "--seq-len", "16", "--stride", "32"], "--stride 32 must be"),
        ([str(models("llama")), "--data", str(tmp_path / "one.txt")], "perplexity needs at least 2"),
        ([str(models("llama")), "--data", str(tmp_path / "none.txt")], "data file not found"),
    ):
        r = CliRunner().invoke(main, ["eval", *args])
        assert r.exit_code == 1 and expect in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_outputs_and_runs_are_never_clobbered(tmp_path, corpus, models):
    cfg = config(tmp_path, corpus, models("llama"), steps=2)
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["train", str(cfg), "-q"])
    assert r.exit_code == 1 and "already exists" in r.output and "--force" in r.output
    r = CliRunner().invoke(main, ["train", str(cfg), "-q", "--resume", "-o", str(tmp_path / "new")])
    assert r.exit_code == 1 and "nothing to resume" in r.output
    shutil.rmtree(tmp_path / "out")
    train(cfg, progress=False, echo=quiet, stop_after=1)
    r = CliRunner().invoke(main, ["train", str(cfg), "-q"])
    assert r.exit_code == 1 and "interrupted run" in r.output and "--resume" in r.output
    r = CliRunner().invoke(main, ["train", str(cfg), "-q", "--resume", "--micro-batch", "4"])
    assert r.exit_code == 1 and "different config" in r.output and "micro_batch: 8 -> 4" in r.output
    r = CliRunner().invoke(main, ["train", str(cfg), "-q", "--force", "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert read_json(tmp_path / "out" / "train.json")["steps"] == 1  # the flag overrode the file's budget


def test_config_overrides_and_counts(tmp_path):
    c = config_from_text("model: m\ndata: {files: [a.txt]}\ntokens: 2M\n", tmp_path, {"steps": 5, "seq_len": 16, "lr": 0.1})
    assert c.body.steps == 5 and c.body.tokens is None and c.body.data.seq_len == 16 and c.body.lr == 0.1
    assert config_from_text("model: m\ndata: {files: [a.txt]}\ntokens: 1.5B\n", tmp_path).body.tokens == 1_500_000_000
    with pytest.raises(SurgeryError) as e:
        config_from_text("model: m\ndata: {files: [a.txt]}\nsteps: 1\nwarmup: 2.5\n", tmp_path, source="x.yaml")
    assert "x.yaml:4" in str(e.value)


@pytest.mark.slow
def test_demo_grows_then_trains(demo_run):
    r, folder = demo_run
    assert r.exit_code == 0, r.output
    assert "function preserved" in r.output and "grew the model at step 24 (12,288 tokens): 16 layers" in r.output
    out = folder / "out-grow-trained"
    assert read_json(out / "config.json")["num_hidden_layers"] == 16 and (out / "loss.png").exists()
    assert read_json(out / "train.json")["perplexity"] < 40  # trained: the untrained tiny model is at ~130


def test_held_out_text_is_capped(tmp_path, corpus, models, capsys, monkeypatch):
    import transformers

    from surgery.train.data import build_corpus

    tok = transformers.AutoTokenizer.from_pretrained(models("llama"))

    def split(extra):
        cfg = config_from_text(f"model: m\ndata: {{files: [{corpus / 'train.jsonl'}], seq_len: 64{extra}}}\nsteps: 1\n", tmp_path)
        c = build_corpus(cfg, tok, models("llama"))
        return len(c.train.packed.stream) // 64, len(c.train), len(c.eval)

    total, n_train, n_eval = split("")
    assert n_eval == round(total * 0.02) and n_train == total - n_eval  # the default: 2% held out
    assert split(", eval_fraction: 0.2")[2] == round(total * 0.2)  # a tiny model's default cap on a CPU is 2M tokens
    assert split(", eval_fraction: 0.2, eval_max_tokens: 1K")[2] == 1000 // 64  # capped
    assert "held-out text for the training data: 960 of " in capsys.readouterr().err  # and said so
    # the default is the machine's and the model's: 2M tokens on a GPU; on a CPU ~2e12 forward FLOPs
    from surgery.train.config import Data, eval_token_cap

    import torch

    import surgery.train.config as tc

    if not torch.cuda.is_available():
        d = Data.model_validate({"files": ["x"]})
        assert eval_token_cap(d, models("llama")) == 2_000_000  # 46K parameters: the ceiling
        assert eval_token_cap(d, tmp_path / "no-model") == 65_536  # size unknown
        monkeypatch.setattr(tc, "_parameters", lambda _: 135_000_000)  # SmolLM2-135M: 2e12 / 2.7e8 -> the 16K floor
        assert eval_token_cap(d, "m") == 16_384
        monkeypatch.setattr(tc, "_parameters", lambda _: 20_000_000)
        assert eval_token_cap(d, "m") == 50_000


@pytest.mark.slow
def test_patterns_accumulation_and_linear_schedule(tmp_path, corpus, models):
    src = models("llama")
    res = train(
        config(
            tmp_path, corpus, src, "trainable: ['model.layers.0.*']\ngrad_accum: 2\nschedule: linear\nwarmup: 0\nlog_every: 1\n", steps=6
        ),
        progress=False,
        echo=quiet,
    )
    before, after = load_tensors(src), load_tensors(res.path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("model.layers.0.")}
    recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert [r["tokens"] for r in recs] == [s * 2 * 8 * 64 for s in range(1, 7)]  # two micro batches per step
    lrs = [r["lr"] for r in recs]
    steps = [lrs[i] - lrs[i + 1] for i in range(len(lrs) - 1)]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-3 / 6)  # the LR each step used: linear to 0
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx(3e-3 / 6)


@pytest.mark.slow
def test_hf_dataset_built_from_a_local_folder(tmp_path, models):
    (tmp_path / "jsondir").mkdir()
    (tmp_path / "jsondir" / "part.jsonl").write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(50)))
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        f"model: {models('llama')}\ndata: {{files: [{{dataset: ./jsondir, text_field: body}}], seq_len: 32, "
        "eval_fraction: 0.1}\nsteps: 2\n"
    )
    res = train(cfg, out=tmp_path / "o", progress=False, echo=quiet)
    assert res.eval_loss is not None and read_json(res.path / "train.json")["steps"] == 2


def test_packing_invariants_for_any_documents():
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from surgery.data.packing import Packed, Stream
    from surgery.data.sources import Source
    from surgery.data.tokens import Tokens

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=6), min_size=1, max_size=4), st.integers(2, 16))
    def check(files, L):
        parts, expect, starts, n = [], [], set(), 0
        for docs in files:  # one source per list, each document a run of tokens
            toks, ds = [], []
            for length in docs:
                ds.append(len(toks))
                starts.add(n + len(toks))
                toks += [len(starts) % 1000 + 3] * length
            parts.append(Tokens(np.asarray(toks, dtype=np.uint32), np.asarray(ds, dtype=np.int64), Source("txt", "x", "x")))
            expect += toks
            n += len(toks)
        stream = Stream(parts)
        assert len(stream) == n and stream.slice(0, n).tolist() == expect
        seq = Packed(stream, L, 0, n // L)
        for i in range(len(seq)):
            item = seq[i]
            lo = i * L
            assert item["input_ids"].tolist() == expect[lo : lo + L]
            masked = {lo + j for j in range(L) if item["labels"][j] == -100}
            assert masked == {s for s in starts if lo < s < lo + L}

    check()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "mixtral"])
def test_new_layers_training_in_every_family(tmp_path, corpus, models, family):
    """LLaMA Pro on each architecture: identity blocks inserted, then only they train."""
    src = tmp_path / "pro"
    res0 = apply(
        plan_from_text(f"models: {{base: {models(family)}}}\nsteps:\n - take: {{model: base}}\n - expand: {{groups: 2, init: identity}}\n"),
        src,
        progress=False,
    )
    assert res0.new_layers == [2, 5]
    res = train(config(tmp_path, corpus, src, "trainable: new-layers\n", steps=2), progress=False, echo=quiet)
    before, after = load_tensors(src), load_tensors(res.path)
    assert set(before) == set(after)
    from surgery.io.checkpoint import open_checkpoint

    prefix = open_checkpoint("m", "m", src).family.layer_prefix
    new = {k for k in before if k.startswith((f"{prefix}2.", f"{prefix}5."))}
    changed = {k for k in before if not torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8))}
    assert changed and changed <= new, sorted(changed - new)[:5]
    assert res.trainable_params == sum(before[k].numel() for k in new)


@pytest.mark.slow
def test_a_learned_growth_operator_lowers_its_own_loss_and_materialises(tmp_path, corpus, models):
    """G_learn (LiGO, depth): each grown layer's weights are learned combinations of the small
    model's layers, per parameter type; it starts at the plan's copies, trains with the small model
    frozen, and is written as a plain checkpoint that loads and keeps training."""
    import transformers

    from surgery.data.packing import Ordered, Packed, token_stream
    from surgery.data.tokens import default_cache_dir
    from surgery.data.sources import expand_sources
    from surgery.train.ligo import learn_growth

    small = models("llama")
    grown = tmp_path / "grown"
    apply(plan_from_text(f"models: {{s: {small}}}\nsteps: [{{take: {{model: s}}}}, {{stack: {{times: 2}}}}]\n"), grown, progress=False)
    before = load_tensors(grown)
    tok = transformers.AutoTokenizer.from_pretrained(small)
    srcs = expand_sources([str(corpus / "train.jsonl")], tmp_path, "text", lambda i: "data")
    stream = token_stream(srcs, tok, small, default_cache_dir(), None)
    order = Ordered(Packed(stream, 32, 0, len(stream) // 32), seed=0, start=0, length=6 * 4)
    loader = torch.utils.data.DataLoader(order, batch_size=4, collate_fn=transformers.default_data_collator)
    rec = learn_growth(small, grown, loader, steps=6, lr=0.05, where="test", echo=quiet)
    assert rec["loss_after"] < rec["loss_before"]  # on the batches it learned from
    after, small_w = load_tensors(grown), load_tensors(small)
    D = {t: torch.tensor(m) for t, m in rec["matrices"].items()}
    assert set(D) == {k.split(".", 3)[3] for k in small_w if k.startswith("model.layers.")}
    for name, w in after.items():
        if name.startswith("model.layers."):
            layer, t = int(name.split(".")[2]), name.split(".", 3)[3]
            want = sum(D[t][layer, j] * small_w[f"model.layers.{j}.{t}"] for j in range(4))
            assert torch.allclose(w, want, atol=1e-6), name
        else:
            assert torch.equal(w, before[name])  # embeddings, final norm and head are the small model's
    assert not all(torch.equal(after[k], before[k]) for k in after)  # learning moved the weights off the copies
    assert (D["self_attn.q_proj.weight"][:4] != 0).sum() > 4  # ... by mixing layers, not only scaling copies
    assert read_json(grown / "surgery.json")["growth_operator"]["steps"] == 6
    r = CliRunner().invoke(main, ["verify", str(grown)])
    assert r.exit_code == 0, r.output  # the rewritten shards' hashes were recorded
    assert transformers.AutoModelForCausalLM.from_pretrained(grown).config.num_hidden_layers == 8
    # a diverged operator (as a diverged run) is an error, and nothing is written
    written = load_tensors(grown)
    with pytest.raises(SurgeryError) as e:
        learn_growth(small, grown, loader, steps=6, lr=1e9, where="cfg.yaml:12", echo=quiet)
    assert "diverged" in str(e.value) and "cfg.yaml:12" in str(e.value) and "learn_lr" in str(e.value)
    assert all(torch.equal(v, load_tensors(grown)[k]) for k, v in written.items())


@pytest.mark.slow
def test_grow_with_a_learned_operator_in_one_command(tmp_path, corpus, models):
    extra = GROW.format(schedule="reset").replace("  schedule: reset\n", "  schedule: reset\n  operator: learn\n  learn_steps: 3\n")
    res = train(config(tmp_path, corpus, models("llama"), extra, steps=12), progress=False, echo=quiet)
    recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
    [learn] = [r for r in recs if r.get("event") == "learn-operator"]
    assert learn["step"] == 8 and learn["learn_steps"] == 3 and learn["learn_flops"] > 0
    summary = read_json(res.path / "train.json")
    op = summary["stages"][1]["grown"]["growth_operator"]
    assert op["operator"] == "learn" and op["loss_after"] == learn["loss_after"]
    # the operator's steps are counted in FLOPs (at the grown size) before the grown model's first step
    first2 = min((r for r in recs if "loss" in r and r["stage"] == 2), key=lambda r: r["step"])
    assert first2["flops"] > learn["learn_flops"] + 8 * 512 * summary["stages"][0]["flops_per_token"]
    with pytest.raises(SurgeryError) as e:
        config_from_text("model: m\ndata: {files: [a.txt]}\nsteps: 9\ngrow: {at_tokens: 10, plan: p.yaml, operator: learn}\n", tmp_path)
    assert "learn_steps" in str(e.value)


@pytest.mark.slow
def test_a_kill_while_learning_the_operator_resumes_to_the_same_result(tmp_path, corpus, models, monkeypatch):
    import surgery.train.ligo as ligo

    extra = GROW.format(schedule="reset").replace("  schedule: reset\n", "  schedule: reset\n  operator: learn\n  learn_steps: 3\n")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    full = train(config(a, corpus, models("llama"), extra, steps=10), progress=False, echo=quiet)
    real = ligo.learn_growth

    def killed(small, grown, *args, **kw):
        (grown / "model-00001-of-00001.safetensors").write_bytes(b"half-written")  # the kill leaves a torn copy
        raise KeyboardInterrupt

    monkeypatch.setattr(ligo, "learn_growth", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(b, corpus, models("llama"), extra, steps=10), progress=False, echo=quiet)
    work = b / ".out.surgery-train"
    assert (work / "grown.learning").exists() and not (work / "grown").exists()  # nothing looks grown
    monkeypatch.setattr(ligo, "learn_growth", real)
    again = train(config(b, corpus, models("llama"), extra, steps=10), progress=False, echo=quiet, resume=True)
    ta, tb = load_tensors(full.path), load_tensors(again.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    events = [json.loads(x).get("event") for x in (again.path / "metrics.jsonl").read_text().splitlines()]
    assert events.count("grow") == 1 and events.count("learn-operator") == 1


@pytest.mark.slow
def test_a_diverged_run_is_an_error_and_publishes_nothing(tmp_path, corpus, models):
    cfg = config(tmp_path, corpus, models("llama"), "log_every: 1\ngrad_clip: 0\n", steps=30)
    cfg.write_text(cfg.read_text().replace("lr: 3e-3", "lr: 1e6"))
    with pytest.raises(SurgeryError) as e:
        train(cfg, progress=False, echo=quiet)
    msg = str(e.value)
    assert "training diverged at step" in msg and "nothing was published" in msg and "train.yaml:" in msg and "lower lr" in msg
    assert not (tmp_path / "out").exists()
    recs = [json.loads(x) for x in (tmp_path / ".out.surgery-train" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if "loss" in r]) < 30  # stopped at the divergence, not trained to the end


@pytest.mark.slow
def test_report_to_tensorboard_writes_events_that_read_back(tmp_path, corpus, models, monkeypatch):
    """`--report-to tensorboard`: HF Trainer's own TensorBoard integration writes its events into
    OUT/logs (read back offline here, the same losses as metrics.jsonl); an unknown integration and
    one whose package is missing are located errors before any training."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, corpus, models("llama"), steps=6, extra="log_every: 2\n")
    r = CliRunner().invoke(main, ["train", str(cfg), "-q", "--report-to", "tensorboard"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert list((out / "logs" / "stage-1").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "logs" / "stage-1"))  # every event file of the folder
    acc.Reload()
    board = {e.step: e.value for e in acc.Scalars("train/loss")}
    logged = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    assert sorted(board) == sorted(logged) == [2, 4, 6]
    assert all(abs(board[s] - logged[s]) < 1e-4 for s in board)
    assert read_json(out / "train.json")["config"]["report_to"] == ["tensorboard"]
    from surgery.errors import PlanError

    with pytest.raises(PlanError) as e:
        config_from_text("model: m\ndata: {files: [a.txt]}\nsteps: 9\nreport_to: tensorbored\n", tmp_path)
    assert "tensorbored" in str(e.value) and "tensorboard" in str(e.value) and "<config>:4" in str(e.value)
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_mlflow_available", lambda: False)
    with pytest.raises(PlanError) as e:
        train(config(tmp_path, corpus, models("llama"), steps=6, extra="report_to: [mlflow]\n"), force=True, progress=False, echo=quiet)
    assert "pip install mlflow" in str(e.value) and "train.yaml:8" in str(e.value)
    assert not (tmp_path / ".out.surgery-train").exists()


def test_report_to_errors_through_the_cli_are_located_without_a_traceback(tmp_path):
    """An unknown tracking integration, in the config or as --report-to: exit 1, the config's file:line
    and the valid names, no traceback; nothing is written."""
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: m\ndata: {files: [a.txt]}\nsteps: 2\nreport_to: tensorbored\n")
    r = CliRunner().invoke(main, ["train", str(cfg), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and f"{cfg}:4" in r.output and "tensorboard, wandb" in r.output and "Traceback" not in r.output
    cfg.write_text("model: m\ndata: {files: [a.txt]}\nsteps: 2\n")
    r = CliRunner().invoke(main, ["train", str(cfg), "-o", str(tmp_path / "out"), "--report-to", "tensorbored"])
    assert r.exit_code == 1 and "report_to 'tensorbored'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
