"""One rule for every command that writes: nothing a command reads is ever replaced or removed.

Each writer declares what it reads (`OutputFolder(..., reads=...)` has no default), and the
protocol refuses an output folder, side folder or one-file output that is or holds any of it,
with or without --force. These tests try the members of that class command by command: the
model analysed, the model compared against, a data file inside an old run, a held-out file, the
grow plan, the token cache, a run's work folder, a model's config.json under `export -o`."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from surgery.cli import main
from surgery.io.outdir import OutputFolder, check_file_target
from surgery.errors import OutputError
from tests.conftest import write_plan


def _run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output and r.exit_code != 2, r.output
    return r


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _text(folder: Path, name: str = "held.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 4)
    return p


def test_every_output_folder_declares_what_it_reads(tmp_path):
    """By construction: no output target is checked (so nothing is written) unless the command said
    what it reads; a lock alone needs no declaration."""
    with OutputFolder(tmp_path / "x") as f:  # the lock and recovery work as before
        with pytest.raises(TypeError, match="must declare what it reads"):
            f.check_target()
    with OutputFolder(tmp_path / "x", reads={}) as f:
        f.check_target()
    assert "reads" in inspect.signature(OutputFolder).parameters


@pytest.mark.parametrize("which", ["model", "against"])
def test_analyze_never_replaces_the_model_it_reads(models, tmp_path, which):
    model = tmp_path / "m"
    shutil.copytree(models("llama"), model)
    other = tmp_path / "b"
    shutil.copytree(models("llama", seed=1), other)
    data = _text(tmp_path / "data")
    before = {p: _tree(p) for p in (model, other)}
    target = model if which == "model" else other
    r = _run("analyze", model, "--data", data, "--against", other, "--samples", 2, "--seq-len", 16, "-o", target, "--force")
    assert r.exit_code == 1 and "this command reads" in r.output and str(target) in r.output, r.output
    assert {p: _tree(p) for p in (model, other)} == before


def test_analyze_refuses_a_report_folder_holding_its_data_before_any_work(models, tmp_path):
    data = _text(tmp_path / "old-report")
    (tmp_path / "old-report" / "analysis.json").write_text("{}")
    r = _run("analyze", models("llama"), "--data", str(tmp_path / "old-report" / "*.txt"), "-o", tmp_path / "old-report", "--force")
    assert r.exit_code == 1 and "a data file this command reads" in r.output, r.output
    assert data.is_file()
    r = _run("analyze", models("llama"), "--data", data, "-o", "")
    assert r.exit_code == 1 and "output path is empty" in r.output, r.output


@pytest.mark.slow
def test_analyze_writes_the_suggested_plan_into_its_report(models, tmp_path):
    data = _text(tmp_path / "data")
    r = _run("analyze", models("llama"), "--data", data, "--samples", 4, "--seq-len", 16, "--suggest", "drop:1", "-o", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    plan = (tmp_path / "rep" / "suggest-drop-1.yaml").read_text()
    assert "drop" in plan or "take" in plan
    again = _run("validate", tmp_path / "rep" / "suggest-drop-1.yaml")
    assert again.exit_code == 0, again.output


def _old_run(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text("{}")


@pytest.mark.parametrize("where", ["files", "eval_files", "sources", "cache_dir", "grow_plan", "work_folder", "glob"])
def test_train_never_deletes_what_the_run_reads(models, tmp_path, where):
    old = tmp_path / "old-run"
    _old_run(old)
    inside = old if where != "work_folder" else tmp_path / ".old-run.surgery-train"
    data = _text(tmp_path / "data", "train.txt")
    held = _text(tmp_path / "data", "eval.txt")
    moved = _text(inside, "mine.txt")
    files, evals = [str(data)], [str(held)]
    extra = ""
    if where in ("files", "work_folder"):
        files = [str(moved)]
    elif where == "eval_files":
        evals = [str(moved)]
    elif where == "glob":
        files = [str(inside / "*.txt")]
    elif where == "cache_dir":
        extra = f"  cache_dir: {inside / 'cache'}\n"
        (inside / "cache").mkdir()
    data_block = (
        f"data:\n  files: {json.dumps(files)}\n  eval_files: {json.dumps(evals)}\n  seq_len: 16\n{extra}"
        if where != "sources"
        else f"data:\n  sources:\n    - {{name: a, files: [{moved}], weight: 1}}\n  seq_len: 16\n"
    )
    grow = ""
    if where == "grow_plan":
        (inside / "grow.yaml").write_text("models: {m: x}\nsteps: [{take: {model: m}}]\n")
        grow = f"grow: {{at_tokens: 64, plan: {inside / 'grow.yaml'}}}\n"
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model: {models('llama')}\n{data_block}steps: 2\n{grow}")
    before = _tree(inside)
    r = _run("train", cfg, "-o", old, "--force")
    assert r.exit_code == 1 and "this command reads" in r.output, r.output
    assert _tree(inside) == before and (old / "train.json").is_file()


def test_train_refuses_the_config_folder_and_a_parent_of_the_data(models, tmp_path):
    data = _text(tmp_path / "runs" / "data", "train.txt")
    cfg = tmp_path / "runs" / "train.yaml"
    cfg.write_text(f"model: {models('llama')}\ndata: {{files: [{data}], seq_len: 16}}\nsteps: 2\n")
    (tmp_path / "runs" / "train.json").write_text("{}")  # looks like an old run
    r = _run("train", cfg, "-o", tmp_path / "runs", "--force")
    assert r.exit_code == 1 and "this command reads" in r.output, r.output
    assert data.is_file() and cfg.is_file()


def test_one_file_outputs_never_replace_what_the_command_reads(models, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(models("llama"), model)
    before = _tree(model)
    plan = write_plan(tmp_path, f"models: {{a: {model}}}\nsteps: [{{take: {{model: a, layers: [0, 2]}}}}]\n")
    r = _run("export", plan, "--mergekit", "-o", model / "config.json", "--force")
    assert r.exit_code == 1 and "source model 'a' this command reads" in r.output, r.output
    (model / "map.svg").write_text("old")
    r = _run("show", plan, "-o", model / "map.svg", "--force")
    assert r.exit_code == 1 and "this command reads" in r.output, r.output
    r = _run("apply", plan, "-o", tmp_path / "out", "--stats-json", plan, "-q")
    assert r.exit_code == 1 and "the plan this command reads" in r.output, r.output
    (model / "map.svg").unlink()
    assert _tree(model) == before and "take" in plan.read_text()
    # a new file inside a folder the command reads is fine; an existing one is not replaced
    check_file_target(model / "new.svg", True, {"model": model})
    with pytest.raises(OutputError, match="this command reads"):
        check_file_target(model / "config.json", True, {"model": model})


def test_a_link_to_a_read_file_is_guarded_where_it_points(tmp_path):
    real = _text(tmp_path / "elsewhere")
    run = tmp_path / "run"
    _old_run(run)
    (run / "link.txt").symlink_to(real)
    with OutputFolder(run, force=True, reads={"a data file": [run / "link.txt"]}) as f:
        with pytest.raises(OutputError, match="a data file this command reads"):
            f.check_target()
    with OutputFolder(tmp_path / "elsewhere", force=True, reads={"a data file": [run / "link.txt"]}) as f:
        with pytest.raises(OutputError, match="a data file this command reads"):
            f.check_target()
