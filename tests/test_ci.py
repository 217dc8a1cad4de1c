"""CI validation: header-only hub checks, report formats, --strict, globs, warnings, schema, hooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli import main

from .conftest import write_plan
from .hub_server import TOKEN, Hub

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory):
    """A 16 MB tiny Llama in 4 shards with an index (the shape of a real hub repo)."""
    from surgery.tiny import build_tiny

    root = tmp_path_factory.mktemp("sharded")
    src = build_tiny("llama", root / "src", hidden_size=256, intermediate_size=1024, vocab_size=1024)
    plan = write_plan(root, f"models: {{m: {src}}}\nsteps: [{{take: {{model: m}}}}]\noutput: {{shard_size: 5MB}}\n")
    out = surgery.apply(plan, root / "repo", progress=False).path
    for f in ("README.md", "surgery.json", "layer_map.svg"):
        (out / f).unlink()
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@pytest.fixture
def hub(tmp_path, sharded, monkeypatch):
    root = tmp_path / "hub"
    for org in ("test-org", "private-org"):
        shutil.copytree(sharded, root / org / "llama")
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "surgery-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    with Hub(root) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


PLAN = "models: {{m: {ref}}}\nsteps:\n  - take: {{model: m}}\n  - expand: {{groups: 2, init: identity}}\n"


def comparable(report: dict) -> dict:
    d = json.loads(json.dumps(report))
    d.pop("plan"), d.pop("passed", None)
    for s in d["sources"].values():
        s.pop("path"), s.pop("ref")
    for row in d["layer_map"]:
        row["where"] = row["where"].rpartition(":")[2]  # the plan files differ, not their lines
    return d


@pytest.mark.slow
def test_validate_fetches_headers_only_and_matches_the_local_report(hub, sharded, tmp_path):
    local = surgery.validate(write_plan(tmp_path / "l", PLAN.format(ref=sharded)))
    remote = surgery.validate(write_plan(tmp_path / "r", PLAN.format(ref="test-org/llama")))
    assert local.valid and remote.valid, remote.text()
    assert comparable(remote.as_dict()) == comparable(local.as_dict())
    weights = sum(f.stat().st_size for f in sharded.glob("*.safetensors"))
    fetched = sum(v for k, v in hub.served.items() if k.endswith(".safetensors"))
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in sharded.glob("*.safetensors"))
    assert fetched == headers and fetched < 0.002 * weights  # exactly the headers: no byte of tensor data
    assert set(hub.served) == {f"test-org/llama/{f.name}" for f in sharded.glob("*.safetensors")} | {
        "test-org/llama/config.json",
        "test-org/llama/model.safetensors.index.json",
    }  # and nothing else
    assert f"model m: test-org/llama @ {hub.sha('test-org', 'llama')[:12]} (hub, headers only)" in remote.text()
    # cached by revision: a second run asks the API which commit main is, and fetches no file again
    before = dict(hub.served)
    again = surgery.validate(write_plan(tmp_path / "r2", PLAN.format(ref="test-org/llama")))
    assert again.valid and hub.served == before
    # offline: from the cache, no request at all
    n = len(hub.requests)
    r = cli("validate", tmp_path / "r" / "plan.yaml", "--offline", "--format", "json")
    assert r.exit_code == 0, r.output
    assert comparable(json.loads(r.output)["plans"][0]) == comparable(local.as_dict()) and len(hub.requests) == n
    # a model never fetched is a clear error offline
    r = cli("validate", write_plan(tmp_path / "o", PLAN.format(ref="test-org/other")), "--offline")
    assert r.exit_code == 1 and "not in the local caches" in r.output and "plan.yaml:1" in r.output


@pytest.mark.slow
def test_revisions_are_cache_keys_never_paths(hub, tmp_path):
    plan = write_plan(tmp_path, "models: {m: {path: test-org/llama, revision: ../../../escape}}\nsteps: [{take: {model: m}}]\n")
    rep = surgery.validate(plan)
    assert rep.valid, rep.text()
    cache = Path(os.environ["SURGERY_CACHE"])
    assert not (cache.parent / "escape").exists() and not list(tmp_path.rglob("escape"))
    assert (cache / "hub-headers" / "test-org--llama" / "refs" / "..%2F..%2F..%2Fescape").is_file()


@pytest.mark.slow
def test_hub_errors_name_the_model_and_the_fix(hub, tmp_path):
    import struct

    root = hub.root / "test-org"
    (root / "noconfig").mkdir()
    shutil.copy(next((root / "llama").glob("*.safetensors")), root / "noconfig")
    (root / "pickles").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "pickles")
    (root / "pickles" / "pytorch_model.bin").write_bytes(b"x")
    (root / "huge").mkdir()
    shutil.copy(root / "llama" / "config.json", root / "huge")
    (root / "huge" / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    cases = (
        ("{path: test-org/llama, revision: no-such-branch}", "has no revision 'no-such-branch'"),
        ("test-org/absent", "not found (or private"),
        ("test-org/noconfig", "has no config.json"),
        ("test-org/pickles", "no safetensors weights (only pickles: pytorch_model.bin)"),
        ("test-org/huge", "header claims 1099511627776 bytes"),
    )
    for i, (ref, expect) in enumerate(cases):
        plan = write_plan(tmp_path / str(i), f"models:\n  m: {ref}\nsteps: [{{take: {{model: m}}}}]\n")
        r = cli("validate", plan)
        assert r.exit_code == 1 and expect in r.output and "plan.yaml:2" in r.output and "Traceback" not in r.output, r.output


def test_validate_names_missing_plans(tmp_path):
    (tmp_path / "folder").mkdir()
    r = cli("validate", tmp_path / "nope.yaml", tmp_path / "folder")
    assert r.exit_code == 1 and "nope.yaml: plan file not found" in r.output and "folder: is a folder" in r.output


@pytest.mark.slow
def test_private_repos_use_the_standard_token(hub, tmp_path, monkeypatch):
    plan = write_plan(tmp_path, PLAN.format(ref="private-org/llama"))
    r = cli("validate", plan)
    assert r.exit_code == 1 and "not found (or private" in r.output and "HF_TOKEN" in r.output
    monkeypatch.delenv("HF_HUB_DISABLE_IMPLICIT_TOKEN")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    r = cli("validate", plan)
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_corrupt_remote_header_is_reported_with_the_file(hub, tmp_path):
    shard = sorted((hub.root / "test-org" / "llama").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[8] = ord("!")  # break the header's JSON
    shard.write_bytes(bytes(data))
    r = cli("validate", write_plan(tmp_path, PLAN.format(ref="test-org/llama")))
    assert r.exit_code == 1 and shard.name in r.output and "not valid JSON" in r.output


# ---- formats, --strict, globs, warnings ----


def _normalise(text: str, tmp: Path) -> str:
    import surgery as s

    return text.replace(str(tmp), "<TMP>").replace(f'"surgery_version": "{s.__version__}"', '"surgery_version": "<V>"')


@pytest.fixture
def plans(tmp_path, models, monkeypatch):
    """A good plan, one with warnings, one with errors; the models are copied in so paths are stable."""
    monkeypatch.chdir(tmp_path)
    for n, src in (("a", models("llama")), ("b", models("llama", seed=1, dtype="bfloat16"))):
        shutil.copytree(src, tmp_path / "models" / n)
    cfg_b = json.loads((tmp_path / "models" / "b" / "config.json").read_text())
    cfg_b["rope_parameters"] = {**(cfg_b.get("rope_parameters") or {}), "rope_theta": 500000.0}
    (tmp_path / "models" / "b" / "config.json").write_text(json.dumps(cfg_b))
    d = tmp_path / "plans"
    write_plan(d, "models: {a: ../models/a}\nsteps:\n  - take: {model: a}\n  - expand: {groups: 2, init: identity}\n", "good.yaml")
    write_plan(
        d,
        "models: {a: ../models/a, b: ../models/b}\nsteps:\n  - merge:\n      method: slerp\n"
        "      models: [a, b]\n      t: [0, 0.2, 0.4, 0.6, 0.8, 1]\n  - dus: {trim: 1}\noutput: {dtype: float16}\n",
        "warns.yaml",
    )
    write_plan(d, "models: {a: ../models/a}\nsteps:\n  - take: {model: a, layers: [0, 9]}\n  - stack: {times: two}\n", "bad.yaml")
    return tmp_path


def test_warnings_are_located_and_coded(plans):
    rep = surgery.validate("plans/warns.yaml")
    assert rep.valid
    got = {(w.code, w.where) for w in rep.warnings}
    assert got == {
        ("rope-mismatch", "plans/warns.yaml:3"),
        ("gradient-too-long", "plans/warns.yaml:6"),
        ("duplicated-layers", "plans/warns.yaml:7"),
        ("narrowing-dtype", "plans/warns.yaml:8"),
    }
    assert surgery.validate("plans/good.yaml").warnings == []
    ignored = surgery.validate("plans/warns.yaml", ignore={"duplicated-layers", "rope-mismatch"})
    assert {w.code for w in ignored.warnings} == {"gradient-too-long", "narrowing-dtype"}


def test_golden_json_and_github_reports(plans):
    r = cli("validate", "plans/*.yaml", "--format", "json")
    assert r.exit_code == 1  # bad.yaml
    out = _normalise(r.output, plans)
    golden_json = GOLDEN / "validate.json"
    r2 = cli("validate", "plans/*.yaml", "--format", "github", "--strict")
    out_gh = _normalise(r2.output, plans)
    golden_gh = GOLDEN / "validate-github.txt"
    if os.environ.get("SURGERY_UPDATE_GOLDEN"):  # after a deliberate format change: rewrite, review, commit
        golden_json.parent.mkdir(exist_ok=True)
        golden_json.write_text(out)
        golden_gh.write_text(out_gh)
    assert out == golden_json.read_text()
    assert out_gh == golden_gh.read_text()
    assert r2.exit_code == 1
    doc = json.loads(r.output)
    assert doc["format"] == "surgery.validate/2" and [p["passed"] for p in doc["plans"]] == [False, True, True]
    import jsonschema
    from surgery.plan.schema import report_schema

    jsonschema.validate(doc, report_schema())


def test_strict_globs_and_one_exit_status(plans):
    assert cli("validate", "plans/good.yaml", "plans/warns.yaml").exit_code == 0
    r = cli("validate", "plans/good.yaml", "plans/warns.yaml", "--strict")
    assert r.exit_code == 1 and "--strict: 4 warning(s) count as errors" in r.output and "1 of 2 plan(s) passed" in r.output
    ign = ["--ignore", "duplicated-layers", "--ignore", "rope-mismatch", "--ignore", "gradient-too-long", "--ignore", "narrowing-dtype"]
    assert cli("validate", "plans/good.yaml", "plans/warns.yaml", "--strict", *ign).exit_code == 0
    r = cli("validate", "plans/*.yml")
    assert r.exit_code == 1 and "no files match" in r.output
    r = cli("validate", "plans/good.yaml", "--ignore", "typo")
    assert r.exit_code == 1 and "unknown warning code" in r.output and "duplicated-layers" in r.output


# ---- schema, pre-commit, CI workflow ----


@pytest.mark.slow
def test_schema_validates_every_example(tmp_path):
    import jsonschema
    import yaml

    r = cli("schema")
    assert r.exit_code == 0
    schema = json.loads(r.output)
    jsonschema.Draft202012Validator.check_schema(schema)
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 8
    for ex in examples:
        jsonschema.validate(yaml.safe_load(ex.read_text()), schema)
    # the schema catches what the plan checker catches
    for bad in (
        {"models": {"a": "x"}, "steps": [{"tak": {"model": "a"}}]},
        {"models": {"a": "x"}, "steps": [{"take": {"model": "a", "layer": [0, 1]}}]},
        {"models": {"a": "x"}, "steps": [{"expand": {"groups": 2, "init": "identical"}}]},
        {"models": {"a": "x"}, "steps": [], "output": {"dtype": "fp12"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    train_schema = json.loads(cli("schema", "--train").output)
    for ex in sorted((ROOT / "examples" / "train").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(ex.read_text()), train_schema)
    report = json.loads(cli("schema", "--report").output)
    jsonschema.Draft202012Validator.check_schema(report)
    assert "yaml-language-server: $schema=" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_pre_commit_hook_on_a_good_and_a_bad_plan(tmp_path, models):
    hooks = __import__("yaml").safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert {h["id"] for h in hooks} == {"surgery-validate", "surgery-validate-system"}
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
    shutil.copytree(models("llama"), repo / "models" / "a")
    (repo / "plans").mkdir()
    (repo / "plans" / "good.yaml").write_text("models: {a: ../models/a}\nsteps: [{take: {model: a}}]\n")
    (repo / "plans" / "bad.yaml").write_text("models: {a: ../models/a}\nsteps: [{take: {model: b}}]\n")
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pc-home")}
    # the hook repository as pre-commit fetches it: this project's committed .pre-commit-hooks.yaml
    hook_repo = tmp_path / "hooks"
    hook_repo.mkdir()
    shutil.copy(ROOT / ".pre-commit-hooks.yaml", hook_repo)
    subprocess.run(git + ["init", "-q"], cwd=hook_repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=hook_repo, check=True)
    subprocess.run(git + ["commit", "-qm", "hooks"], cwd=hook_repo, check=True)

    def run(*files):
        return subprocess.run(
            [sys.executable, "-m", "pre_commit", "try-repo", str(hook_repo), "surgery-validate-system", "--files", *files],
            cwd=repo,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    good = run("plans/good.yaml")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run("plans/good.yaml", "plans/bad.yaml")
    assert bad.returncode == 1 and "plans/bad.yaml:2" in bad.stdout and "unknown model 'b'" in bad.stdout


def test_ci_workflow_example_runs_validate(tmp_path):
    import yaml

    wf = yaml.safe_load((ROOT / "examples" / "ci" / "validate-plans.yml").read_text())
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = " ".join(s.get("run", "") for s in steps)
    assert "surgery validate" in runs and "--format github" in runs and "--strict" in runs


def test_show_draws_the_layer_map(plans):
    r = cli("show", "plans/good.yaml", "-o", "map.svg")
    assert r.exit_code == 0, r.output
    svg = Path("map.svg").read_text()
    __import__("xml.dom.minidom").dom.minidom.parseString(svg)  # well-formed
    assert svg.startswith("<svg") and "identity (outputs zeroed)" in svg and "copy" in svg and "output" in svg
    r = cli("show", "plans/warns.yaml", "-o", "map.png")
    assert r.exit_code == 0 and Path("map.png").read_bytes()[:4] == b"\x89PNG"
    assert cli("show", "plans/good.yaml", "-o", "map.svg").exit_code == 1  # no overwrite without --force
    r = cli("show", "plans/good.yaml", "-o", "map.jpg")
    assert r.exit_code == 1 and ".svg or .png" in r.output
    r = cli("show", "plans/bad.yaml")
    assert r.exit_code == 1 and "bad.yaml:" in r.output and "Traceback" not in r.output


def test_merging_models_with_different_tokenizers_warns(tmp_path, models):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(models("llama"), a)
    shutil.copytree(models("llama", seed=1), b)
    tok = json.loads((b / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    keys = list(vocab)
    vocab[keys[5]], vocab[keys[6]] = vocab[keys[6]], vocab[keys[5]]  # two tokens swap ids: same size, other tokenizer
    (b / "tokenizer.json").write_text(json.dumps(tok))
    plan = write_plan(tmp_path, f"models: {{a: {a}, b: {b}}}\nsteps:\n  - merge: {{method: linear, models: [a, b], weights: [0.5, 0.5]}}\n")
    rep = surgery.validate(plan)
    assert rep.valid and [(w.code, w.where.rpartition(":")[2]) for w in rep.warnings] == [("vocab-mismatch", "3")]
    assert "tokenizers differ" in rep.warnings[0].what
    shutil.copy(a / "tokenizer.json", b / "tokenizer.json")
    assert surgery.validate(plan).warnings == []


def test_missing_optional_dependencies_are_clear_errors(plans, monkeypatch):
    import importlib.util

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = cli("show", "plans/good.yaml", "-o", "map.png")
    assert r.exit_code == 1 and "needs matplotlib" in r.output and "pip install" in r.output and "Traceback" not in r.output
    assert cli("show", "plans/good.yaml", "-o", "map.svg").exit_code == 0  # SVG needs nothing
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    r = cli("train", "plans/good.yaml")
    assert r.exit_code == 1 and "pip install 'surgery[train]'" in r.output and "Traceback" not in r.output
