"""Data mixtures (issue 16): the mixed stream, entropy proxies, BiMix's law, per-domain metrics."""

from __future__ import annotations

import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from surgery.cli import main
from surgery.errors import SurgeryError
from surgery.train import train
from surgery.train.config import config_from_text
from surgery.data.mixing import BLOCK, ArrayStream, Mixture, proportions, token_statistics
from surgery.train.mixture import Law, fit_law, optimal_proportions
from surgery.train.mix import fit_runs

from .conftest import load_tensors

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two local domains: Python's documentation topics and standard-library sources."""
    from surgery.train.corpus import write_pydoc_corpus, write_stdlib_corpus

    root = tmp_path_factory.mktemp("domains")
    write_pydoc_corpus(root / "docs" / "train.jsonl", eval_path=root / "docs" / "eval.jsonl")
    write_stdlib_corpus(root / "code" / "train.jsonl", eval_path=root / "code" / "eval.jsonl", max_chars=200_000)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "surgery-cache"))


def mix_config(tmp: Path, domains: Path, model: Path, weights: str = "weight: 3", weights2: str = "weight: 1", extra: str = "", steps=8):
    p = tmp / "mix.yaml"
    p.write_text(
        f"model: {model}\noutput: {tmp / 'out'}\n"
        "data:\n  seq_len: 64\n  sources:\n"
        f"    - {{name: docs, files: [{domains}/docs/train.jsonl], eval_files: [{domains}/docs/eval.jsonl], {weights}}}\n"
        f"    - {{name: code, files: [{domains}/code/train.jsonl], eval_files: [{domains}/code/eval.jsonl], {weights2}}}\n"
        f"{extra}lr: 3e-3\nmicro_batch: 4\nsteps: {steps}\neval_every: 4\nsave_every: 4\n"
    )
    return p


def quiet(*a, **k):
    pass


# ---- the stream -------------------------------------------------------------------------------------


def test_the_stream_keeps_the_proportions_and_is_a_function_of_seed_and_position():
    sizes, p = [5000, 3000, 700], [0.6, 0.3, 0.1]
    parts = [list(range(n)) for n in sizes]
    N = 3 * BLOCK + 1234
    mix = Mixture(parts, ["a", "b", "c"], p, N, seed=7)
    seen = [mix.locate(j) for j in range(N)]
    counts = np.bincount([d for d, _ in seen], minlength=3)
    assert counts.tolist() == mix.draws() and counts.sum() == N
    # every whole block holds round(p * 4096) of each domain (largest remainders), so the stream keeps the proportions
    first = np.bincount([d for d, _ in seen[:BLOCK]], minlength=3)
    assert sum(first) == BLOCK and all(abs(c - q * BLOCK) < 1 for c, q in zip(first, p, strict=True))
    assert all(abs(c - q * N) <= 4 + 0.01 * N for c, q in zip(counts, p, strict=True))
    # within each pass over a domain no sequence repeats; the small domain (700) is passed over several times
    for d in range(3):
        idx = [i for dd, i in seen if dd == d]
        for k in range(0, len(idx), sizes[d]):
            chunk = idx[k : k + sizes[d]]
            assert len(set(chunk)) == len(chunk)
    assert counts[2] > sizes[2]
    # a pure function of (seed, position): a fresh object (as after a resume) answers the same, a new seed not
    again = Mixture(parts, ["a", "b", "c"], p, N, seed=7)
    probe = [0, 1, 4095, 4096, 9000, N - 1]
    assert [again.locate(j) for j in reversed(probe)] == [seen[j] for j in reversed(probe)]
    assert [Mixture(parts, ["a", "b", "c"], p, N, seed=8).locate(j) for j in range(64)] != seen[:64]
    assert mix[5] == parts[seen[5][0]][seen[5][1]]
    import pickle  # dataloader workers receive the dataset pickled

    assert pickle.loads(pickle.dumps(mix)).locate(9000) == seen[9000]
    with pytest.raises(IndexError):
        mix.locate(N)


def test_weights_rules():
    assert proportions("given", [3, 1], [10, 10]) == [0.75, 0.25]
    assert proportions("uniform", [None, None], [10, 30]) == [0.5, 0.5]
    assert proportions("tokens", [None, None], [10, 30]) == [0.25, 0.75]
    a = token_statistics(ArrayStream([1, 2, 1, 2, 1, 3], [0]))
    b = token_statistics(ArrayStream([5, 5, 5, 5, 5, 6], [0]))
    p = proportions("entropy", [None, None], [6, 6], [a, b])
    # a softmax of the conditional entropies (nats)
    ea, eb = math.exp(a.conditional_entropy), math.exp(b.conditional_entropy)
    assert p == pytest.approx([ea / (ea + eb), eb / (ea + eb)])
    assert proportions("marginal-entropy", [None, None], [6, 6], [a, b])[0] > 0.5


def test_entropies_match_a_hand_computation():
    # tokens 1 2 1 2 1 3 (one document): p(1) = 3/6, p(2) = 2/6, p(3) = 1/6
    s = token_statistics(ArrayStream([1, 2, 1, 2, 1, 3], [0]))
    h = lambda *ps: -sum(q * math.log(q) for q in ps)  # noqa: E731
    assert s.tokens == 6 and s.distinct == 3
    assert s.marginal_entropy == pytest.approx(h(3 / 6, 2 / 6, 1 / 6), abs=1e-12)
    # pairs (1,2) (2,1) (1,2) (2,1) (1,3): joint 2/5, 2/5, 1/5; first tokens 1: 3/5, 2: 2/5
    assert s.joint_entropy == pytest.approx(h(0.4, 0.4, 0.2), abs=1e-12)
    assert s.conditional_entropy == pytest.approx(h(0.4, 0.4, 0.2) - h(0.6, 0.4), abs=1e-12)
    # a document starting at position 3 removes the pair (1, 2) that crosses into it: (1,2) (2,1) (2,1) (1,3)
    t = token_statistics(ArrayStream([1, 2, 1, 2, 1, 3], [0, 3]))
    assert t.joint_entropy == pytest.approx(h(0.25, 0.5, 0.25), abs=1e-12)
    # bounded reading: at most max_tokens tokens are read, in evenly spaced windows
    big = ArrayStream(np.arange(100_000) % 7)
    assert token_statistics(big, max_tokens=1000, window=100).tokens == 1000


# ---- the law ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_fit_recovers_known_parameters_and_the_optimum_is_the_minimum():
    true = Law(alpha=0.08, B=4.0, beta=0.45, C=2.1)
    r = np.repeat([0.2, 0.4, 0.6, 0.8], 15)
    s = np.tile(np.linspace(50, 1000, 15), 4)
    got = fit_law(r, s, true(r, s))
    assert (got.alpha, got.B, got.beta, got.C) == pytest.approx((0.08, 4.0, 0.45, 2.1), rel=1e-4)
    noisy = fit_law(r, s, true(r, s) * (1 + 0.002 * np.random.default_rng(0).standard_normal(len(r))))
    assert noisy.alpha == pytest.approx(0.08, rel=0.1) and noisy.beta == pytest.approx(0.45, rel=0.1)
    laws = [Law(0.1, 3, 0.5, 2), Law(0.05, 3, 0.5, 2.5), Law(0.2, 2, 0.4, 1.5)]
    best = optimal_proportions(laws, 1000)
    total = lambda q: sum(law(x, 1000) for law, x in zip(laws, q, strict=True))  # noqa: E731
    assert sum(best) == pytest.approx(1) and all(x > 0 for x in best)
    grid = [(a, b, 1 - a - b) for a in np.linspace(0.01, 0.98, 98) for b in np.linspace(0.01, 0.98, 98) if 1 - a - b > 0.005]
    assert total(best) <= min(total(q) for q in grid) + 1e-9
    with pytest.raises(ValueError, match="same proportion"):
        fit_law([0.5] * 5, [1, 2, 3, 4, 5], [3, 2.9, 2.8, 2.7, 2.6])


def _fake_run(folder: Path, proportions: dict, laws: dict, steps=range(10, 201, 10)):
    """A finished run's train.json and metrics.jsonl whose held-out curves follow `laws` exactly."""
    folder.mkdir(parents=True)
    sources = [{"name": n, "files": [f"{n}.jsonl"], "eval_files": [], "weight": p} for n, p in proportions.items()]
    summary = {
        "config": {"micro_batch": 4, "grad_accum": 1, "data": {"seq_len": 64, "sources": sources}},
        "world_size": 1,
        "mixture": {"domains": [{"name": n, "proportion": p} for n, p in proportions.items()]},
    }
    (folder / "train.json").write_text(json.dumps(summary))
    recs = [{"step": s, "eval_loss_by_domain": {n: float(laws[n](proportions[n], s)) for n in proportions}} for s in steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.slow
def test_mix_fit_recovers_the_law_from_runs_and_prints_a_sources_block(tmp_path):
    laws = {"docs": Law(0.1, 5.0, 0.5, 2.0), "code": Law(0.3, 4.0, 0.6, 1.5)}
    runs = []
    for p in (0.25, 0.5, 0.75):
        runs.append(tmp_path / f"p{int(p * 100)}")
        _fake_run(runs[-1], {"docs": p, "code": 1 - p}, laws)
    doc = fit_runs(runs, steps=5000)  # the paper's evaluation: each run's final step held out
    for name, law in laws.items():
        got, d = doc["domains"][name]["law"], doc["domains"][name]
        assert (got["alpha"], got["beta"]) == pytest.approx((law.alpha, law.beta), rel=1e-3)
        assert d["held_out"]["points"] == 3 and d["fit"]["points"] == 3 * 19  # the final step of each run
        assert d["held_out"]["mean_relative_error"] < 1e-4 and d["fit"]["r2_log"] > 0.9999 and d["fit"]["r2"] > 0.9999
    assert doc["holdout"] == "final" and doc["min_share"] == 0.0
    quarter = fit_runs(runs, steps=5000, holdout=0.25)  # today's split, still there
    assert quarter["domains"]["docs"]["held_out"]["points"] == 3 * 5
    # a law that is wrong on a log scale shows in the paper's R^2: a noisy domain's log R^2 drops below 1
    noisy = {"docs": Law(0.1, 5.0, 0.5, 2.0), "code": Law(0.3, 4.0, 0.6, 1.5)}
    for p, run in zip((0.25, 0.5, 0.75), runs, strict=True):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for k, rec in enumerate(recs):
            rec["eval_loss_by_domain"]["code"] *= 1 + 0.05 * (-1) ** k
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    worse = fit_runs(runs, steps=5000)["domains"]
    assert worse["code"]["fit"]["r2_log"] < 0.99 < worse["docs"]["fit"]["r2_log"]
    for p, run in zip((0.25, 0.5, 0.75), runs, strict=True):
        shutil.rmtree(run)
        _fake_run(run, {"docs": p, "code": 1 - p}, noisy)
    want = optimal_proportions(list(laws.values()), 5000)
    assert list(doc["proportions"].values()) == pytest.approx(want, rel=1e-3)
    r = CliRunner().invoke(main, ["mix", "fit", *map(str, runs), "--steps", "5000"])
    assert r.exit_code == 0, r.output
    assert "data:\n  sources:" in r.output and '"name": "code"' in r.output and "R2 log" in r.output and "final step" in r.output
    bad_holdout = CliRunner().invoke(main, ["mix", "fit", *map(str, runs), "--holdout", "most"])
    assert bad_holdout.exit_code == 1 and "give `final` or a fraction" in bad_holdout.output
    one = CliRunner().invoke(main, ["mix", "fit", str(runs[0])])
    assert one.exit_code == 1 and "same proportions" in one.output
    bad = CliRunner().invoke(main, ["mix", "fit", str(tmp_path)])
    assert bad.exit_code == 1 and "not a finished" in bad.output and "Traceback" not in bad.output


# ---- training on a mixture --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_mixture_trains_with_per_domain_held_out_losses(tmp_path, domains, models):
    res = train(mix_config(tmp_path, domains, models("llama")), progress=False, echo=quiet)
    recs = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "eval_loss_by_domain" in r]
    assert [r["step"] for r in evals] == [4, 8, 8]  # every 4 steps, and the final record
    for r in evals:
        by = r["eval_loss_by_domain"]
        assert set(by) == {"docs", "code"} and r["eval_loss"] == pytest.approx(0.75 * by["docs"] + 0.25 * by["code"])
    summary = json.loads((res.path / "train.json").read_text())
    rows = {d["name"]: d for d in summary["mixture"]["domains"]}
    assert rows["docs"]["proportion"] == 0.75 and rows["docs"]["draws"] + rows["code"]["draws"] == 8 * 4
    assert res.eval_loss == pytest.approx(evals[-1]["eval_loss"]) and (res.path / "loss.png").exists()


@pytest.mark.slow
def test_a_mixture_resumes_bitwise(tmp_path, domains, models):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    m = models("llama")
    full = train(mix_config(a, domains, m, extra="  weights: entropy\n"), progress=False, echo=quiet)
    cfg_b = mix_config(b, domains, m, extra="  weights: entropy\n")
    stopped = train(cfg_b, progress=False, echo=quiet, stop_after=5)
    assert stopped.path is None
    again = train(cfg_b, progress=False, echo=quiet, resume=True)
    ta, tb = load_tensors(full.path), load_tensors(again.path)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the same sequences in the same order, after the restart too
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(full.path / "metrics.jsonl") == strip(again.path / "metrics.jsonl")


@pytest.mark.slow
def test_an_exhausted_domain_is_reported_or_refused(tmp_path, domains, models):
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "def f(x):\n    return x * 2\n" * 12}) + "\n")  # a few sequences of 64
    text = (
        f"model: {models('llama')}\noutput: {tmp_path / 'out'}\n"
        "data:\n  seq_len: 64\n  eval_fraction: 0\n  sources:\n"
        f"    - {{name: docs, files: [{domains}/docs/train.jsonl], weight: 1}}\n"
        f"    - {{name: code, files: [{small}], weight: 1}}\n"
        "micro_batch: 4\nsteps: 4\n"
    )
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(text)
    notes = []
    res = train(cfg, progress=False, echo=notes.append)
    assert res.path is not None
    assert any("source 'code' holds" in n and "passes over it" in n and "data.exhausted: repeat" in n for n in notes), notes
    cfg.write_text(text.replace("data:\n", "data:\n  exhausted: stop\n"))
    with pytest.raises(SurgeryError) as e:
        train(cfg, progress=False, echo=quiet, force=True)
    assert "source 'code' holds" in str(e.value) and "mix.yaml:9" in str(e.value) and "exhausted: repeat" in str(e.value)


@pytest.mark.parametrize(
    "data, message, line",
    [
        ("{sources: [{name: a, files: [x.txt], weight: 1}, {name: b, files: [y.txt]}]}", "source 'b' has no weight", 3),
        ("{sources: [{name: a, files: [x.txt], weight: 1}, {name: a, files: [y.txt], weight: 1}]}", "'a' is used twice", 3),
        ("{files: [z.txt], sources: [{name: a, files: [x.txt], weight: 1}]}", "exactly one", 3),
        ("{eval_files: [e.txt], sources: [{name: a, files: [x.txt], weight: 1}]}", "per domain", 3),
        ("{sources: [{name: a, files: [x.txt], weight: -1}]}", "greater than or equal to 0", 3),
        ("{sources: [{name: 'a b', files: [x.txt], weight: 1}]}", "pattern", 3),
        ("{weights: entropic, sources: [{name: a, files: [x.txt]}]}", "entropy", 3),
        ("{sources: [{name: a, files: [x.txt], weight: 0}]}", "sum to 0", 3),
    ],
)
def test_mixture_config_errors_are_located(tmp_path, data, message, line):
    with pytest.raises(SurgeryError) as e:
        config_from_text(f"model: m\nsteps: 2\ndata: {data}\n", tmp_path, source="t.yaml")
    assert message in str(e.value) and f"t.yaml:{line}" in str(e.value)


@pytest.mark.slow
def test_mix_show_and_eval_per_domain(tmp_path, domains, models):
    cfg = mix_config(tmp_path, domains, models("llama"), weights="weight: 1", weights2="weight: 1", extra="  weights: joint-entropy\n")
    r = CliRunner().invoke(main, ["mix", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "*joint-entropy" in r.output and "H(X'|X)" in r.output and "docs" in r.output
    doc = json.loads(CliRunner().invoke(main, ["mix", "show", str(cfg), "--format", "json"]).output)
    assert set(doc["proportions"]) >= {"given", "uniform", "tokens", "entropy", "joint-entropy", "marginal-entropy"}
    assert sum(doc["proportions"]["joint-entropy"].values()) == pytest.approx(1)
    r = CliRunner().invoke(main, ["eval", str(models("llama")), "--data", str(cfg), "--max-tokens", "300", "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out["domains"]) == {"docs", "code"} and out["weights"] == "given"
    assert out["loss"] == pytest.approx((out["domains"]["docs"]["loss"] + out["domains"]["code"]["loss"]) / 2)
    plain = CliRunner().invoke(main, ["mix", str(tmp_path / "nope.yaml")])
    assert plain.exit_code == 1 and "nope.yaml" in plain.output


@pytest.mark.parametrize(
    "train_json, metrics, message",
    [
        ("[1, 2]", "", "not trained on a mixture"),
        ("not json", "", "not valid JSON"),
        ('{"mixture": {"domains": [{"name": "a"}]}}', "", "mixture.domains"),
        ('{"mixture": {"domains": [{"name": "a", "proportion": 0.5}]}}', '{"step": "a"}\n', "'step' is 'a'"),
        ('{"mixture": {"domains": [{"name": "a", "proportion": 0.5}]}}', "[1]\n", "a JSON object"),
        ('{"mixture": {"domains": [{"name": "a", "proportion": 0.5}]}}', '{"step": 1, "eval_loss_by_domain": {"a": "x"}}\n', "mapping"),
        ('{"mixture": {"domains": [{"name": "a", "proportion": 0.5}]}}', '{"step": 1, "loss": true}\n', "not a number"),
    ],
)
def test_hostile_runs_are_located_errors(tmp_path, train_json, metrics, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text(train_json)
    (run / "metrics.jsonl").write_text(metrics)
    r = CliRunner().invoke(main, ["mix", "fit", str(run), str(run)])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output and "internal error" not in r.output, r.output
    r = CliRunner().invoke(main, ["plot", str(run), "-o", str(tmp_path / "x.png")])  # plot reads metrics.jsonl only
    assert r.exit_code == 1 and (message if metrics else "no losses recorded") in r.output and "internal error" not in r.output, r.output


def test_mixture_command_errors_are_located(tmp_path):
    """What the new commands refuse: each a located error, exit 1, no traceback."""
    plain = tmp_path / "plain.yaml"
    plain.write_text("model: m\ndata: {files: [a.txt]}\nsteps: 2\n")
    r = CliRunner().invoke(main, ["mix", str(plain)])
    assert r.exit_code == 1 and "has no `data.sources:`" in r.output and "plain.yaml:2" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["eval", "no-model", "--data", str(plain)])
    assert r.exit_code == 1 and "no `sources:` to evaluate" in r.output and "plain.yaml" in r.output and "Traceback" not in r.output
    runs = []
    for p in (0.25, 0.75):
        runs.append(tmp_path / f"p{int(p * 100)}")
        _fake_run(runs[-1], {"docs": p, "code": 1 - p}, {"docs": Law(0.1, 5.0, 0.5, 2.0), "code": Law(0.3, 4.0, 0.6, 1.5)})
    r = CliRunner().invoke(main, ["mix", "fit", *map(str, runs), "--min-share", "0.6"])
    assert r.exit_code == 1 and "--min-share 0.6 for 2 domains" in r.output and "use at most 0.500" in r.output
    with open(runs[0] / "metrics.jsonl", "a") as f:  # a run from before surgery recorded FLOPs
        f.write('{"step": 210, "tokens": 1000, "eval_loss": 3.0}\n')
    r = CliRunner().invoke(main, ["plot", str(runs[0]), "--x", "flops", "-o", str(tmp_path / "f.png")])
    assert r.exit_code == 1 and "p25/metrics.jsonl" in r.output and "records without 'flops'" in r.output and "tokens or steps" in r.output


def test_the_entropy_base_is_a_setting_and_bits_sharpen_the_softmax():
    from surgery.data.mixing import TokenStats, proportions

    def stats(h):
        return TokenStats(**{**{f: 0 for f in TokenStats.__dataclass_fields__}, "conditional_entropy": h})

    st = [stats(2.0), stats(3.0)]
    nats = proportions("entropy", [None, None], [1, 1], st)
    bits = proportions("entropy", [None, None], [1, 1], st, "2")
    assert nats[1] == pytest.approx(math.exp(3) / (math.exp(2) + math.exp(3)))
    assert bits[1] == pytest.approx(math.exp(3 / math.log(2)) / (math.exp(2 / math.log(2)) + math.exp(3 / math.log(2))))
    assert bits[1] > nats[1] > 0.5
