"""G_learn in depth: LiGO's learned depth-growth operator (Wang et al. 2023, "Learning to Grow
Pretrained Models for Efficient Transformer Training", ICLR; the Gstack paper's G_learn).

Each parameter of the grown model's layer l is a learned linear combination of the same parameter
of the small model's layers, one combination matrix per parameter type (q_proj, k_proj, ..., each
norm):

    W^{grown}_{l, t} = sum_j  D_t[l, j] * W^{small}_{j, t},      D_t in R^{L_grown x L_small}

The small model's weights stay frozen; only the D_t train, on the training loss of the grown model
whose weights they produce, for `learn_steps` steps. D_t starts at the growth plan's own choice (a
layer copied from small layer j: row l is the one-hot e_j; an identity block (LLaMA Pro): e_j, with
the rows of the output projections zero), so step 0 is the plan's grown model exactly, and learning
can only move from there. Then the grown weights W^{grown} = D W^{small} are written over the plan's
output (a plain checkpoint) and recorded in its surgery.json, and training continues on it.

Width growth with learned expansion matrices (LiGO's B, shared across layers) is not implemented:
`operator: learn` takes a depth plan (its layers copies or identity blocks of the small model's).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from surgery.errors import PlanError


def _operator_init(layer_map: list, n_small: int, types: list[str], out_re: re.Pattern, where: str):
    """{type: D_t init} from the plan's layer map."""
    import torch

    D = {t: torch.zeros(len(layer_map), n_small, dtype=torch.float64) for t in types}
    for row in layer_map:
        srcs = row.get("sources") or []
        made = row.get("made")
        if made not in ("copy", "identity") or len(srcs) != 1:
            raise PlanError(
                f"grow.operator learn: layer {row.get('layer')} of the grown model is made by {made!r} from {len(srcs)} sources; "
                "LiGO's depth operator starts from layers that are copies (stack, dus, take) or identity blocks of the small model's",
                where=where,
                fix="use a depth plan of copies (e.g. stack: {times: 4}), or operator: plan",
            )
        j = int(srcs[0][1])
        for t in types:
            if made == "identity" and out_re.fullmatch(t):
                continue  # an identity block's output projections start at zero
            D[t][int(row["layer"]), j] = 1.0
    return D


def learn_depth(
    small_dir: Path,
    grown_dir: Path,
    batches,
    *,
    steps: int,
    lr: float,
    where: str,
    echo=print,
) -> dict:
    """Learn D_t for `steps` steps on `batches` (an iterator of {input_ids, labels} dicts), then write
    the grown weights D W^small into `grown_dir`'s safetensors and record the operator in its
    surgery.json. Returns the record (losses before and after, the learned matrices)."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    from surgery.io.checkpoint import open_checkpoint

    fam = open_checkpoint("grown", str(grown_dir), grown_dir).family
    prov_path = grown_dir / "surgery.json"
    prov = json.loads(prov_path.read_text())
    layer_map = prov["layer_map"]
    small = transformers.AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32, trust_remote_code=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(grown_dir, dtype=torch.float32, trust_remote_code=False)
    model.config.use_cache = False
    model.eval()  # no dropout: the operator learns the function, not a noise pattern
    prefix = fam.layer_prefix
    pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    small_sd = dict(small.named_parameters())
    n_small = small.config.num_hidden_layers
    stacks: dict = {}  # type -> [n_small, *shape] of the small model's frozen weights
    for name, p in small_sd.items():
        m = pat.fullmatch(name)
        if m:
            stacks.setdefault(m.group(2), [None] * n_small)[int(m.group(1))] = p.detach()
    types = sorted(stacks)
    stacked = {t: torch.stack(v) for t, v in stacks.items()}
    out_re = re.compile("|".join(f"(?:{p})" for p in fam.output_projections) or "(?!)")
    D0 = _operator_init(layer_map, n_small, types, out_re, where)
    D = {t: torch.nn.Parameter(D0[t].float().clone()) for t in types}
    grown_names = [n for n, _ in model.named_parameters()]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not pat.fullmatch(n)}
    for p in model.parameters():
        p.requires_grad_(False)

    def params():
        out = dict(fixed)
        for t in types:
            w = torch.einsum("lj,j...->l...", D[t], stacked[t])
            for layer in range(w.shape[0]):
                out[f"{prefix}{layer}.{t}"] = w[layer]
        missing = set(grown_names) - set(out)
        if missing:
            raise PlanError(f"grow.operator learn: no operator for {sorted(missing)[0]}", where=where)
        return out

    def loss(batch):
        return torch.func.functional_call(model, params(), (), {"input_ids": batch["input_ids"], "labels": batch["labels"]}).loss

    opt = torch.optim.AdamW(list(D.values()), lr=lr, weight_decay=0.0)
    losses, seen = [], []
    it = iter(batches)
    for _ in range(steps):
        batch = next(it)
        seen.append(batch)
        value = loss(batch)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    with torch.no_grad():
        # the operator's own training loss, on the batches it learned from: with the learned operator,
        # and with the one it started from (the plan's grown model)
        after = sum(loss(b_).item() for b_ in seen) / max(1, len(seen))
        learned = {t: D[t].detach().clone() for t in types}
        for t in types:
            D[t].copy_(D0[t].float())
        before = sum(loss(b_).item() for b_ in seen) / max(1, len(seen))
        for t in types:
            D[t].copy_(learned[t])
        final = {n: v.detach().contiguous() for n, v in params().items()}
    if not math.isfinite(after) or not all(bool(torch.isfinite(v).all()) for v in final.values()):
        # the same rule as training: a diverged operator is an error, never written
        raise PlanError(
            f"learning the growth operator diverged (its loss went from {before:.4f} to {after}); nothing was written",
            where=where,
            fix=f"lower grow.learn_lr (now {lr:g}) or learn_steps",
        )
    # write the learned weights over the plan's output, in its own dtype, shard by shard
    dtype_of: dict = {}
    for f in sorted(grown_dir.glob("*.safetensors")):
        sd = load_file(f)
        for n, v in sd.items():
            dtype_of[n] = v.dtype
            if pat.fullmatch(n) and n in final:
                sd[n] = final[n].to(v.dtype)
        save_file(sd, f, metadata={"format": "pt"})
    record = {
        "operator": "learn",
        "paper": "LiGO (Wang et al. 2023), depth operator",
        "steps": steps,
        "lr": lr,
        "loss_before": before,  # mean over the learning batches, with the plan's operator
        "loss_after": after,  # the same batches, with the learned operator
        "losses": [round(x, 6) for x in losses],  # each step's batch, as it trained
        "matrices": {t: D[t].detach().tolist() for t in types},  # float32 values, exactly
    }
    prov["growth_operator"] = record
    _refresh_checksums(grown_dir, prov)
    prov_path.write_text(json.dumps(prov, indent=2) + "\n")
    echo(
        f"learned the growth operator (LiGO, depth) for {steps} steps: training loss on its batches {before:.4f} "
        f"with the plan's operator -> {after:.4f} learned"
    )
    return record


def _refresh_checksums(folder: Path, prov: dict) -> None:
    """The shards changed: record their new sizes, header hashes and CRC-32 in surgery.json's record."""
    from surgery.io.safetensors import file_crc32, header_sha256

    for shard in prov.get("output", {}).get("shards", []):
        f = folder / shard["name"]
        shard.update(bytes=f.stat().st_size, header_sha256=header_sha256(f), crc32=file_crc32(f))
