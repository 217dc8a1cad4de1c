"""Shared fixtures: tiny real models per family, built once per session with transformers' own classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgery.tiny import SPECS, build_tiny

FAMILIES = list(SPECS)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(family, seed=0, dtype="float32", noise=0.0) -> path of a tiny checkpoint, built once."""
    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    def get(family: str, seed: int = 0, dtype: str = "float32", noise: float = 0.0) -> Path:
        key = (family, seed, dtype, noise)
        if key not in cache:
            cache[key] = build_tiny(family, root / f"{family}-{seed}-{dtype}-{noise}", seed=seed, dtype=dtype, noise=noise)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`surgery demo` run once (the main job, with its grow-then-train model): (CLI result, folder)."""
    from click.testing import CliRunner

    from surgery.cli import main

    folder = tmp_path_factory.mktemp("demo-run") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SURGERY_CACHE", str(tmp_path_factory.getbasetemp() / "surgery-cache"))
        result = CliRunner().invoke(main, ["demo", "--dir", str(folder)])
    return result, folder


def write_plan(folder: Path, text: str, name: str = "plan.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (tiny models only)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def kill_once_a_shard_is_written(cmd: list, staging: Path, env: dict) -> None:
    """Start `cmd` (a `surgery apply`) and SIGKILL it as soon as its staging folder holds a finished
    shard (or after 60 s, or when it ends first)."""
    import signal
    import subprocess
    import time

    p = subprocess.Popen(cmd, env=env)
    deadline = time.perf_counter() + 60
    while not list(staging.glob("model-*.safetensors")) and p.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
