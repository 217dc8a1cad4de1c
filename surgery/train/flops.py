"""Training FLOPs of a checkpoint, from its safetensors headers and config (no weights read).

Per token of a training step (forward and backward), the usual count (Kaplan et al. 2020; PaLM's
MFU appendix):

    F = 6 N + 12 L d_attn T

N: the parameters of the matrix multiplications (every tensor with two or more dimensions except
the input and position embeddings, which are lookups; a tied output head counts as a
multiplication once; a mixture of experts' expert tensors count k/E, the share of experts a token
runs through); L layers, d_attn = heads x head_dim, T the sequence length (the attention
scores and their weighting: 2 x 2 L T d_attn forward, twice that backward). A grown run counts each
stage at its own size.
"""

from __future__ import annotations

import math
from pathlib import Path


def flops_per_token(model_dir: str | Path, seq_len: int) -> dict:
    """{"flops_per_token", "matmul_params", "layers", "attention_width"} of the checkpoint at `model_dir`."""
    from surgery.io.checkpoint import open_checkpoint

    ck = open_checkpoint("model", str(model_dir), Path(model_dir))
    fam, cfg = ck.family, ck.config
    text = cfg.get(fam.text_config) if fam.text_config and isinstance(cfg.get(fam.text_config), dict) else cfg
    embeddings = set(fam.embeddings) | set(fam.position_embeddings)  # lookups, not multiplications
    # a mixture of experts runs k of its E experts per token
    k = text.get("num_experts_per_tok")
    e = text.get("num_local_experts") or text.get("num_experts")
    share = k / e if isinstance(k, int) and isinstance(e, int) and e > 0 else 1.0
    n = sum(
        math.prod(t.shape) * (share if ".experts." in name else 1.0)
        for name, t in ck.tensors.items()
        if len(t.shape) >= 2 and name not in embeddings
    )
    n = int(round(n))
    if fam.lm_head not in ck.tensors:  # tied: the head is the embedding matrix, multiplied once per token
        emb = next((ck.tensors[e] for e in fam.embeddings if e in ck.tensors), None)
        n += math.prod(emb.shape) if emb is not None else 0
    layers = int(text.get(fam.num_layers_key) or text.get("num_hidden_layers") or 0)
    heads = text.get(fam.heads_key) or 0
    width = int(heads) * int(fam.head_size(text) or 0)
    return {
        "flops_per_token": 6 * n + 12 * layers * width * seq_len,
        "matmul_params": n,
        "layers": layers,
        "attention_width": width,
    }
