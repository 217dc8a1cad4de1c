"""`surgery selftest [--device D]`: does this machine's device path write the right bytes?

Builds two small synthetic Llama-shaped checkpoints, then applies one plan that uses every
recipe the engine evaluates (raw copies, casts, scales, linear, slerp, nuslerp, random init,
zero/identity blocks; with the mergekit plugin also a plugin kernel) on the CPU and on the device,
with the device path's default (synchronous) staging and with the pipelined staging, and compares:
copies and zeros bit for bit, computed tensors within 1 ulp of the output dtype. Prints a table;
exits non-zero on any mismatch. With `--bench` it also times both device paths.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

PLAN = """
models: {{a: {a}, b: {b}}}
steps:
  - merge: {{method: slerp, models: [a, b], t: [0, 1]}}
  - merge: {{method: linear, models: [a, b], weights: [0.2, 0.9], layers: [0, 2]}}
  - merge: {{method: nuslerp, models: [a, b], weights: [0.3, 0.7], layers: [2, 4]}}
  - expand: {{groups: 2, init: random, std: 0.05, seed: 3}}
  - expand: {{groups: 1, init: identity}}
  - scale: {{factor: 0.5, layers: [0, 1], filter: mlp}}
  - take: {{model: a, layers: [1, 3]}}
output: {{dtype: bfloat16, shard_size: 20MB}}
"""
PLUGIN_STEP = "  - merge: {method: ties, models: [a, b], base: a, parameters: {weight: 0.5, density: 1.0}, layers: [0, 2]}\n"


def selftest(device: str = "auto", *, work: str | Path | None = None, bench: bool = False, echo=print) -> bool:
    import torch

    from surgery.api import apply
    from surgery.engine import resolve_device
    from surgery.plan import plan_from_text
    from surgery.registry import current
    from surgery.synthetic import write_synthetic_llama

    dev = resolve_device(device)
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="surgery-selftest-"))
    try:
        shape = (256, 4, 704, 1024, 4, 2, False)  # hidden, layers, intermediate, vocab, heads, kv heads, tied
        a = write_synthetic_llama(root / "a", shape, dtype="float32", seed=0)
        b = write_synthetic_llama(root / "b", shape, dtype="float32", seed=1)
        text = PLAN.format(a=a, b=b)
        if "ties" in current().method_names():  # a plugin kernel too, when the mergekit plugin is installed
            text = text.replace("  - take:", PLUGIN_STEP + "  - take:", 1)
        plan = plan_from_text(text, root)
        runs = [("cpu", "cpu", "off")] + (
            [(f"{dev}", dev, "off"), (f"{dev} pipelined", dev, "on")] if dev != "cpu" else [("cpu pipelined (host buffers)", "cpu", "host")]
        )
        outs, times = {}, {}
        for label, d, pipe in runs:
            t0 = time.perf_counter()
            res = apply(
                plan, root / label.replace(" ", "-").replace("(", "").replace(")", ""), force=True, progress=False, device=d, pipeline=pipe
            )
            times[label] = time.perf_counter() - t0
            outs[label] = _tensors(res.path)
        ref = outs["cpu"]
        ok = True
        echo(f"surgery selftest on {dev} (torch {torch.__version__}): {len(ref)} tensors, every recipe type")
        for label, _, _ in runs[1:]:
            bad = [k for k in ref if not _close(ref[k], outs[label][k])]
            ok &= not bad
            echo(
                f"  {label:<32} {'ok' if not bad else 'MISMATCH in ' + ', '.join(bad[:3])}"
                + (f"   {times[label]:.2f} s (cpu {times['cpu']:.2f} s)" if bench else "")
            )
        return ok
    finally:
        if work is None:
            shutil.rmtree(root, ignore_errors=True)


def _tensors(folder: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _close(a, b) -> bool:
    """Bitwise equal, or within 1 ulp of the dtype (computed tensors on another device)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)):
        return True
    if not a.is_floating_point():
        return False
    big = torch.maximum(a.abs(), b.abs()).float()
    step = torch.nextafter(big.to(a.dtype), torch.tensor(float("inf"), dtype=a.dtype)).float() - big
    return bool(((a.float() - b.float()).abs() <= step + 1e-30).all())
