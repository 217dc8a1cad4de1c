"""Tiny real checkpoints, built offline with transformers' own config and model classes.

Used by `surgery demo` (the embedded default model) and by the tests: every family surgery
supports, a few thousand parameters each, deterministic from a seed, saved with
`save_pretrained` exactly as a hub checkpoint would be. Needs `transformers` (the `models` extra).
"""

from __future__ import annotations

import json
from pathlib import Path

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# family -> (config class, model class, config overrides)
SPECS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"mlp_bias": True, "attention_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 16}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 16}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 8,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 32, "n_layer": 4, "n_head": 4, "n_positions": 128, "vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2},
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 48},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8},
    ),
}


def make_config(family: str, **overrides):
    import transformers

    cfg_cls, _, extra = SPECS[family]
    kw = dict(extra) if family == "gpt2" else {**COMMON, **extra}
    kw = {k: v for k, v in {**kw, **overrides}.items() if v is not None}
    return getattr(transformers, cfg_cls)(**kw)


def build_tiny(family: str, path: str | Path, *, seed: int = 0, dtype: str = "float32", noise: float = 0.0, **overrides) -> Path:
    """Save a tiny random `family` model to `path`. Biases and norms get random values too (a zero bias or a
    unit norm would hide a wrong copy). `noise` perturbs weights, for a second model to merge with."""
    import torch
    import transformers

    _, model_cls, _ = SPECS[family]
    cfg = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name or "ln" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif noise:
                p.add_(noise * torch.randn(p.shape, generator=g))
    model = model.to(getattr(torch, dtype))
    path = Path(path)
    model.save_pretrained(path)
    _write_tokenizer(path, cfg.vocab_size)
    return path


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level WordLevel tokenizer over the first `vocab_size` byte values, so outputs carry a real
    tokenizer.json that `AutoTokenizer` loads (and later, the trainer uses)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for b in range(32, 127):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(chr(b), len(vocab))
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for c, i in list(vocab.items())[:3]
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"},
    }
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<pad>",
                "model_max_length": 128,
            }
        )
    )


def logits(path: str | Path, input_ids=None):
    """fp32 logits of a checkpoint on a fixed batch (loaded with transformers; no remote code)."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False).eval()
    if input_ids is None:
        g = torch.Generator().manual_seed(1234)
        input_ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def build_tiny_llava(path: str | Path, *, seed: int = 0, noise: float = 0.0, text_layers: int = 2) -> Path:
    """A tiny LLaVA (CLIP vision tower + Llama language model), shaped like mergekit's test model
    (its tests/common.py make_picoLlaVa): text vocab 64, hidden 32, 16 heads."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128
    )
    text = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_hidden_layers=text_layers,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16, image_token_index=63)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif noise:
                p.add_(noise * torch.randn(p.shape, generator=g))
    path = Path(path)
    model.save_pretrained(path)
    _write_tokenizer(path, 64)
    return path


def llava_logits(path: str | Path, seed: int = 0):
    """Logits of a tiny LLaVA on fixed text and a fixed image (loaded with the image-text-to-text auto class)."""
    import torch
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (1, 72), generator=g)
    ids[0, 2:66] = model.config.image_token_index  # one position per image patch: (32 / 4)^2
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits
