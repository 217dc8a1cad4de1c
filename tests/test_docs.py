"""The README and examples tell the truth: the documented commands, plans and operations exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import surgery
from surgery.cli import main
from surgery.plan import step_types

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = re.findall(r"```bash\n(.*?)```", README.split("## Quickstart")[1].split("\n## ")[0], re.S)
    setup = [b.strip() for b in blocks if b.strip().startswith("pip install")]
    assert len(setup) == 2
    assert "surgery demo" in setup[0]
    assert setup[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_plans(example):
    plan = surgery.load_plan(example)
    assert plan.steps


def test_every_operation_is_documented_with_an_example():
    for op in step_types():
        assert f"### `{op}`" in README, op
        assert re.search(rf"^- {op}:", README, re.M), f"no example of {op}"


def test_every_documented_command_exists():
    for cmd in re.findall(r"^\| `surgery (\w+)", README, re.M):
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0, cmd


def test_readme_plan_snippets_parse():
    """Each yaml block in the plan reference loads (as a plan, or as steps inside a minimal plan)."""
    ref = README.split("## Plan language")[1].split("\n## Commands")[0]
    for block in re.findall(r"```yaml\n(.*?)```", ref, re.S):
        text = (
            block
            if block.lstrip().startswith(("name:", "models:"))
            else "models: {a: x, b: y, base: z, other: w}\nsteps:\n" + "".join("  " + line + "\n" for line in block.splitlines())
        )
        surgery.plan.plan_from_text(text)


@pytest.mark.parametrize("example", sorted((ROOT / "examples" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_training_examples_are_valid_configs(example):
    from surgery.train.config import load_config

    cfg = load_config(example)
    assert cfg.body.tokens or cfg.body.steps
    if cfg.body.grow is not None and isinstance(cfg.body.grow.plan, dict):
        from surgery.plan import plan_from_text
        import yaml

        assert plan_from_text(yaml.safe_dump(cfg.body.grow.plan)).steps


def test_readme_training_config_is_a_valid_config(tmp_path):
    from surgery.train.config import config_from_text

    section = README.split("## Training")[1].split("\n## ")[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    full = config_from_text(blocks[0], tmp_path, source="README")  # the annotated example: every key is real
    assert full.body.trainable == "new-layers" and full.body.tokens == 5 * 10**9 and full.body.grad_accum == 4
    grow = config_from_text(blocks[1] + "data: {files: [x.txt]}\n", tmp_path, source="README")
    assert grow.body.grow.at_tokens == 10 * 10**9 and grow.body.grow.schedule == "reset"
