"""mergekit configs run unchanged: `surgery apply` and `mergekit-yaml` give the same tensors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

import surgery

from .conftest import load_tensors, read_json, write_plan

MERGEKIT = shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(MERGEKIT is None, reason="mergekit 0.1.5 is in the test extra; install it")


@pytest.fixture(scope="module")
def trio(models):
    """Three tiny Mistrals of one shape (no biases: mergekit drops Llama biases), a base and two fine-tunes."""
    return models("mistral", seed=0), models("mistral", seed=0, noise=0.02), models("mistral", seed=0, noise=0.04)


def run_both(tmp_path, text: str):
    cfg = write_plan(tmp_path, text, "config.yml")
    ours = surgery.apply(cfg, tmp_path / "surgery", progress=False).path
    p = subprocess.run([MERGEKIT, str(cfg), str(tmp_path / "mergekit")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return load_tensors(ours), load_tensors(tmp_path / "mergekit"), ours


def within_ulps(a: torch.Tensor, b: torch.Tensor, ulps: int = 1) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    big = torch.maximum(a.abs(), b.abs()).float()
    step = torch.nextafter(big.to(a.dtype), torch.tensor(float("inf"), dtype=a.dtype)).float() - big
    return bool(((a.float() - b.float()).abs() <= ulps * step + 1e-30).all())


def compare(ours, theirs, *, bitwise: bool):
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        if bitwise:
            assert torch.equal(ours[k], theirs[k]), k
        else:
            assert within_ulps(ours[k], theirs[k]), f"{k}: max diff {(ours[k].float() - theirs[k].float()).abs().max()}"


@pytest.mark.slow
def test_linear_example(trio, tmp_path):
    a, b, c = trio
    ours, theirs, out = run_both(
        tmp_path,
        f"""
models:
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float16
""",
    )
    compare(ours, theirs, bitwise=True)
    assert read_json(out / "config.json")["dtype"] == "float16"
    assert "mergekit_config" in read_json(out / "surgery.json")["plan"]


@pytest.mark.slow
def test_gradient_slerp_example(trio, tmp_path):
    a, b, _ = trio
    ours, theirs, _ = run_both(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    )
    compare(ours, theirs, bitwise=False)


@pytest.mark.slow
def test_passthrough_frankenmerge_example(trio, tmp_path):
    a, b, _ = trio
    ours, theirs, out = run_both(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    )
    compare(ours, theirs, bitwise=True)
    assert read_json(out / "config.json")["num_hidden_layers"] == 6


@pytest.mark.slow
def test_passthrough_scale_filters_and_precedence(trio, tmp_path):
    a, b, _ = trio
    ours, theirs, _ = run_both(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
  - sources:
      - model: {b}
        layer_range: [3, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: 0.0
    parameters:
      scale: 0.5
merge_method: passthrough
""",
    )
    compare(ours, theirs, bitwise=True)
    assert not ours["model.layers.4.self_attn.o_proj.weight"].any()
    assert torch.equal(ours["model.layers.4.mlp.up_proj.weight"], theirs["model.layers.4.mlp.up_proj.weight"])


@pytest.mark.slow
def test_linear_slices_with_gradients_and_out_dtype(trio, tmp_path):
    a, b, _ = trio
    ours, theirs, _ = run_both(
        tmp_path,
        f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters: {{weight: [1.0, 0.2]}}
      - model: {b}
        layer_range: [2, 4]
        parameters:
          weight:
            - filter: mlp
              value: 0.7
    parameters:
      weight: 0.25
      normalize: false
merge_method: linear
out_dtype: bfloat16
""",
    )
    compare(ours, theirs, bitwise=True)


@pytest.mark.slow
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(trio, tmp_path, with_base):
    a, b, c = trio
    base = f"base_model: {a}\n" if with_base else ""
    ours, theirs, _ = run_both(
        tmp_path,
        f"""
models:
  - model: {b}
    parameters: {{weight: 0.7}}
  - model: {c}
    parameters: {{weight: 0.3}}
merge_method: nuslerp
{base}parameters:
  nuslerp_flatten: false
dtype: bfloat16
""",
    )
    compare(ours, theirs, bitwise=False)


def test_qwen3_depth_upscale_loads(models, tmp_path):
    """mergekit writes the weights but keeps `layer_types` at the old length; surgery resizes it."""
    q = models("qwen3")
    cfg = write_plan(
        tmp_path,
        f"""
slices:
  - sources: [{{model: {q}, layer_range: [0, 3]}}]
  - sources: [{{model: {q}, layer_range: [1, 4]}}]
merge_method: passthrough
""",
        "config.yml",
    )
    out = surgery.apply(cfg, tmp_path / "out", progress=False).path
    import transformers

    c = transformers.AutoConfig.from_pretrained(out)
    assert c.num_hidden_layers == 6 and len(c.layer_types) == 6
    src_types = read_json(q / "config.json")["layer_types"]
    assert c.layer_types == [src_types[i] for i in (0, 1, 2, 1, 2, 3)]
    transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    "slices, message",
    [
        ("[{{sources: [{{model: {a}, layer_range: [0, 0]}}]}}]", "config.yml:1: layer range [0, 0] is empty"),
        ("[{{sources: [{{model: {a}, layer_range: [0, 9]}}]}}]", "layer range [0, 9) is past the end of model"),
        (
            "[{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 3]}}]}}]",
            "merged ranges have different lengths",
        ),
        ("[{{sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {a}, layer_range: [2, 4]}}]}}]", "appear twice in one merge"),
    ],
)
def test_mergekit_failure_cases_fail_early(trio, tmp_path, slices, message):
    a, b, _ = trio
    method = "linear\nparameters: {weight: 1.0}" if "{b}" in slices or slices.count("{a}") > 1 else "passthrough"
    cfg = write_plan(tmp_path, f"slices: {slices.format(a=a, b=b)}\nmerge_method: {method}\n", "config.yml")
    rep = surgery.validate(cfg)
    assert not rep.valid
    assert message in str(rep.problems[0]), rep.text()


def _retokenize(folder, drop: set[str], extra: list[str]):
    """Give a tiny model a different vocabulary: some characters gone, new tokens, other ids."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    specials = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < 3]
    rest = [t for t, i in sorted(vocab.items(), key=lambda kv: -kv[1]) if i >= 3 and t not in drop] + extra
    tok["model"]["vocab"] = {t: i for i, t in enumerate(specials + rest)}
    (folder / "tokenizer.json").write_text(json.dumps(tok))


@pytest.mark.slow
def test_tokenizer_union(models, tmp_path):
    a_src, b_src = models("mistral"), models("mistral", noise=0.02)
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a_src, a)
    shutil.copytree(b_src, b)
    _retokenize(b, drop={"x", "y", "z"}, extra=["<tool>", "<think>"])
    ours, theirs, out = run_both(
        tmp_path,
        f"""
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 4]}}
      - {{model: {b}, layer_range: [0, 4]}}
merge_method: slerp
base_model: {a}
parameters: {{t: 0.5}}
tokenizer_source: union
dtype: bfloat16
""",
    )
    import transformers

    va = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    vm = transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit").get_vocab()
    # mergekit numbers new tokens in the order of the tokenizers' get_vocab() (a hash map, which
    # varies between processes), so compare by token: same tokens, same embedding row per token
    assert set(va) == set(vm) and {"<tool>", "<think>", "x"} <= set(va)
    n = len(va)
    assert ours["model.embed_tokens.weight"].shape[0] == n == read_json(out / "config.json")["vocab_size"]
    vocab_tensors = ("model.embed_tokens.weight", "lm_head.weight")
    compare(
        {k: v for k, v in ours.items() if k not in vocab_tensors},
        {k: v for k, v in theirs.items() if k not in vocab_tensors},
        bitwise=False,
    )
    for k in vocab_tensors:
        rows_a = torch.stack([ours[k][va[t]] for t in sorted(va)])
        rows_m = torch.stack([theirs[k][vm[t]] for t in sorted(va)])
        assert within_ulps(rows_a, rows_m), k
    # the token that only b had keeps b's row, realigned: it is not a zero row
    assert ours["model.embed_tokens.weight"][va["<tool>"]].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "auto", "'{% for m in messages %}{{ m.content }}{% endfor %}'"])
def test_chat_template(trio, tmp_path, template):
    a_src, b_src, _ = trio
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(a_src, a)
    shutil.copytree(b_src, b)
    if template == "auto":  # two models share one template, a third would lose the vote
        for m in (a, b):
            (m / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}")
    _, _, out = run_both(
        tmp_path,
        f"""
models:
  - {{model: {a}, parameters: {{weight: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
merge_method: linear
chat_template: {template}
""",
    )
    import transformers

    ours = transformers.AutoTokenizer.from_pretrained(out).chat_template
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "mergekit").chat_template
    assert ours and ours.strip() == theirs.strip()
