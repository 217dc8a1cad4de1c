"""Synthetic Llama-shaped checkpoints of any size, written straight to safetensors.

For benchmarks and large-file tests: the tensors' names, shapes and dtypes are exactly those of
a real Llama checkpoint (so every plan works on them), and their bytes are random bf16/fp32
values, written block by block without ever holding a whole tensor. No transformers needed.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import torch

SIZES = {
    # name: hidden, layers, intermediate, vocab, heads, kv heads, tied
    "8b": (4096, 32, 14336, 128256, 32, 8, False),
    "1.7b": (2048, 24, 8192, 128256, 16, 8, True),
    "tiny": (64, 8, 128, 512, 4, 2, False),
}


def llama_tensors(hidden: int, layers: int, inter: int, vocab: int, heads: int, kv: int, tied: bool):
    hd = hidden // heads
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (heads * hd, hidden)),
            (p + "self_attn.k_proj.weight", (kv * hd, hidden)),
            (p + "self_attn.v_proj.weight", (kv * hd, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * hd)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def write_synthetic_llama(
    path: str | Path, size: str | tuple = "tiny", *, dtype: str = "bfloat16", seed: int = 0, shard_size: int = 5 * 10**9, std: float = 0.02
) -> Path:
    hidden, layers, inter, vocab, heads, kv, tied = SIZES[size] if isinstance(size, str) else size
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, dtype)
    code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    isz = torch.tensor([], dtype=dt).element_size()
    tensors = llama_tensors(hidden, layers, inter, vocab, heads, kv, tied)
    # a pool of random values reused with a per-tensor rotation: fast to write, distinct per tensor
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=g) * std).to(dt)
    shards, cur, size_ = [], [], 0
    for name, shape in tensors:
        nb = isz
        for d in shape:
            nb *= d
        if cur and size_ + nb > shard_size:
            shards.append(cur)
            cur, size_ = [], 0
        cur.append((name, shape, nb))
        size_ += nb
    shards.append(cur)
    weight_map = {}
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nb in shard:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + nb]}
            pos += nb
            weight_map[name] = fname
        hb = json.dumps(header).encode()
        hb += b" " * (-len(hb) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for k, (name, shape, nb) in enumerate(shard):
                n = nb // isz
                if len(shape) == 1:
                    f.write(torch.ones(n, dtype=dt).view(torch.uint8).numpy().tobytes())
                    continue
                rot = (zlib.crc32(name.encode()) + seed * 7919) % (1 << 20)
                src = torch.roll(pool, rot)
                done = 0
                while done < n:
                    m = min(n - done, src.numel())
                    f.write(src[:m].view(torch.uint8).numpy().tobytes())
                    done += m
    total = sum(nb for shard in shards for _, _, nb in shard)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
        "dtype": dtype,
        "hidden_act": "silu",
        "rope_theta": 500000.0,
        "initializer_range": 0.02,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
