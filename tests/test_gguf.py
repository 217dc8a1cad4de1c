"""GGUF files as sources: hostile files get located errors and nothing is written (offline: the
files are made here with the gguf package's own writer, then damaged byte by byte). The real
conversion of a pretrained model is tested in test_real.py."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")

from surgery.cli import main  # noqa: E402
from tests.conftest import write_plan  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones((4,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _patch(data: bytes, name: str, what: str, value: int) -> bytes:
    """Change one field of tensor `name`'s info record: dims count, first dim, type or offset."""
    p = data.index(name.encode()) + len(name)
    n = struct.unpack_from("<I", data, p)[0]
    b = bytearray(data)
    at = {"ndims": (p, "<I"), "dim0": (p + 4, "<Q"), "type": (p + 4 + 8 * n, "<I"), "offset": (p + 4 + 8 * n + 4, "<Q")}[what]
    struct.pack_into(at[1], b, at[0], value)
    return bytes(b)


CASES = {
    "not-gguf": (lambda g: b"PK\x03\x04" + g[4:], "not a GGUF file"),
    "empty": (lambda g: b"", "not a GGUF file"),
    "truncated-header": (lambda g: g[:40], "not a readable GGUF file"),
    "truncated-data": (lambda g: g[:300], "not a readable GGUF file"),
    "unknown-type": (lambda g: _patch(g, "token_embd.weight", "type", 999), "GGMLQuantizationType"),
    "absurd-dim": (lambda g: _patch(g, "token_embd.weight", "dim0", 1 << 50), "not a readable GGUF file"),
    "offset-out-of-range": (lambda g: _patch(g, "token_embd.weight", "offset", 1 << 40), "not a readable GGUF file"),
    "absurd-ndims": (lambda g: _patch(g, "token_embd.weight", "ndims", 1 << 30), "not a readable GGUF file"),
    "absurd-tensor-count": (lambda g: g[:8] + struct.pack("<Q", 1 << 60) + g[16:], "not a readable GGUF file"),
    "absurd-kv-count": (lambda g: g[:16] + struct.pack("<Q", 1 << 60) + g[24:], "not a readable GGUF file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_gguf_is_a_located_error_and_nothing_is_written(good, tmp_path, case):
    make, expect = CASES[case]
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(make(good))
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert str(bad) in r.output and expect in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # no output, no side folder, no lock
    # named in a plan: the same error, at the plan's line
    plan = write_plan(tmp_path, f"models: {{m: {bad}}}\nsteps: [{{take: {{model: m}}}}]\n")
    r = CliRunner().invoke(main, ["validate", str(plan)])
    assert r.exit_code == 1 and "plan.yaml:1" in r.output and expect in r.output and "Traceback" not in r.output, r.output


def test_a_file_that_is_not_a_model_transformers_maps_is_refused(good, tmp_path):
    """A well-formed GGUF file whose metadata transformers cannot map to a config: located, nothing written."""
    path = tmp_path / "t.gguf"
    path.write_bytes(good)
    r = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "Traceback" not in r.output and str(path) in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_convert_never_writes_over_the_gguf_file_it_reads(good, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(good)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text("{}")  # looks like an output
    r = CliRunner().invoke(main, ["convert", str(folder / "m.gguf"), "-o", str(folder), "--force"])
    assert r.exit_code == 1 and "the GGUF file this command reads" in r.output, r.output
    assert (folder / "m.gguf").read_bytes() == good
    r = CliRunner().invoke(main, ["convert", str(folder / "m.gguf"), "-o", ""])
    assert r.exit_code == 1 and "output path is empty" in r.output
    r = CliRunner().invoke(main, ["convert", str(folder / "m.gguf"), "-o", str(tmp_path / "x"), "--shard-size", "lots"])
    assert r.exit_code == 1 and "--shard-size" in r.output and "Traceback" not in r.output


def test_convert_help_teaches():
    r = CliRunner().invoke(main, ["convert", "--help"])
    assert r.exit_code == 0 and "surgery convert" in r.output and "--dtype" in r.output and "verify OUT --sources" in r.output
