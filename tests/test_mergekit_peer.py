"""mergekit's own test configurations, rebuilt here: every one runs in surgery and agrees with
mergekit-yaml.

mergekit's tests (tests/test_basic_merges.py) give every model `parameters: {weight: 0.6}` /
`{weight: 0.4}` whatever the method, and the hand-written form of ties/task_arithmetic lists the
base among the models without parameters. mergekit ignores parameters a method does not declare
and asks non-base parameters only of non-base models; so must surgery (with located
`unused-parameter` warnings that `--strict` can turn into failures)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import surgery
from surgery.cli import main

from .conftest import load_tensors, write_plan
from .test_mergekit_compat import MERGEKIT, within_ulps
from .test_mergekit_methods import FLOAT32_KERNELS, MK_RUNNER

pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is in the test extra; install it")

# name -> (method, first model, second model, base (a letter or None), shared parameters), as in
# mergekit's test_basic_merges.two_model_config: a, b, c are its model_a, model_b, model_c
PEER = {
    "linear": ("linear", "a", "b", None, None),
    "slerp": ("slerp", "a", "b", "a", {"t": 0.35}),
    "task_arithmetic": ("task_arithmetic", "a", "b", "c", None),
    "breadcrumbs": ("breadcrumbs", "a", "b", "c", None),
    "ties": ("ties", "a", "b", "c", {"density": 0.3}),
    "sce": ("sce", "a", "b", "c", {"select_topk": 0.5}),
    "ram": ("ram", "a", "b", "c", None),
    "ramplus_tl": ("ramplus_tl", "a", "b", "c", {"r": 0.05, "alpha": 1.0}),
    "multislerp": ("multislerp", "a", "b", "c", None),
    "model_stock": ("model_stock", "b", "c", "a", None),
    "model_stock_filterwise": ("model_stock", "b", "c", "a", {"filter_wise": True}),
    "arcee_fusion": ("arcee_fusion", "a", "b", "a", None),
    "nearswap": ("nearswap", "a", "b", "a", {"t": 0.0001}),
    "karcher": ("karcher", "a", "b", "c", {"max_iter": 5, "tol": 1e-5}),
    "della_dense": ("della", "a", "b", "c", {"density": 1.0, "epsilon": 0.0, "lambda": 0.5}),
}

# the hand-written form: the base listed among the models, without parameters
HAND = {
    f"hand-{m}": f"""models:
  - model: {{c}}
  - model: {{a}}
    parameters: {{{{density: 1.0, weight: 0.5}}}}
  - model: {{b}}
    parameters: {{{{density: 1.0, weight: 0.5}}}}
merge_method: {m}
base_model: {{c}}
dtype: bfloat16
"""
    for m in ("ties", "task_arithmetic", "dare_ties")
}


def peer_config(name: str, paths: dict) -> str:
    method, m1, m2, base, params = PEER[name]
    lines = ["merge_method: " + method]
    if base:
        lines.append(f"base_model: {paths[base]}")
    lines += [
        "models:",
        f"  - model: {paths[m1]}",
        "    parameters: {weight: 0.6}",
        f"  - model: {paths[m2]}",
        "    parameters: {weight: 0.4}",
        "dtype: bfloat16",
    ]
    if params:
        lines.append(f"parameters: {params}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def peer_outputs(models, tmp_path_factory):
    """Like mergekit's picollama fixtures: three tiny Llama-shaped models (Mistral: no biases)."""
    paths = {"a": models("mistral", seed=0), "b": models("mistral", seed=0, noise=0.02), "c": models("mistral", seed=0, noise=0.04)}
    root = tmp_path_factory.mktemp("mk-peer")
    args = []
    for name in PEER:
        cfg = write_plan(root / name, peer_config(name, paths), "config.yml")
        args += [str(cfg), str(root / name / "mergekit")]
    for name, text in HAND.items():
        cfg = write_plan(root / name, text.format(**paths), "config.yml")
        args += [str(cfg), str(root / name / "mergekit")]
    p = subprocess.run([sys.executable, "-c", MK_RUNNER, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PEER) + list(HAND))
def test_peer_config_matches_mergekit(name, peer_outputs):
    folder = peer_outputs / name
    res = surgery.apply(folder / "config.yml", folder / "surgery", progress=False)
    ours, theirs = load_tensors(res.path), load_tensors(folder / "mergekit")
    assert sorted(ours) == sorted(theirs)
    method = PEER[name][0] if name in PEER else name.removeprefix("hand-")
    for k in theirs:
        t = theirs[k]
        if method in FLOAT32_KERNELS and t.dtype == torch.float32:
            t = t.to(torch.bfloat16)  # see test_mergekit_methods: mergekit ignores dtype for this kernel
        assert ours[k].dtype == torch.bfloat16 and within_ulps(ours[k], t), f"{name} {k}"


@pytest.mark.slow
def test_unused_parameters_are_located_warnings_that_strict_refuses(peer_outputs):
    cfg = peer_outputs / "slerp" / "config.yml"
    rep = surgery.validate(cfg)
    unused = [w for w in rep.warnings if w.code == "unused-parameter"]
    assert rep.valid and len(unused) == 2
    assert all("config.yml:" in w.where and "'weight'" in w.what for w in unused)
    assert {w.where.rpartition(":")[2] for w in unused} == {"5", "7"}  # each model's own parameters line
    r = CliRunner().invoke(main, ["validate", str(cfg), "--strict"])
    assert r.exit_code == 1 and "unused-parameter" in r.output
    ok = ["validate", str(cfg), "--strict", "--ignore", "unused-parameter", "--ignore", "narrowing-dtype"]
    assert CliRunner().invoke(main, ok).exit_code == 0


def test_native_plans_stay_strict_about_parameters(models, tmp_path):
    a = models("mistral")
    plan = write_plan(
        tmp_path,
        f"models: {{a: {a}, b: {a}}}\n"
        "steps: [{merge: {method: slerp, models: [a, {model: b, parameters: {weight: 0.4}}], t: 0.5}}]\n",
    )
    rep = surgery.validate(plan)
    assert not rep.valid and "slerp has no parameter 'weight'" in str(rep.problems[0])


def test_missing_non_base_parameter_names_the_models_in_mergekit_terms(models, tmp_path):
    a, b = models("mistral"), models("mistral", noise=0.02)
    cfg = write_plan(tmp_path, f"models:\n  - model: {a}\n  - model: {b}\nmerge_method: task_arithmetic\nbase_model: {a}\n", "config.yml")
    rep = surgery.validate(cfg)
    assert not rep.valid
    msg = str(rep.problems[0])
    assert "for every model but the base" in msg and "parameters: {weight: ...}" in msg and b.name in msg


@pytest.mark.parametrize(
    "bad, where",
    [
        ("parameters: 3", "parameters"),
        ("sources: 1", "sources"),
    ],
)
def test_wrong_types_in_a_mergekit_config_are_located(models, tmp_path, bad, where):
    a = models("mistral")
    if where == "parameters":
        text = f"models:\n  - model: {a}\n    {bad}\n  - model: {a}\nmerge_method: linear\n"
    else:
        text = f"slices:\n  - {bad}\nmerge_method: passthrough\n"
    cfg = write_plan(tmp_path, text, "config.yml")
    for cmd in (["validate", str(cfg)], ["apply", str(cfg), "-o", str(tmp_path / "out")]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1 and "config.yml:" in r.output and "Traceback" not in r.output, r.output
        assert isinstance(r.exception, SystemExit)


def test_a_kernel_that_refuses_its_parameters_is_a_located_error(models, tmp_path):
    """mergekit's test_della_invalid_epsilon: epsilon 1.35 makes della raise; no traceback."""
    a, b, c = models("mistral"), models("mistral", noise=0.02), models("mistral", noise=0.04)
    cfg = write_plan(
        tmp_path,
        f"models:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n  - model: {b}\n"
        f"    parameters: {{weight: 0.4}}\nmerge_method: della\nbase_model: {c}\n"
        "parameters: {density: 0.66, epsilon: 1.35, lambda: 0.5}\ndtype: bfloat16\n",
        "config.yml",
    )
    r = CliRunner().invoke(main, ["apply", str(cfg), "-o", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1 and "merge method della failed" in r.output and "config.yml:" in r.output, r.output
    assert isinstance(r.exception, SystemExit) and not (tmp_path / "out").exists()


def _grow_vocab(src, dst, extra: list[str], seed: int = 1):
    """A copy of a tiny model with `extra` tokens added to its tokenizer and new embedding rows (as
    mergekit's test_tokenizer builds model_chatml: 64 -> 66)."""
    import json
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    n0 = len(vocab)
    for i, t in enumerate(extra):
        vocab[t] = n0 + i
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((dst / "config.json").read_text())
    tensors = load_tensors(dst)
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in tensors:
            t = tensors[k]
            tensors[k] = torch.cat([t, torch.randn(len(extra), t.shape[1], generator=g, dtype=t.dtype) * 0.02])
    cfg["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in dst.glob("*.safetensors"):
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


VOCAB_CASES = [(m, s) for m in ("linear", "slerp") for s in ("union", "base", "chatml")]


def _vocab_config(method: str, source: str, base, chatml) -> str:
    ts = {"union": "union", "base": "base", "chatml": str(chatml)}[source]
    params = "parameters: {t: 0.5}\n" if method == "slerp" else ""
    weights = "" if method == "slerp" else "    parameters: {weight: 0.5}\n"
    return (
        f"models:\n  - model: {base}\n{weights}  - model: {chatml}\n{weights}merge_method: {method}\n"
        f"base_model: {base}\n{params}tokenizer_source: {ts}\ndtype: bfloat16\n"
    )


@pytest.fixture(scope="module")
def vocab_outputs(models, tmp_path_factory):
    """Models of 128 and 130 embedding rows; every case through mergekit in one process."""
    root = tmp_path_factory.mktemp("mk-vocab")
    base = models("mistral")
    chatml = _grow_vocab(models("mistral", noise=0.02), root / "chatml", ["<|im_start|>", "<|im_end|>"])
    args = []
    for method, source in VOCAB_CASES:
        cfg = write_plan(root / f"{method}-{source}", _vocab_config(method, source, base, chatml), "config.yml")
        args += [str(cfg), str(root / f"{method}-{source}" / "mergekit")]
    p = subprocess.run([sys.executable, "-c", MK_RUNNER, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method, source", VOCAB_CASES)
def test_differing_vocabularies_are_realigned_as_mergekit_does(vocab_outputs, method, source):
    import transformers

    folder = vocab_outputs / f"{method}-{source}"
    out = surgery.apply(folder / "config.yml", folder / "surgery", progress=False).path
    ours, theirs = load_tensors(out), load_tensors(folder / "mergekit")
    va = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    vm = transformers.AutoTokenizer.from_pretrained(folder / "mergekit").get_vocab()
    assert set(va) == set(vm)
    assert ("<|im_start|>" in va) == (source != "base")
    for k in theirs:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ours[k].shape[0] == len(va) == theirs[k].shape[0], k
            rows_a = torch.stack([ours[k][va[t]] for t in sorted(va)])
            rows_m = torch.stack([theirs[k][vm[t]] for t in sorted(va)])
            assert within_ulps(rows_a, rows_m), k
        else:
            assert within_ulps(ours[k], theirs[k]), k
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(va)


# mergekit's tests/test_tokenizer.py, rebuilt: BPE tokenizers of `_tok_{i}` tokens, a base of 64,
# a chatml model of 66 (two added tokens, two more embedding rows) and a padded one (added tokens
# that no embedding row uses)
def _bpe_tokenizer(folder, vocab_size: int, added: list[str]):
    import json as _json

    import tokenizers
    import transformers

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {
        "version": "1.0",
        "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size), strict=True)), "merges": []},
        "added_tokens": [],
    }
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(_json.dumps(data)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens(added)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def tok_models(tmp_path_factory):
    from surgery.tiny import build_tiny

    root = tmp_path_factory.mktemp("mk-tok")
    base = build_tiny("llama", root / "model_base", vocab_size=64, mlp_bias=False, attention_bias=False)
    _bpe_tokenizer(base, 64, [])
    chatml = build_tiny("llama", root / "model_chatml", vocab_size=66, noise=0.02, mlp_bias=False, attention_bias=False)
    _bpe_tokenizer(chatml, 64, ["<|im_start|>", "<|im_end|>"])
    padded = build_tiny("llama", root / "model_padded", vocab_size=64, noise=0.04, mlp_bias=False, attention_bias=False)
    _bpe_tokenizer(padded, 64, [f"<UNUSED_{i}>" for i in range(4)])
    return {"base": base, "chatml": chatml, "padded": padded}


TOKENIZER_CASES = {
    "source_base": (["base", "padded", "chatml"], "linear", "tokenizer_source: base\n"),
    "source_union": (["base", "padded", "chatml"], "linear", "tokenizer_source: union\n"),
    "source_model": (["base", "padded", "chatml"], "linear", "tokenizer_source: {chatml}\n"),
    "slerp_union": (["base", "chatml"], "slerp", "tokenizer_source: union\nparameters: {{t: 0.5}}\n"),
    "force_token": (
        ["base", "chatml"],
        "linear",
        "tokenizer:\n  source: union\n  tokens:\n"
        "    _tok_10: {{source: {chatml}, force: true}}\n    _tok_11: {{source: {base}, force: true}}\n",
    ),
    "model_token_id": (
        ["base", "chatml"],
        "linear",
        "tokenizer:\n  source: base\n  tokens:\n    _tok_20:\n"
        "      source: {{kind: model_token, model: {chatml}, token_id: 64}}\n      force: true\n"
        "    _tok_21:\n      source: {{kind: model_token, model: {base}, token: '<s>'}}\n      force: true\n",
    ),
    "pad_to_multiple_of": (["chatml"], "linear", "tokenizer:\n  source: base\n  pad_to_multiple_of: 16\n"),
}


def _tok_config(name: str, paths: dict) -> str:
    models, method, extra = TOKENIZER_CASES[name]
    base = paths["chatml"] if name == "pad_to_multiple_of" else paths["base"]
    lines = [f"merge_method: {method}", f"base_model: {base}", "dtype: float32", "models:"]
    for m in models:
        lines += [f"  - model: {paths[m]}", "    parameters: {weight: 1.0}"]
    return "\n".join(lines) + "\n" + extra.format(**paths)


@pytest.fixture(scope="module")
def tok_outputs(tok_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mk-tok-out")
    args = []
    for name in TOKENIZER_CASES:
        cfg = write_plan(root / name, _tok_config(name, tok_models), "config.yml")
        args += [str(cfg), str(root / name / "mergekit")]
    p = subprocess.run([sys.executable, "-c", MK_RUNNER, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TOKENIZER_CASES))
def test_mergekit_tokenizer_configs_agree_token_by_token(name, tok_outputs, tok_models):
    import json as _json

    import transformers

    folder = tok_outputs / name
    out = surgery.apply(folder / "config.yml", folder / "surgery", progress=False).path
    ours, theirs = load_tensors(out), load_tensors(folder / "mergekit")
    va = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    vm = transformers.AutoTokenizer.from_pretrained(folder / "mergekit").get_vocab()
    assert set(va) == set(vm)
    n_cfg = _json.loads((out / "config.json").read_text())["vocab_size"]
    assert n_cfg == _json.loads((folder / "mergekit" / "config.json").read_text())["vocab_size"]
    if TOKENIZER_CASES[name][1] == "slerp":  # float32 slerp: ~1e-7 relative, as the README's table says

        def within_ulps(a, b):
            return torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    else:
        from .test_mergekit_compat import within_ulps
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            rows_a = torch.stack([ours[k][va[t]] for t in sorted(va)])
            rows_m = torch.stack([theirs[k][vm[t]] for t in sorted(va)])
            assert within_ulps(rows_a, rows_m), k
            assert torch.equal(ours[k][len(va) :], theirs[k][len(vm) :]), k  # padding rows
        else:
            assert within_ulps(ours[k], theirs[k]), k
    if name == "pad_to_multiple_of":
        assert n_cfg == 80 and len(va) == 66
    if name == "model_token_id":  # _tok_20 is chatml's row 64, _tok_21 base's <s>
        chat, base = load_tensors(tok_models["chatml"]), load_tensors(tok_models["base"])
        assert torch.equal(ours["model.embed_tokens.weight"][va["_tok_20"]], chat["model.embed_tokens.weight"][64])
        assert torch.equal(ours["model.embed_tokens.weight"][va["_tok_21"]], base["model.embed_tokens.weight"][1])


def test_tokenizer_block_errors_are_located(tok_models, tmp_path):
    cfg = write_plan(tmp_path, _tok_config("force_token", tok_models).replace("force: true}", "force: true, color: red}", 1), "config.yml")
    r = CliRunner().invoke(main, ["validate", str(cfg)])
    assert r.exit_code == 1 and "config.yml:" in r.output and "color" in r.output, r.output
