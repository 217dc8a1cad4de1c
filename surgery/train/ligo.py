"""G_learn: LiGO's learned growth operator (Wang et al. 2023, "Learning to Grow Pretrained Models for
Efficient Transformer Training", ICLR; the Gstack paper's G_learn), in depth and in width.

LiGO writes the grown model's parameters as a linear map of the small model's, factorised into a
width operator and a depth operator (its eq. for Theta_new = L_depth(R_width(Theta))).

Depth. Each parameter of the grown model's layer l is a learned linear combination of the same
parameter (already widened) of the small model's layers, one combination matrix per parameter type:

    W^{grown}_{l, t} = sum_j  D_t[l, j] * R(W^{small}_{j, t}),      D_t in R^{L_grown x L_small}

Width. A matrix reading units of kind a and writing units of kind b grows as

    R(W) = A_b W B_a^T,      A_b in R^{n'_b x n_b} (out-expansion), B_a in R^{n'_a x n_a} (in-expansion)

with one pair per kind of unit, shared by every layer (the residual stream: embeddings, what
writes and reads it, every norm's gain; the MLP's units; query, key and value units), applied per
part of a fused tensor (gate|up, q|k|v). A norm's gain grows as A g (Gemma's 1 + w: as a gain), a
bias with its matrix's out-side. Two variants:

- `learn` (the paper's, as its code tongxuluo/prts `scaling/ligo.py` writes it): B_a = A_a, tied
  (an in-expansion is the out-expansion of what produced the input; the attention output reads the
  value units), each A = [I; R] started with the old units kept and new ones random,
  R ~ N(0, 1/n'), on rows (query, key and value units one by one, as prts' BQ/BK/BV); the grown
  model does not start at the small model's function, and learning finds one.
- `learn-split` (ours): A and B separate, started exactly at the plan's split (A the copy matrix,
  B the same with each copy's share of what reads its unit, 1/copies or the plan's `shares:
  random`), heads as whole heads (A = H (x) I_d, so rotary position embeddings commute with it).
  A tied operator cannot express the function-preserving split, whose in-side divides what the
  out-side copies; untied, step 0 is the plan's grown model and learning can only move from there.

Depth is the same in both: D started at the plan's layer map (stacking's [I; I; ...] for `stack`,
as prts starts it; an identity block's output projections at zero).

The small model's weights stay frozen; only D, A and B train, on the training loss of the grown
model whose weights they produce, for `learn_steps` steps. Then R and D are materialised: the grown
weights are written over the plan's output (a plain checkpoint) and the operator is recorded in its
surgery.json (D exactly; the width matrices by their size and distance from the split).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from surgery.errors import PlanError
from surgery.train.ligo_width import Width


def check_learnable(layer_map: list, widened: dict, where: str, operator: str = "learn-split") -> None:
    """A plan LiGO can start from: its layers copies (or identity blocks) of the small model's, and
    for `learn-split` a `widen` by splitting (`learn` takes only the widened shapes from the plan).
    Checked before any training (`surgery train` compiles the grow plan)."""
    _operator_init(layer_map, 1 + max((int(s[1]) for r in layer_map for s in r.get("sources") or []), default=0), [], None, where)
    if operator == "learn-split" and widened and widened.get("init") != "split":
        raise PlanError(
            f"grow.operator learn: the plan widens with init {widened.get('init')!r}; LiGO's width operator starts from the "
            "split (copied units, what reads them divided)",
            where=where,
            fix="use widen with init: split (the default), or operator: learn (the paper's: only the plan's shapes are used)",
        )


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


def learn_growth(
    small_dir: Path,
    grown_dir: Path,
    batches,
    *,
    steps: int,
    lr: float,
    where: str,
    echo=print,
    variant: str = "split",
    seed: int = 0,
) -> dict:
    """Learn LiGO's operator (depth D_t, and width (A, B) when the plan widens) for `steps` steps on
    `batches` (an iterator of {input_ids, labels} dicts), then write the grown weights into
    `grown_dir`'s safetensors and record the operator in its surgery.json. `variant`: "paper" (the
    Gstack paper's code: tied [I; R] width expansions, R seeded by `seed`) or "split" (ours: untied,
    started at the plan's split). Returns the record (losses before and after, the depth matrices,
    the width matrices' distance from where they started)."""
    if variant not in ("paper", "split"):
        raise ValueError(f"variant {variant!r}: 'paper' or 'split'")
    from surgery.io.provenance import read_provenance

    checked = read_provenance(grown_dir, required=True, where=where)
    check_learnable(checked.layer_map_dicts(), checked.widened_dict(), where, "learn" if variant == "paper" else "learn-split")
    op = _Operator(Path(small_dir), Path(grown_dir), checked, where, variant, seed)
    losses, seen = op.learn(batches, steps, lr)
    before, after, final = op.evaluate(seen)
    if not math.isfinite(after) or not all(bool(v.isfinite().all()) for v in final.values()):
        # the same rule as training: a diverged operator is an error, never written
        raise PlanError(
            f"learning the growth operator diverged (its loss went from {before:.4f} to {after}); nothing was written",
            where=where,
            fix=f"lower grow.learn_lr (now {lr:g}) or learn_steps",
        )
    op.write(final)
    width = op.width
    record = {
        "operator": "learn" if variant == "paper" else "learn-split",
        "paper": "LiGO (Wang et al. 2023), depth"
        + (" and width" if width.A else "")
        + " operator"
        + (", as the Gstack paper's code (tongxuluo/prts) has it" if variant == "paper" else ", untied, from the plan's split"),
        "steps": steps,
        "lr": lr,
        "loss_before": before,  # mean over the learning batches, with the plan's operator
        "loss_after": after,  # the same batches, with the learned operator
        "losses": [round(x, 6) for x in losses],  # each step's batch, as it trained
        "matrices": {t: op.D[t].detach().tolist() for t in op.types},  # float32 values, exactly
    }
    if width.A:
        record["width"] = width.record(op.W0)
    prov = checked.record()
    prov["growth_operator"] = record
    _refresh_checksums(grown_dir, prov)
    (grown_dir / "surgery.json").write_text(json.dumps(prov, indent=2) + "\n")
    echo(
        f"learned the growth operator (LiGO, {'depth and width' if width.A else 'depth'}) for {steps} steps: training loss on its "
        f"batches {before:.4f} with the plan's operator -> {after:.4f} learned"
    )
    return record


class _Operator:
    """LiGO's operator between a small model and the plan's grown one: the depth matrices D (one per
    parameter type) and the width expansions, the grown parameters they produce, their loss."""

    def __init__(self, small_dir: Path, grown_dir: Path, checked, where: str, variant: str, seed: int):
        import torch
        import transformers

        from surgery.io.checkpoint import open_checkpoint

        grown_ck = open_checkpoint("grown", str(grown_dir), grown_dir)
        fam = grown_ck.family
        self.grown_dir, self.where = grown_dir, where
        layer_map, widened = checked.layer_map_dicts(), checked.widened_dict()
        small = transformers.AutoModelForCausalLM.from_pretrained(small_dir, dtype=torch.float32, trust_remote_code=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(grown_dir, dtype=torch.float32, trust_remote_code=False)
        model.config.use_cache = False
        model.eval()  # no dropout: the operator learns the function, not a noise pattern
        self.model = model
        self.width = Width(
            fam,
            json.loads((small_dir / "config.json").read_text()),
            json.loads((grown_dir / "config.json").read_text()),
            grown_ck.tied,
            where,
            widened.get("shares", "even"),
            seed if variant == "paper" else int(widened.get("seed", 0)),
            paper=variant == "paper",
        )
        self._alias_embeddings(fam)
        self.prefix = prefix = fam.layer_prefix
        self.pat = pat = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
        self.grown_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        n_small = small.config.num_hidden_layers
        self.stacks: dict = {}  # type -> [n_small] of the small model's frozen weights
        self.others: dict = {}  # embeddings, final norm, head
        for name, p in small.named_parameters():
            m = pat.fullmatch(name)
            if m:
                self.stacks.setdefault(m.group(2), [None] * n_small)[int(m.group(1))] = p.detach()
            else:
                self.others[name] = p.detach()
        self.types = types = sorted(self.stacks)
        out_re = re.compile("|".join(f"(?:{p})" for p in fam.output_projections) or "(?!)")
        self.D0 = _operator_init(layer_map, n_small, types, out_re, where)
        self.D = {t: torch.nn.Parameter(self.D0[t].float().clone()) for t in types}
        missing = set(self.grown_shapes) - {f"{prefix}{r['layer']}.{t}" for r in layer_map for t in types} - set(self.others)
        if missing:
            raise PlanError(f"grow.operator learn: no operator for {sorted(missing)[0]}", where=where)
        self.layer_shape = {t: self.grown_shapes[f"{prefix}0.{t}"] for t in types}
        for p in model.parameters():
            p.requires_grad_(False)
        self.W0 = self.width.initial()
        with torch.no_grad():
            self.params()  # every parameter described (or a located refusal) before any learning

    def _alias_embeddings(self, fam) -> None:
        """Where transformers names the embedding or head otherwise than the checkpoint does (NeoX's embed_out)."""
        model = self.model
        name_of = {id(p): n for n, p in model.named_parameters()}
        emb_in = getattr(model.get_input_embeddings(), "weight", None)
        emb_out = getattr(model.get_output_embeddings(), "weight", None)
        for weight, ckpt_names in ((emb_in, list(fam.embeddings)), (emb_out, [fam.lm_head])):
            n = name_of.get(id(weight))
            tied_head = weight is emb_out and emb_out is emb_in  # a tied head is the embedding itself
            if n is not None and ckpt_names and n not in ckpt_names and not tied_head:
                self.width.aliases[n] = ckpt_names[0]

    def params(self) -> dict:
        """The grown model's parameters (by the model's names) as the operator makes them."""
        import torch

        width, prefix = self.width, self.prefix
        out = {n: width.expand(n, v, self.grown_shapes[n], None) for n, v in self.others.items() if n in self.grown_shapes}
        for t in self.types:
            wide = torch.stack([width.expand(f"{prefix}{j}.{t}", w, self.layer_shape[t], t) for j, w in enumerate(self.stacks[t])])
            w = torch.einsum("lj,j...->l...", self.D[t], wide)
            for layer in range(w.shape[0]):
                out[f"{prefix}{layer}.{t}"] = w[layer]
        return out

    def loss(self, batch):
        import torch

        args = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
        return torch.func.functional_call(self.model, self.params(), (), args).loss

    def learn(self, batches, steps: int, lr: float) -> tuple[list, list]:
        """`steps` AdamW steps on D and the width expansions: (each step's loss, the batches seen)."""
        import torch

        opt = torch.optim.AdamW(list(self.D.values()) + self.width.parameters(), lr=lr, weight_decay=0.0)
        losses, seen = [], []
        it = iter(batches)
        for _ in range(steps):
            batch = next(it)
            seen.append(batch)
            value = self.loss(batch)
            opt.zero_grad()
            value.backward()
            opt.step()
            losses.append(value.item())
        return losses, seen

    def evaluate(self, seen: list) -> tuple[float, float, dict]:
        """The operator's own training loss on the batches it learned from, with the operator it started
        from (the plan's grown model) and with the learned one; the learned weights by checkpoint name."""
        import torch

        D, width = self.D, self.width
        with torch.no_grad():
            after = sum(self.loss(b_).item() for b_ in seen) / max(1, len(seen))
            learned = {t: D[t].detach().clone() for t in self.types}
            learned_w = {k: (width.A if k[0] == "A" else width.B)[k[2:]].detach().clone() for k in self.W0}
            for t in self.types:
                D[t].copy_(self.D0[t].float())
            width.load(self.W0)
            before = sum(self.loss(b_).item() for b_ in seen) / max(1, len(seen))
            for t in self.types:
                D[t].copy_(learned[t])
            width.load(learned_w)
            final = {width.aliases.get(n, n): v.detach().contiguous() for n, v in self.params().items()}
        return before, after, final

    def write(self, final: dict) -> None:
        """The learned weights over the plan's output, in its own dtype, shard by shard."""
        from safetensors.torch import load_file, save_file

        for f in sorted(self.grown_dir.glob("*.safetensors")):
            sd = load_file(f)
            for n, v in sd.items():
                if n in final and (self.pat.fullmatch(n) or self.width.A):
                    sd[n] = final[n].to(v.dtype)
                elif self.width.A and n not in final:
                    raise PlanError(f"grow.operator learn: the grown checkpoint's {n} is not a parameter of the model", where=self.where)
            save_file(sd, f, metadata={"format": "pt"})


def _refresh_checksums(folder: Path, prov: dict) -> None:
    """The shards changed: record their new sizes, header hashes and CRC-32 in surgery.json's record."""
    from surgery.io.safetensors import file_crc32, header_sha256

    for shard in prov.get("output", {}).get("shards", []):
        f = folder / shard["name"]
        shard.update(bytes=f.stat().st_size, header_sha256=header_sha256(f), crc32=file_crc32(f))
