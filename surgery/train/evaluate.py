"""`surgery eval`: perplexity on held-out text with strided windows, and the logit difference
from another checkpoint (`--against`; 0 for an identity expansion of it).

Windows of `seq_len` tokens advance by `stride`; each window scores only the tokens the previous
one did not (its first `seq_len - stride` tokens are context), so every token is scored once with
up to `seq_len - stride` tokens of history. Document starts are not scored across a boundary,
as in training.
"""

from __future__ import annotations

import math
from pathlib import Path

from surgery.errors import PlanError


def evaluate(
    model: str | Path,
    files: list[str],
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    against: str | Path | None = None,
    text_field: str = "text",
    separator: str | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    import torch
    import transformers

    from surgery.io.checkpoint import resolve_ref
    from surgery.train.data import default_cache_dir, expand_sources, token_stream

    transformers.utils.logging.set_verbosity_error()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    from surgery.train.loadable import check_loadable

    mdir = resolve_ref(str(model), Path.cwd())
    check_loadable(mdir, f"model {model}")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tok = transformers.AutoTokenizer.from_pretrained(mdir, trust_remote_code=False)
    m = transformers.AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, trust_remote_code=False).to(dev).eval()
    base = None
    if against is not None:
        bdir = resolve_ref(str(against), Path.cwd())
        check_loadable(bdir, f"--against {against}")
        base = transformers.AutoModelForCausalLM.from_pretrained(bdir, dtype=torch.float32, trust_remote_code=False).to(dev).eval()
        if base.config.vocab_size != m.config.vocab_size:
            raise PlanError(
                f"--against {against}: vocabulary {base.config.vocab_size} differs from the model's {m.config.vocab_size}",
                fix="compare checkpoints that share a tokenizer",
            )
    srcs = expand_sources(files, Path.cwd(), text_field, lambda i: f"--data {files[i]}")
    stream = token_stream(srcs, tok, mdir, Path(cache_dir) if cache_dir else default_cache_dir(), separator)
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    L = seq_len or min(getattr(m.config, "max_position_embeddings", 2048) or 2048, 2048)
    S = stride or max(1, L // 2)
    if not 0 < S <= L:
        raise PlanError(f"--stride {S} must be between 1 and --seq-len {L}")
    if n < 2:
        raise PlanError(f"the data holds {n} tokens; perplexity needs at least 2", fix="give more text")
    nll = {"model": 0.0, "against": 0.0}
    count = 0
    max_diff = 0.0
    sum_diff = 0.0
    n_logits = 0
    prev_end = 0
    windows = range(0, n, S)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="evaluating", unit="tok", unit_scale=True)
    with torch.no_grad():
        for begin in windows:
            end = min(begin + L, n)
            if end - begin < 2:
                break
            ids = torch.from_numpy(stream.slice(begin, end)).to(dev)
            labels = ids.clone()
            labels[: max(0, prev_end - begin)] = -100
            labels[torch.from_numpy(stream.boundaries(begin, end)).to(dev)] = -100
            for key, net in (("model", m), ("against", base)):
                if net is None:
                    continue
                logits = net(input_ids=ids[None]).logits[0].float()
                nll[key] += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
                if key == "model":
                    ref = logits
                else:
                    d = (ref - logits).abs()
                    max_diff = max(max_diff, float(d.max()))
                    sum_diff += float(d.sum())
                    n_logits += d.numel()
            count += int((labels[1:] != -100).sum())
            if bar is not None:
                bar.update(end - prev_end)
            prev_end = end
            if end == n:
                break
    if bar is not None:
        bar.close()
    if count == 0:
        raise PlanError("no token was scored (the text is all document starts?)", fix="give longer documents")
    out = {
        "model": str(mdir),
        "tokens": n,
        "scored_tokens": count,
        "seq_len": L,
        "stride": S,
        "loss": nll["model"] / count,
        "perplexity": math.exp(min(700, nll["model"] / count)),
    }
    if base is not None:
        out.update(
            against=str(against),
            against_loss=nll["against"] / count,
            against_perplexity=math.exp(min(700, nll["against"] / count)),
            max_abs_logit_diff=max_diff,
            mean_abs_logit_diff=sum_diff / max(1, n_logits),
        )
    return out
