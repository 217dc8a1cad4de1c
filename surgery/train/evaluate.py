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

from surgery.errors import CheckpointError, PlanError


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
    """Perplexity of `model` on `files` (and of `against`, with their logit difference). A single
    YAML file with `sources:` (a training config's `data.sources`, or a file of its own) is scored
    domain by domain: see `evaluate_sources`."""
    if len(files) == 1 and Path(files[0]).suffix.lower() in (".yaml", ".yml"):
        return evaluate_sources(
            model,
            files[0],
            seq_len=seq_len,
            stride=stride,
            against=against,
            max_tokens=max_tokens,
            device=device,
            cache_dir=cache_dir,
            progress=progress,
        )
    from surgery.data.sources import expand_sources

    ctx = _Models(model, against, device, progress)
    srcs = expand_sources(files, Path.cwd(), text_field, lambda i: f"--data {files[i]}")
    return ctx.score(srcs, seq_len, stride, max_tokens, separator, cache_dir, progress)


def evaluate_sources(
    model: str | Path,
    sources_file: str | Path,
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    against: str | Path | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Each domain of a `sources:` list scored on its held-out text (its eval_files, else its files),
    then their average weighted by the given weights (uniform when the sources have none)."""
    from surgery.train.config import load_sources
    from surgery.data.sources import expand_sources
    from surgery.train.mixture import weighted_loss

    data, where = load_sources(sources_file)
    base = Path(sources_file).resolve().parent
    ctx = _Models(model, against, device, progress)
    domains = {}
    for i, src in enumerate(data.sources):
        entries, key = (src.eval_files, "eval_files") if src.eval_files else (src.files, "files")
        srcs = expand_sources(entries, base, data.text_field, lambda k, i=i, key=key: where("sources", i, key, k))
        domains[src.name] = ctx.score(srcs, seq_len or data.seq_len, stride, max_tokens, data.separator, cache_dir, progress)
    given = all(s.weight is not None for s in data.sources) and sum(s.weight for s in data.sources) > 0
    weights = {s.name: (s.weight if given else 1.0) for s in data.sources}
    out = {
        "model": str(ctx.mdir),
        "sources": str(sources_file),
        "weights": "given" if given else "uniform",
        "domains": domains,
        "loss": weighted_loss({k: v["loss"] for k, v in domains.items()}, weights),
    }
    out["perplexity"] = math.exp(min(700, out["loss"]))
    if against is not None:
        out["against"] = str(against)
        out["against_loss"] = weighted_loss({k: v["against_loss"] for k, v in domains.items()}, weights)
        out["against_perplexity"] = math.exp(min(700, out["against_loss"]))
    return out


class _Models:
    """The model (and the one to compare against) loaded once, scored on any number of sources."""

    def __init__(self, model, against, device: str, progress: bool):
        import torch
        import transformers

        from surgery.io.checkpoint import resolve_ref
        from surgery.io.loadable import check_loadable

        transformers.utils.logging.set_verbosity_error()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        self.mdir = resolve_ref(str(model), Path.cwd())
        check_loadable(self.mdir, f"model {model}")
        self.dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tok = transformers.AutoTokenizer.from_pretrained(self.mdir, trust_remote_code=False)
        load = transformers.AutoModelForCausalLM.from_pretrained
        self.m = load(self.mdir, dtype=torch.float32, trust_remote_code=False).to(self.dev).eval()
        self.base, self.against = None, against
        if against is not None:
            bdir = resolve_ref(str(against), Path.cwd())
            check_loadable(bdir, f"--against {against}")
            self.base = load(bdir, dtype=torch.float32, trust_remote_code=False).to(self.dev).eval()
            if self.base.config.vocab_size != self.m.config.vocab_size:
                raise PlanError(
                    f"--against {against}: vocabulary {self.base.config.vocab_size} differs from the model's {self.m.config.vocab_size}",
                    fix="compare checkpoints that share a tokenizer",
                )

    def score(self, srcs, seq_len, stride, max_tokens, separator, cache_dir, progress) -> dict:
        import torch

        from surgery.data.tokens import default_cache_dir
        from surgery.data.packing import token_stream

        m, base, dev = self.m, self.base, self.dev
        stream = token_stream(srcs, self.tok, self.mdir, Path(cache_dir) if cache_dir else default_cache_dir(), separator)
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
        for key, path in (("model", self.mdir), ("against", self.against)):
            if not math.isfinite(nll[key]):
                raise CheckpointError(
                    f"the loss of {path} on this text is not finite ({nll[key]}): its weights or activations hold NaN or inf",
                    where=str(path),
                    fix="check the checkpoint (surgery verify; was it written by a diverged run?)",
                )
        out = {
            "model": str(self.mdir),
            "tokens": n,
            "scored_tokens": count,
            "seq_len": L,
            "stride": S,
            "loss": nll["model"] / count,
            "perplexity": math.exp(min(700, nll["model"] / count)),
        }
        if base is not None:
            out.update(
                against=str(self.against),
                against_loss=nll["against"] / count,
                against_perplexity=math.exp(min(700, nll["against"] / count)),
                max_abs_logit_diff=max_diff,
                mean_abs_logit_diff=sum_diff / max(1, n_logits),
            )
        return out
