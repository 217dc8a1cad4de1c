"""LiGO's width operator (surgery.train.ligo has the method): one expansion per kind of unit, in the
paper's tied [I; R] variant (`learn`) or ours, untied and started at the plan's split (`learn-split`)."""

from __future__ import annotations

import math

from surgery.errors import PlanError


class Width:
    """LiGO's width operator: (A, B) per kind of unit, started at the plan's split."""

    def __init__(
        self, fam, small_cfg: dict, grown_cfg: dict, tied: bool, where: str, shares: str = "even", seed: int = 0, paper: bool = False
    ):
        import torch

        from surgery.merge import split_shares

        self.fam, self.tied, self.where, self.paper = fam, tied, where, paper
        sc, gc = fam.lm_config(small_cfg), fam.lm_config(grown_cfg)
        h, h2 = sc.get(fam.hidden_key), gc.get(fam.hidden_key)
        a, a2 = sc.get(fam.heads_key), gc.get(fam.heads_key)
        k = (sc.get(fam.kv_heads_key) if fam.kv_heads_key else None) or a
        k2 = (gc.get(fam.kv_heads_key) if fam.kv_heads_key else None) or a2
        d = fam.head_size(gc)
        inter, inter2 = fam.mlp_size(sc), fam.mlp_size(gc)
        self.d = d
        self.blk = 1 if paper else d  # query/key/value expansions act on rows (the paper's) or whole heads (ours)
        gen = torch.Generator().manual_seed(seed)
        self.scale = math.sqrt(h / h2) if fam.embed_scaled and h and h2 else 1.0  # Gemma's sqrt(hidden) embedding scale
        self.A: dict = {}
        self.B: dict = {}
        self.aliases: dict = {}  # the model's parameter name -> the checkpoint's, where transformers renames (NeoX's embed_out)

        def split(kind: str, old, new, src=None, share_kind: str = ""):
            if not (isinstance(old, int) and isinstance(new, int)) or new == old:
                return
            if paper:  # [I; R], R ~ N(0, 1/new), one matrix for both sides (prts' init)
                A = torch.cat([torch.eye(old), torch.randn(new - old, old, generator=gen) * math.sqrt(1.0 / new)])
                self.A[kind] = torch.nn.Parameter(A)
                self.B[kind] = self.A[kind]
                return
            src = src or [j % old for j in range(new)]
            share = split_shares(src, old, shares, seed, share_kind)  # the plan's own shares: step 0 is its output
            A = torch.zeros(new, old, dtype=torch.float32)
            B = torch.zeros(new, old, dtype=torch.float32)
            for j, i in enumerate(src):
                A[j, i], B[j, i] = 1.0, share[j]
            self.A[kind], self.B[kind] = torch.nn.Parameter(A), torch.nn.Parameter(B)

        split("stream", h, h2, share_kind="stream")
        split("mlp", inter, inter2, share_kind=f"mlp:{fam.intermediate_key}")
        if paper and isinstance(a, int) and isinstance(a2, int) and a2 != a and isinstance(k, int) and isinstance(k2, int):
            split("q", a * d, a2 * d)
            split("k", k * d, k2 * d)
            split("v", k * d, k2 * d)
        elif isinstance(a, int) and isinstance(a2, int) and a2 != a and isinstance(k, int) and k and a % k == 0:
            g = a // k
            kv_src = [j % k for j in range(k2)]
            split("q", a, a2, [kv_src[x // g] * g + x % g for x in range(a2)], "heads")
            split("k", k, k2, kv_src)  # key/value heads are read by the attention itself: their B is unused
            split("v", k, k2, kv_src)

    def parameters(self) -> list:
        return list({id(m): m for m in [*self.A.values(), *self.B.values()]}.values())  # tied: each once

    def _sides(self):
        return (("A", self.A),) if self.paper else (("A", self.A), ("B", self.B))

    def initial(self) -> dict:
        return {f"{side}:{kind}": m.detach().clone() for side, ms in self._sides() for kind, m in ms.items()}

    def load(self, values: dict) -> None:
        for key, v in values.items():
            side, kind = key.split(":")
            (self.A if side == "A" else self.B)[kind].data.copy_(v)

    def _along(self, x, dim: int, M, block: int = 1):
        """M (x) I_block applied along `dim` of x."""
        import torch

        y = x.movedim(dim, 0)
        rest = y.shape[1:]
        y = torch.einsum("ba,adr->bdr", M, y.reshape(M.shape[1], block, -1))
        return y.reshape((M.shape[0] * block,) + tuple(rest)).movedim(0, dim)

    def expand(self, name: str, x, want_shape: tuple, suffix: str | None):
        """R(x) for the small model's parameter `name` (`suffix`: its name inside a layer, or None)."""
        if not self.A:
            return x
        import torch

        fam = self.fam
        A, B = self.A, self.B
        y = x
        plus = fam.norm_plus_one
        if suffix is not None:
            role = fam.mlp_role(suffix)
            if role is not None and "mlp" in A:
                kind, dim, parts = role  # gate|up fused: each half on its own
                y = self._split_parts(y, dim, A["mlp"] if kind == "in" else B["mlp"], parts)
            hrole = fam.hidden_role(suffix)
            if hrole is not None and "stream" in A:
                kind, dim = hrole
                y = self._along(y, dim, A["stream"] if kind == "out" else B["stream"])
            entry = fam.attention_entry(suffix)
            if entry is not None and "q" in A:
                role_, hdim = entry
                at = 0 if hdim is None else hdim
                d = self.blk
                if role_ == "q":
                    y = self._along(y, at, A["q"], d)
                elif role_ == "k":
                    y = self._along(y, at, A["k"], d)
                elif role_ == "v":
                    y = self._along(y, at, A["v"], d)
                elif role_ == "qkv":
                    n_q, n_kv = A["q"].shape[1] * d, A["k"].shape[1] * d
                    q, k_, v = y.split([n_q, n_kv, n_kv], dim=at)
                    y = torch.cat([self._along(q, at, A["q"], d), self._along(k_, at, A["k"], d), self._along(v, at, A["v"], d)], dim=at)
                elif role_ == "qkv_per_head":  # [head][q|k|v][head size] along `at`
                    y = self._per_head(y, at)
                elif role_ == "o":  # reads the value units (the paper's, where there are as many as query units) or the query heads
                    M = B["v"] if self.paper and B["v"].shape == B["q"].shape else B["q"]
                    y = self._along(y, 1 if hdim is None else hdim, M, d)
            if hrole is None and role is None and entry is None and fam.is_norm(suffix) and "stream" in A and x.dim() == 1:
                if x.shape[0] == A["stream"].shape[1]:
                    gain = not suffix.endswith(".bias")
                    y = self._gain(x, A["stream"], plus and gain)
        elif "stream" in A:
            name = self.aliases.get(name, name)
            if name in fam.embeddings or name in fam.position_embeddings:
                y = self._along(x, 1, A["stream"])
                if name in fam.embeddings and self.scale != 1.0:
                    y = y * self.scale
            elif name == fam.lm_head:
                y = self._along(x, 1, B["stream"])
            elif name == fam.final_norm or (fam.final_norm_bias and name == fam.final_norm_bias):
                gain = name == fam.final_norm
                if not self.tied:
                    y = self._gain(x, A["stream"], plus and gain)
                else:  # logits = E' n': E' copies (and scales) the embedding, so the final norm carries the division
                    y = self._gain(x, B["stream"], plus and gain, 1.0 / self.scale)
        if tuple(y.shape) != tuple(want_shape):
            raise PlanError(
                f"grow.operator learn: the width operator does not describe {name} ({list(x.shape)} -> {list(want_shape)}) "
                f"of this {fam.name} model",
                where=self.where,
                fix="learn a depth operator only (grow without `widen`), or operator: plan",
            )
        return y

    def _per_head(self, y, at: int):
        """A fused per-head q|k|v tensor (GPT-NeoX): each part expanded by its own matrix."""
        import torch

        d = self.d
        if not self.paper:
            return self._along(y, at, self.A["q"], 3 * d)
        x = y.movedim(at, 0)
        heads = x.shape[0] // (3 * d)
        parts = x.reshape(heads, 3, d, *x.shape[1:])
        grown = [self._along(parts[:, i].reshape(heads * d, *x.shape[1:]), 0, self.A[kind]) for i, kind in enumerate("qkv")]
        heads2 = grown[0].shape[0] // d
        out = torch.stack([g.reshape(heads2, d, *x.shape[1:]) for g in grown], dim=1)
        return out.reshape(heads2 * 3 * d, *x.shape[1:]).movedim(0, at)

    def _split_parts(self, x, dim: int, M, parts: int):
        if parts == 1:
            return self._along(x, dim, M)
        import torch

        return torch.cat([self._along(c, dim, M) for c in x.chunk(parts, dim=dim)], dim=dim)

    def _gain(self, g, M, plus_one: bool, factor: float = 1.0):
        """A norm's gain (or bias) grown by M; Gemma's stored w of a 1 + w gain grows as the gain."""
        if plus_one:
            return (M @ (1.0 + g)) * factor - 1.0
        return (M @ g) * factor

    def record(self, start: dict) -> dict:
        """Each matrix's shape and relative distance from where it started (the split)."""
        out = {}
        for key, m0 in start.items():
            side, kind = key.split(":")
            m = (self.A if side == "A" else self.B)[kind].detach()
            out[key] = {"shape": list(m.shape), "moved": float((m - m0).norm() / m0.norm())}
            if self.paper:
                out[key]["tied"] = True  # the in-expansion is this matrix too
        return out
