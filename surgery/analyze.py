"""`surgery analyze MODEL --data FILES`: which layers to cut, duplicate or insert after, measured
from the model's own activations, streamed one decoder layer at a time.

What it measures (docs/analyze.md has the equations):
- angular distance d(l, n) = arccos(cos(x_l, x_{l+n})) / pi between the hidden states entering
  layer l and layer l + n, of the last token, averaged over samples (Gromov et al. 2024, "The
  Unreasonable Ineffectiveness of the Deeper Layers", eq. 7); the block [l, l + n) whose removal
  changes the representation least is argmin_l d(l, n);
- Block Influence BI_l = 1 - mean over all tokens of cos(x_l, x_{l+1}) (Men et al. 2024, ShortGPT,
  eq. 1), and the all-token angular distance of each single layer;
- per-layer hidden-state norms (the RMS of the states entering each layer, and leaving the last).

How it runs: the model's own transformers classes do the work, with parameters on the meta device
(accelerate's init_empty_weights) and only the token embedding rows that the data uses read from
disk. One forward pass per micro-batch with every decoder layer replaced by a recorder captures the
arguments each layer receives (position embeddings, its own attention mask) and the embedding
output; then layer by layer, each layer's weights are read from the safetensors shards (through
surgery's checkpoint reader), every micro-batch is run through it, and its weights are dropped.
Peak memory is about one layer (in float32) plus the activations of all samples at one depth.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from surgery.engine.layerwise import LayerwiseModel, run_layer
from surgery.errors import CheckpointError, PlanError, SurgeryError


@dataclass
class Analysis:
    model: str
    family: str
    num_layers: int
    samples: int
    seq_len: int
    # distance[n - 1][l]: last-token angular distance between the states entering l and l + n
    distance: list[list[float]]
    block_influence: list[float]  # per layer, all tokens
    layer_distance_all_tokens: list[float]  # per layer, all-token angular distance (n = 1)
    norms: list[float]  # RMS of the states entering each layer, then leaving the last (L + 1 values)
    best_block: dict[int, int] = field(default_factory=dict)  # n -> start layer l of argmin_l d(l, n)
    last_token: list = field(default_factory=list, repr=False)  # per boundary: the samples' last-token states
    # held-out loss (mean next-token cross-entropy over `loss_samples` sequences) of the whole model,
    # and drop_loss[n][l]: the same loss with the block [l, l + n) removed (every l), when asked for
    loss: float | None = None
    loss_samples: int = 0
    drop_loss: dict[int, list[float]] = field(default_factory=dict)
    inputs: object = field(default=None, repr=False)  # the token ids of the samples, [samples, seq_len]

    def as_dict(self) -> dict:
        return {
            "format": "surgery.analyze/1",
            "model": self.model,
            "family": self.family,
            "num_layers": self.num_layers,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "distance_last_token": self.distance,
            "block_influence": self.block_influence,
            "layer_distance_all_tokens": self.layer_distance_all_tokens,
            "hidden_state_rms": self.norms,
            "best_block": {str(n): s for n, s in self.best_block.items()},
            **(
                {
                    "loss": self.loss,
                    "loss_samples": self.loss_samples,
                    "drop_loss": {str(n): v for n, v in self.drop_loss.items()},
                    "best_block_by_loss": {str(n): s for n, s in self.best_block_by_loss().items()},
                }
                if self.loss is not None
                else {}
            ),
        }

    def best_block_by_loss(self) -> dict[int, int]:
        """n -> the start l of the block whose removal raises the held-out loss least (measured)."""
        return {n: min(range(len(v)), key=v.__getitem__) for n, v in self.drop_loss.items()}


def analyze(
    model: str | Path,
    files: list[str],
    *,
    samples: int = 256,
    seq_len: int = 128,
    micro_batch: int = 8,
    device: str = "auto",
    text_field: str = "text",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    keep_states: bool = False,
    dtype: str = "float32",
    drop_sizes: tuple[int, ...] = (),
    loss_samples: int = 64,
) -> Analysis:
    """Stream `model` over `samples` sequences of `seq_len` tokens from `files` (txt, jsonl, parquet).
    `dtype`: what the layers compute in (float32, bfloat16, float16, or auto: the checkpoint's);
    a 16-bit dtype halves the layer's memory, the statistics are always float64.
    `drop_sizes`: also measure, in the same pass, the held-out loss of the model with each
    contiguous block of each of these sizes removed (on the first `loss_samples` sequences)."""
    import torch
    import transformers

    from surgery.io.checkpoint import open_checkpoint, resolve_ref
    from surgery.data.tokens import default_cache_dir
    from surgery.data.sources import expand_sources
    from surgery.data.packing import token_stream
    from surgery.io.loadable import check_loadable

    transformers.utils.logging.set_verbosity_error()
    mdir = resolve_ref(str(model), Path.cwd())
    check_loadable(mdir, f"model {model}")
    ck = open_checkpoint("model", str(model), mdir)
    if ck.family.guessed or ck.family.text_config:
        raise CheckpointError(
            f"surgery analyze streams language models of the families it knows; {ck.family.name} "
            + ("is guessed from tensor names" if ck.family.guessed else "is a vision-language model"),
            where=str(mdir),
            fix="analyze a supported family (surgery inspect shows the family)",
        )
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    from surgery.io.safetensors import dtype_name

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dtype = dtype_name(ck.dtype) if dtype_name(ck.dtype) in names else "float32"
    if dtype not in names:
        raise PlanError(f"--dtype {dtype}: use auto, float32, bfloat16 or float16")
    cdt = names[dtype]
    tok = transformers.AutoTokenizer.from_pretrained(mdir, trust_remote_code=False)
    srcs = expand_sources(files, Path.cwd(), text_field, lambda i: f"--data {files[i]}")
    stream = token_stream(srcs, tok, mdir, Path(cache_dir) if cache_dir else default_cache_dir(), None)
    n_seq = min(samples, len(stream) // seq_len)
    if n_seq < 1:
        raise PlanError(
            f"the data holds {len(stream):,} tokens, less than one sequence of {seq_len}",
            where=f"--data {files[0] if files else ''}",
            fix="give more text or a smaller --seq-len",
        )
    # held-out sequences spread evenly over the stream
    stride = len(stream) // n_seq
    ids = torch.stack([torch.as_tensor(stream.slice(i * stride, i * stride + seq_len)) for i in range(n_seq)])
    mb = max(1, min(micro_batch, n_seq))
    batches = [ids[i : i + mb] for i in range(0, n_seq, mb)]

    config = transformers.AutoConfig.from_pretrained(mdir, trust_remote_code=False)
    config.use_cache = False
    lw = LayerwiseModel(ck, config, dev, cdt)
    base, reader, emb_name, layer_path = lw.base, lw.reader, lw.emb_name, lw.layer_path
    h0, calls = lw.capture([{"input_ids": b} for b in batches])

    L = len(lw)
    sizes = sorted(set(drop_sizes))
    for n in sizes:
        if not 1 <= n < L:
            raise PlanError(f"drop:{n}: a {L}-layer model can drop 1 to {L - 1} layers", where=str(model))
    # the loss pass runs on the first micro-batches (loss_samples sequences, rounded up to whole micro-batches)
    lb = math.ceil(min(loss_samples, n_seq) / mb) if sizes else 0
    window: dict[int, list] = {}  # l -> the loss batches' states entering layer l, for the blocks ending here
    branches: dict[tuple[int, int], list] = {}  # (l, n) -> states of the model without layers [l, l + n)
    last = [[None] * (L + 1) for _ in batches]  # normalised last-token states per boundary, per batch
    norms = [0.0] * (L + 1)
    bi, dist1 = [0.0] * L, [0.0] * L
    states = [[] for _ in range(L + 1)] if keep_states else None
    h = h0
    bar = _bar(progress, L)
    with torch.no_grad():
        for i in range(L):
            with lw.layer(i) as layer:
                _branch(window, branches, sizes, i, h[:lb])
                out = [run_layer(layer, x, calls[k][i]) for k, x in enumerate(h)]
                for key, xs in branches.items():  # each model with a block removed below layer i runs it too
                    if key[0] + key[1] <= i:
                        branches[key] = [run_layer(layer, x, calls[k][i]) for k, x in enumerate(xs)]
            for k, (x, y) in enumerate(zip(h, out, strict=True)):
                last[k][i] = _unit(x[:, -1].double())
                norms[i] += float(x.double().pow(2).mean(-1).sqrt().sum())
                ux, uy = _unit(x.double()), _unit(y.double())
                bi[i] += float(((ux - uy).pow(2).sum(-1) / 2).sum())  # 1 - cos, exactly 0 for equal states
                dist1[i] += float(_angle(ux, uy).sum())
                if states is not None:
                    states[i].append(x.cpu())
            h = out
            bar.update(1) if bar else None
        for k, x in enumerate(h):
            last[k][L] = _unit(x[:, -1].double())
            norms[L] += float(x.double().pow(2).mean(-1).sqrt().sum())
            if states is not None:
                states[L].append(x.cpu())
        loss, drop_loss = None, {}
        if sizes:
            _branch(window, branches, sizes, L, h[:lb])
            streams = {(0, 0): h[:lb], **branches}
            losses = _head_losses(base, config, ck, reader, layer_path, emb_name, streams, batches[:lb], dev, cdt)
            loss = losses[(0, 0)]
            drop_loss = {n: [losses[(l0, n)] for l0 in range(L - n + 1)] for n in sizes}
    lw.close()
    if bar:
        bar.close()
    tokens = n_seq * seq_len
    norms = [v / n_seq / seq_len for v in norms]
    bi = [v / tokens for v in bi]
    dist1 = [v / tokens for v in dist1]
    distance = []
    for n in range(1, L + 1):
        row = []
        for l0 in range(0, L - n + 1):
            s = 0.0
            for k in range(len(batches)):
                s += float(_angle(last[k][l0], last[k][l0 + n]).sum())
            row.append(s / n_seq)
        distance.append(row)
    _require_finite(mdir, norms, distance, loss, drop_loss)
    best = {n: min(range(len(row)), key=row.__getitem__) for n, row in enumerate(distance, 1) if n < L}
    res = Analysis(
        str(model),
        ck.family.name,
        L,
        n_seq,
        seq_len,
        distance,
        bi,
        dist1,
        norms,
        best,
        [torch.cat([last[k][i] for k in range(len(batches))]).float().cpu() for i in range(L + 1)],
        loss,
        sum(len(b) for b in batches[:lb]),
        drop_loss,
        ids,
    )
    if states is not None:  # for tests: every boundary's states
        res.states = [torch.cat(s) for s in states]  # type: ignore[attr-defined]
    return res


def _require_finite(mdir, norms, distance, loss, drop_loss) -> None:
    """A measurement that is NaN or inf is no measurement: never printed as a suggestion or a table."""

    def bad(values) -> bool:
        return any(not math.isfinite(float(v)) for v in values)

    where = next((i for i, v in enumerate(norms) if not math.isfinite(float(v))), None)
    if where is not None or bad(v for row in distance for v in row) or (loss is not None and bad([loss])):
        at = f" (the hidden states entering layer {where} are the first that are not)" if where is not None else ""
        raise CheckpointError(
            f"the model's activations are not finite on this text{at}: its weights hold NaN or inf, so no layer can be measured",
            where=str(mdir),
            fix="check the checkpoint (surgery verify; was it written by a diverged run?)",
        )
    for n, row in (drop_loss or {}).items():
        if bad(row):
            raise CheckpointError(
                f"the held-out loss with a block of {n} layer(s) removed is not finite: the model's weights hold NaN or inf",
                where=str(mdir),
                fix="check the checkpoint",
            )


def check_comparable(model: str, against: str) -> None:
    """`--against` is refused before any work when its hidden size differs from the model's (read
    from the headers: the embedding's width)."""
    from surgery.io.checkpoint import open_checkpoint, resolve_ref

    widths = []
    for ref in (model, against):
        path = resolve_ref(str(ref), Path.cwd())
        ck = open_checkpoint("model", str(ref), path)
        emb = next((ck.tensors[e] for e in ck.family.embeddings if e in ck.tensors), None)
        widths.append(emb.shape[-1] if emb is not None else None)
    if None not in widths and widths[0] != widths[1]:
        raise PlanError(
            f"--against {against}: its hidden size is {widths[1]}, the model's {widths[0]}; cosine and CKA compare states of one width",
            fix="compare models of the same hidden size (e.g. a merge or a fine-tune against its parent)",
        )


def compare(a: Analysis, b: Analysis) -> dict:
    """Layer by layer, two models on the same samples (e.g. a merge against a parent): the mean cosine
    of their last-token states entering each layer, and linear CKA (Kornblith et al. 2019) of them."""
    if a.samples != b.samples or a.seq_len != b.seq_len:
        raise PlanError("--against: both models must see the same samples", fix="use the same --samples and --seq-len")
    wa, wb = a.last_token[0].shape[-1], b.last_token[0].shape[-1]
    if wa != wb:
        raise PlanError(
            f"--against {b.model}: its hidden states are {wb} wide, the model's {wa}; cosine and CKA compare states of one width",
            fix="compare models of the same hidden size (e.g. a merge or a fine-tune against its parent)",
        )
    n = min(a.num_layers, b.num_layers) + 1
    cos, cka = [], []
    for i in range(n):
        x, y = a.last_token[i].double(), b.last_token[i].double()
        cos.append(float((x * y).sum(-1).mean()))
        xc, yc = x - x.mean(0), y - y.mean(0)
        hsic = (xc.T @ yc).pow(2).sum()
        norm = ((xc.T @ xc).pow(2).sum() * (yc.T @ yc).pow(2).sum()).sqrt()
        cka.append(float(hsic / norm) if norm > 0 else 1.0)
    return {"boundaries": n, "cosine_last_token": cos, "linear_cka_last_token": cka}


def _branch(window: dict, branches: dict, sizes: list[int], i: int, states: list) -> None:
    """Before layer i runs: remember the states entering it, and start every model that skips the
    n layers below it (its state entering layer i is the one that entered layer i - n)."""
    if not sizes:
        return
    window[i] = states
    for n in sizes:
        if i - n >= 0:
            branches[(i - n, n)] = window[i - n]
    for old in [j for j in window if j < i - sizes[-1]]:
        del window[old]


def _final_norm(base, layer_path: str):
    """The base model's final norm: its one direct child with parameters that is neither the layer
    list nor an embedding (model.norm, transformer.ln_f, gpt_neox.final_layer_norm)."""
    found = [
        m
        for name, m in base.named_children()
        if name != layer_path and not hasattr(m, "embedding_dim") and next(m.parameters(), None) is not None
    ]
    if len(found) != 1:
        raise SurgeryError(f"cannot tell the final norm among {[type(m).__name__ for m in found]}; the held-out loss needs it")
    return found[0]


def _head_losses(base, config, ck, reader, layer_path, emb_name, streams: dict, batches: list, dev, cdt, rows: int = 8192) -> dict:
    """Mean next-token cross-entropy of each stream of final hidden states: the final norm, then the
    output head read from disk `rows` vocabulary rows at a time (each chunk read once for every
    stream), with a running log-sum-exp, so the whole head is never in memory at once."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(text, "tie_word_embeddings", False))
    head = emb_name if tied or ck.family.lm_head not in ck.tensors else ck.family.lm_head
    if head is None or head not in ck.tensors:
        raise CheckpointError("no output head (lm_head or a tied embedding) to compute the held-out loss with", where=str(ck.path))
    cap = getattr(text, "final_logit_softcapping", None)
    norm = _final_norm(base, layer_path)
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches]).to(dev)
    normed = {key: torch.cat([norm(x)[:, :-1].reshape(-1, x.shape[-1]) for x in xs]) for key, xs in streams.items()}
    lse = {key: torch.full((len(targets),), -math.inf, dtype=torch.float64, device=dev) for key in streams}
    picked = {key: torch.zeros(len(targets), dtype=torch.float64, device=dev) for key in streams}
    vocab = ck.tensors[head].shape[0]
    for a in range(0, vocab, rows):
        b = min(vocab, a + rows)
        w = reader.row_block(head, a, b).to(dev, cdt)
        inside = (targets >= a) & (targets < b)
        at = targets[inside] - a
        for key, x in normed.items():
            logits = (x @ w.T).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            lse[key] = torch.logaddexp(lse[key], torch.logsumexp(logits, -1).double())
            picked[key][inside] = logits[inside].gather(-1, at[:, None])[:, 0].double()
        del w
    return {key: float((lse[key] - picked[key]).mean()) for key in streams}


# ---- suggestions ---------------------------------------------------------------------------------


def parse_suggestion(what: str) -> tuple[str, int]:
    """`drop:4` -> ("drop", 4)."""
    kind, _, arg = what.partition(":")
    try:
        return kind, int(arg)
    except ValueError:
        raise PlanError(f"--suggest {what}: expected drop:N, dus:S or expand:K with a number", fix="e.g. --suggest drop:4") from None


def suggest(a: Analysis, what: str, model_name: str, model_ref: str) -> tuple[str, str]:
    """(plan YAML, one-line reason) for `drop:N`, `dus:S` or `expand:K`."""
    kind, k = parse_suggestion(what)
    L = a.num_layers

    def plan(step: dict) -> str:
        """The plan as the YAML library writes it from the plan's data (a model path with `#`, `: `
        or quotes stays one string), under a comment saying where it came from."""
        import yaml

        doc = {"models": {model_name: str(model_ref)}, "steps": [{"take": {"model": model_name}}, step]}
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=1 << 16)
        return f"# suggested by surgery analyze ({a.samples} samples x {a.seq_len} tokens)\n{text}"

    if kind == "drop":
        if not 1 <= k < L:
            raise PlanError(f"--suggest drop:{k}: a {L}-layer model can drop 1 to {L - 1} layers")
        d = a.best_block[k]
        by_distance = f"angular distance {a.distance[k - 1][d]:.4f} (Gromov et al. 2024)"
        if k in a.drop_loss:  # measured: the block whose removal raises the held-out loss least
            s = a.best_block_by_loss()[k]
            why = (
                f"of the {L - k + 1} blocks of {k} layers, removing [{s}, {s + k}) costs the least held-out loss: {a.loss:.4f} -> "
                f"{a.drop_loss[k][s]:.4f} (perplexity {math.exp(a.loss):.2f} -> {math.exp(a.drop_loss[k][s]):.2f}, "
                f"{a.loss_samples} sequences); "
                + (
                    f"the same block has the smallest {by_distance}"
                    if s == d
                    else f"the last-token measure points at [{d}, {d + k}) ({by_distance}; its loss {a.drop_loss[k][d]:.4f})"
                )
            )
        else:
            s = d
            why = f"layers [{s}, {s + k}) change the last-token representation least: {by_distance}"
        return plan({"drop": {"layers": [s, s + k]}}), why
    if kind == "dus":
        if k % 2 or not 2 <= k <= 2 * (L - 1):
            raise PlanError(f"--suggest dus:{k}: depth up-scaling gives s = 2(n - m), so s is even and 2 <= s <= {2 * (L - 1)}")
        m = L - k // 2
        # SOLAR trims m layers from the seam: the bottom copy loses its top m, the top copy its bottom m.
        # The seam duplicates layers [m, n - m); choose the trim whose duplicated block is the most redundant.
        why = f"SOLAR's trim m = n - s/2 = {m} (the paper's default for s = {k}); the layers duplicated at the seam are [{m}, {L - m})"
        if L - m > m:
            d = a.distance[L - 2 * m - 1][m]
            why += f", with last-token angular distance {d:.4f} across them"
        return plan({"dus": {"trim": m}}), why
    if kind == "expand":
        if not 1 <= k <= L:
            raise PlanError(f"--suggest expand:{k}: at most {L} identity blocks for {L} layers")
        if L % k == 0:
            why = (
                f"LLaMA Pro's rule: {k} groups of {L // k} layers, an identity block after each group "
                f"(the layers with the largest Block Influence are {_top(a.block_influence, k)})"
            )
            return plan({"expand": {"groups": k, "init": "identity"}}), why
        raise PlanError(
            f"--suggest expand:{k}: LLaMA Pro's even groups need K to divide the {L} layers",
            fix=f"use one of {[g for g in range(1, L + 1) if L % g == 0]}",
        )
    raise PlanError(f"--suggest {what}: unknown suggestion {kind!r}", fix="use drop:N, dus:S or expand:K")


def _top(values: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k])


# ---- reports ---------------------------------------------------------------------------------------


def text_report(a: Analysis) -> str:
    lines = [
        f"{a.model}: {a.family}, {a.num_layers} layers; {a.samples} samples x {a.seq_len} tokens",
        "",
        "layer   BI (ShortGPT)   angular d(l,1) all tokens   last token   hidden RMS",
    ]
    for i in range(a.num_layers):
        lines.append(
            f"{i:>5}   {a.block_influence[i]:>13.5f}   {a.layer_distance_all_tokens[i]:>26.5f}   "
            f"{a.distance[0][i]:>10.5f}   {a.norms[i]:>10.3f}"
        )
    lines += ["", "n   block to drop   d(l, n) last token"]
    for n, s in a.best_block.items():
        lines.append(f"{n:<3} [{s}, {s + n})  {a.distance[n - 1][s]:>14.5f}")
    if a.loss is not None:
        lines += [
            "",
            f"held-out loss {a.loss:.4f} (perplexity {math.exp(a.loss):.2f}) on {a.loss_samples} sequences; with a block removed:",
            "n   cheapest block   its loss   block by d(l, n)   its loss",
        ]
        for n, s in a.best_block_by_loss().items():
            d = a.best_block[n]
            lines.append(f"{n:<3} {f'[{s}, {s + n})':<16} {a.drop_loss[n][s]:>8.4f}   {f'[{d}, {d + n})':<16}   {a.drop_loss[n][d]:>8.4f}")
    return "\n".join(lines)


def plot(a: Analysis, path: Path) -> bool:
    """layers.png: d(l, n) for every (l, n), the best block per n marked. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    L = a.num_layers
    grid = np.full((L, L), np.nan)
    for n, row in enumerate(a.distance, 1):
        for l0, v in enumerate(row):
            grid[n - 1, l0] = v
    fig, ax = plt.subplots(figsize=(6.5, 5))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    for n, s in a.best_block.items():
        ax.plot(s, n - 1, "r.", ms=6, label="min d(l, n)" if n == 1 else None)
    for n, s in a.best_block_by_loss().items():
        ax.plot(
            s, n - 1, marker="X", color="white", mec="black", ls="", ms=8, label="least held-out loss" if n == min(a.drop_loss) else None
        )
    ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("first layer of the block (l)")
    ax.set_ylabel("block size (n)")
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(n) for n in range(1, L + 1)])
    ax.set_title(f"angular distance d(l, n), last token: {Path(a.model).name}")
    fig.colorbar(im, ax=ax, label="arccos(cos) / pi")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report_reads(models: list[str | Path], files: list[str], cache_dir: str | Path | None = None) -> dict[str, list[Path]]:
    """What `analyze` reads, for the output-folder protocol: each model's folder, every data file
    (globs expanded, and the folder each starts from), the token cache."""
    from surgery.io.checkpoint import resolve_ref
    from surgery.data.sources import data_paths
    from surgery.data.tokens import default_cache_dir

    reads: dict[str, list[Path]] = {"a model being analysed": [], "a data file": []}
    for m in models:
        if m is None or not str(m).strip() or "\0" in str(m):
            continue
        try:
            reads["a model being analysed"].append(resolve_ref(str(m), Path.cwd()))
        except SurgeryError:
            reads["a model being analysed"].append(Path(str(m)))
    reads["a data file"] = data_paths(files, Path.cwd())  # as `analyze` reads them: relative to the cwd
    reads["the token cache"] = [Path(cache_dir) if cache_dir else default_cache_dir()]
    return reads


def check_report_target(folder: str | Path, reads: dict, force: bool = False) -> Path:
    """Refuse a report folder before any work is done: an existing one without --force, or one that
    is or holds anything the analysis reads (the model, --against, the data)."""
    from surgery.io.outdir import OutputFolder, output_path

    out = output_path(folder)
    with OutputFolder(out, force=force, reads=reads) as f:
        f.check_target()
    return out


def write_report(a: Analysis, folder: Path, *, reads: dict, force: bool = False, extra: dict | None = None, plans=()) -> list[Path]:
    """analysis.json, analysis.txt, layers.png and one plan file per suggestion (`suggest-drop-4.yaml`)
    into `folder`, through the output-folder protocol, never over anything in `reads`."""
    from surgery.io.outdir import OutputFolder, atomic_write, output_path

    out = output_path(folder)
    with OutputFolder(out, force=force, reads=reads) as f:
        f.check_target()
        staging = f.fresh_staging()
        atomic_write(staging / "analysis.json", json.dumps(extra or a.as_dict(), indent=2) + "\n")
        (staging / "analysis.txt").write_text(text_report(a) + "\n")
        for what, text, _why in plans:
            atomic_write(staging / f"suggest-{what.replace(':', '-')}.yaml", text)
        plot(a, staging / "layers.png")
        f.publish()
    return sorted(out.iterdir())


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _angle(u, v):
    """arccos(u . v) / pi for unit vectors, as 2 atan2(|u - v|, |u + v|) / pi: stable near 0 and pi
    (arccos of a cosine rounded to 1 - 1e-16 would give 1e-8, not 0, for two equal states)."""
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="layers", unit="layer", dynamic_ncols=True)
