"""Recipes: how each output tensor is made. Immutable, hashable, and free of tensor data.

The compiler turns a plan into one recipe per output tensor; the engine evaluates them. Every
recipe is elementwise over the flattened tensor except `Slerp`, whose two whole-tensor
statistics (norms and dot product) the engine gathers in a first chunked pass; so any output
tensor can be produced in fixed-size chunks and memory never depends on the model's size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Optional

from surgery.io.safetensors import TensorInfo


@dataclass(frozen=True)
class Recipe:
    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # type: ignore[attr-defined]

    @property
    def nbytes(self) -> int:
        from surgery.io.safetensors import itemsize

        return self.numel * itemsize(self.dtype)  # type: ignore[attr-defined]

    whole_tensor = False  # True: needs whole input tensors at once (not chunkable)

    def children(self) -> tuple["Recipe", ...]:
        """The recipes this one is made from."""
        return ()

    def inputs(self) -> tuple[TensorInfo, ...]:
        """The source tensors this recipe reads."""
        return tuple(i for c in self.children() for i in c.inputs())

    def needs_whole(self) -> bool:
        return any(r.whole_tensor for r in leaves(self))


@dataclass(frozen=True)
class Read(Recipe):
    """A source tensor as it is. With an unchanged dtype the engine copies its bytes raw."""

    src: TensorInfo
    model: str

    @property
    def dtype(self) -> str:
        return self.src.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    def inputs(self):
        return (self.src,)

    def describe(self) -> str:
        return f"copy {self.model}:{self.src.name}"


@dataclass(frozen=True)
class Zeros(Recipe):
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class Unary(Recipe):
    """A recipe applied elementwise to one other recipe's output."""

    inner: Recipe

    @property
    def shape(self):
        return self.inner.shape

    def children(self):
        return (self.inner,)


@dataclass(frozen=True)
class Cast(Unary):
    dtype: str

    def describe(self) -> str:
        return f"{self.inner.describe()} as {self.dtype}"


@dataclass(frozen=True)
class Scale(Unary):
    factor: float

    @property
    def dtype(self):
        return self.inner.dtype

    def describe(self) -> str:
        return f"{self.factor:g} x ({self.inner.describe()})"


@dataclass(frozen=True)
class Linear(Recipe):
    """sum_i w_i x_i (divided by sum_i w_i when normalize), accumulated in float32 (float64 for
    float64 inputs) in input order, stored in the first input's dtype: mergekit 0.1.5's formula."""

    terms: tuple[Recipe, ...]
    weights: tuple[float, ...]
    normalize: bool

    @property
    def shape(self):
        return self.terms[0].shape

    @property
    def dtype(self):
        return self.terms[0].dtype

    def children(self):
        return self.terms

    def describe(self) -> str:
        parts = " + ".join(f"{w:g}*{t.describe().removeprefix('copy ')}" for w, t in zip(self.weights, self.terms, strict=True))
        return f"linear({parts}{', normalized' if self.normalize else ''})"


@dataclass(frozen=True)
class Slerp(Recipe):
    """Spherical interpolation from `a` (t=0) to `b` (t=1) with whole-tensor normalisation; plain
    lerp when |cos| > 0.9995; a norm <= 1e-8 is taken as 1. Stored in `a`'s dtype (mergekit 0.1.5)."""

    a: Recipe
    b: Recipe
    t: float

    @property
    def shape(self):
        return self.a.shape

    @property
    def dtype(self):
        return self.a.dtype

    def children(self):
        return (self.a, self.b)

    def describe(self) -> str:
        return f"slerp({self.a.describe().removeprefix('copy ')}, {self.b.describe().removeprefix('copy ')}, t={self.t:g})"


@dataclass(frozen=True)
class Nuslerp(Recipe):
    """mergekit 0.1.5's nuslerp, computed on whole tensors in the inputs' dtype like mergekit:
    t = w1 / (w0 + w1) (0.5 when the sum is ~0); with a base, slerp of the two task vectors."""

    a: Recipe
    b: Recipe
    base: Optional[Recipe]
    weights: tuple[float, float]
    row_wise: bool
    flatten: bool

    whole_tensor = True

    @property
    def shape(self):
        return self.a.shape

    @property
    def dtype(self):
        return self.a.dtype

    def children(self):
        return (self.a, self.b) + ((self.base,) if self.base is not None else ())

    def describe(self) -> str:
        return f"nuslerp({self.a.describe().removeprefix('copy ')}, {self.b.describe().removeprefix('copy ')}, weights={self.weights})"


@dataclass(frozen=True)
class External(Recipe):
    """A merge computed by a plugin's kernel on whole tensors (e.g. mergekit's ties)."""

    method: str
    terms: tuple[Recipe, ...]
    ids: tuple[str, ...]
    base_index: Optional[int]
    shared: tuple  # ((name, value), ...)
    per_input: tuple  # (((name, value), ...), ...) per input
    name: str
    dtype: str
    seed: Optional[int] = None
    where: Optional[str] = field(default=None, compare=False, hash=False)  # the merge step's plan line, for errors

    whole_tensor = True

    @property
    def shape(self):
        return self.terms[0].shape

    def children(self):
        return self.terms

    def describe(self) -> str:
        return f"{self.method}({', '.join(t.describe().removeprefix('copy ') for t in self.terms)})"


@dataclass(frozen=True)
class VocabPermute(Recipe):
    """Model `index`'s token-indexed tensor realigned to a merged vocabulary (rows = tokens).
    The realignment needs every model's tensor (a token missing from one model may be filled
    from the others), so all are inputs; `merger` is the tokenizer plugin's object."""

    terms: tuple[Recipe, ...]
    ids: tuple[str, ...]
    index: int
    rows: int
    merger: object = field(compare=False, hash=False, repr=False)

    whole_tensor = True

    @property
    def shape(self):
        return (self.rows,) + tuple(self.terms[self.index].shape[1:])

    @property
    def dtype(self):
        return self.terms[self.index].dtype

    def children(self):
        return self.terms

    def describe(self) -> str:
        return f"{self.terms[self.index].describe()} realigned to the merged vocabulary ({self.rows} tokens)"


@dataclass(frozen=True)
class RandomNormal(Recipe):
    """N(0, std) from a seed and the output tensor's name, generated in fixed blocks of
    `BLOCK` elements so the values do not depend on how the engine chunks its work."""

    shape: tuple[int, ...]
    dtype: str
    std: float
    seed: int
    key: str

    BLOCK = 1 << 20

    def block_seed(self, block: int) -> int:
        h = hashlib.sha256(f"{self.seed}:{self.key}:{block}".encode()).digest()
        return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)

    def describe(self) -> str:
        return f"normal(0, {self.std:g}), seed {self.seed}"


@dataclass(frozen=True)
class PromptRouter(Unary):
    """A router initialised from prompts (mergekit-moe's `cheap_embed`): row e is the normalised sum
    of the embeddings (`inner`) of expert e's prompt tokens, less the normalised sum of its negative
    prompts', normalised again. `counts`: per expert, its positive and its negative prompts as
    mergekit-moe batches them (token ids padded on the left, and the attention mask), so the sums
    run in its order and the router is bitwise its router."""

    counts: tuple  # ((positive (ids, mask), negative (ids, mask) or ()), ...) one per expert
    rows: tuple[int, int] | None = None  # these experts' rows only (a shared expert's gate beside the router)

    whole_tensor = True

    @property
    def shape(self):
        a, b = self.rows or (0, len(self.counts))
        return (b - a, self.inner.shape[1])

    @property
    def dtype(self):
        return self.inner.dtype

    def describe(self) -> str:
        return f"router from {len(self.counts)} experts' prompts over {self.inner.describe()}"


@dataclass(frozen=True)
class HiddenRouter(Recipe):
    """A router initialised from the base model's hidden states over each expert's prompts
    (mergekit-moe's `hidden` / `hidden_avg` gates): row e of layer `layer`'s router is the mean
    (over prompts) of the hidden state entering that layer, at the last position or averaged over
    positions, less the negative prompts', normalised. Computed once for every layer by running the
    base model (bfloat16, as mergekit-moe runs it)."""

    model: str  # the base model's folder
    layer: int
    counts: tuple  # the prompts, as PromptRouter holds them
    average: bool
    hidden: int
    dtype: str
    rows: tuple[int, int] | None = None  # these experts' rows only (a shared expert's gate beside the router)

    whole_tensor = True

    @property
    def shape(self):
        a, b = self.rows or (0, len(self.counts))
        return (b - a, self.hidden)

    def children(self):
        return ()

    def describe(self) -> str:
        return f"router from the base model's hidden states over {len(self.counts)} experts' prompts"


def leaves(r: Recipe) -> list[Recipe]:
    """Every recipe inside `r`, `r` included."""
    return [r] + [x for c in r.children() for x in leaves(c)]


@dataclass(frozen=True)
class Regrouped(Unary):
    """A recipe that rearranges (and may scale) one input along `dim`: it keeps the input's dtype."""

    @property
    def dtype(self):
        return self.inner.dtype


@dataclass(frozen=True)
class Widen(Regrouped):
    """A dense-MLP tensor grown along `dim` from `old` to `new` intermediate units (in each of
    `parts` equal blocks, for a fused gate_up_proj). New unit u >= old copies unit u mod old
    (`split`), or is zero or normal(0, std) (`zero`, `random`). For a tensor that reads the units
    (`role: out`), `split` divides each copied unit's column by the number of its copies, so the
    sum over copies is the original: the MLP computes exactly what it did (any new size).
    `blocks` ((old, new) per block, when given) replaces `parts` equal blocks of `old` -> `new`: a
    fused q|k|v whose key/value part is smaller than its query part (GQA) grows each part on its own."""

    role: str  # in | out
    dim: int
    parts: int
    old: int
    new: int
    init: str  # split | zero | random
    std: float
    seed: int
    key: str
    blocks: Optional[tuple[tuple[int, int], ...]] = None
    shares: str = "even"  # split, role out: even | random (surgery.merge.split_shares)
    share_key: str = "mlp"  # the kind of unit the shares are drawn for

    whole_tensor = True

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """(old, new) of each block along `dim`."""
        return self.blocks if self.blocks is not None else ((self.old, self.new),) * self.parts

    @property
    def shape(self):
        s = list(self.inner.shape)
        s[self.dim] = sum(n for _, n in self.sizes)
        return tuple(s)

    def describe(self) -> str:
        return f"{self.inner.describe()} widened {self.old} -> {self.new} units ({self.init})"


@dataclass(frozen=True)
class Gather(Regrouped):
    """Slices of `inner` along `dim` picked by `index` (output slice i is input slice index[i]),
    each multiplied by scale[i] and then plus add[i] when given: attention heads copied (and the
    o_proj columns that read a copied head shared among its copies), the residual stream's units
    copied (and what reads them divided by their number of copies)."""

    dim: int
    index: tuple[int, ...]
    scale: Optional[tuple[float, ...]] = None
    add: Optional[tuple[float, ...]] = None

    whole_tensor = True

    @property
    def shape(self):
        s = list(self.inner.shape)
        s[self.dim] = len(self.index)
        return tuple(s)

    def describe(self) -> str:
        return f"{self.inner.describe()} regrouped to {len(self.index)} along dim {self.dim}"


def fingerprint(r: object) -> object:
    """A JSON-able value that changes whenever anything deciding `r`'s bytes changes: the recipe
    types, every parameter and seed, and each source tensor's file, offset, dtype and shape.
    (Source files' own identities are recorded beside it, see engine's resume record.)"""
    import dataclasses

    if isinstance(r, TensorInfo):
        return ["tensor", str(r.file), r.offset, r.dtype, list(r.shape), r.nbytes, r.name]
    if dataclasses.is_dataclass(r) and not isinstance(r, type):
        out: dict = {"kind": type(r).__name__}
        for f in dataclasses.fields(r):
            v = getattr(r, f.name)
            if not f.compare and f.name != "merger":
                continue  # bookkeeping (a plan line), not what decides the bytes
            if f.name == "merger":
                fp = getattr(v, "fingerprint", None)
                out[f.name] = fp() if callable(fp) else f"{type(v).__module__}.{type(v).__qualname__}:{getattr(v, 'vocab_size', '')}"
            else:
                out[f.name] = fingerprint(v)
        return out
    if isinstance(r, (list, tuple)):
        return [fingerprint(x) for x in r]
    if isinstance(r, float):
        return repr(r)  # exact, and nan/inf stay JSON
    if r is None or isinstance(r, (bool, int, str)):
        return r
    return repr(r)


def map_children(r: Recipe, fn) -> Recipe:
    """`r` with `fn` applied to each recipe it is made from (the fields `children()` returns, found
    by type, so a new recipe class needs no change here)."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(r):
        v = getattr(r, f.name)
        if isinstance(v, Recipe):
            changes[f.name] = fn(v)
        elif isinstance(v, tuple) and v and all(isinstance(x, Recipe) for x in v):
            changes[f.name] = tuple(fn(x) for x in v)
    return dataclasses.replace(r, **changes) if changes else r


def leaves_of(r: Recipe):
    """`r` and every recipe it is made from, depth first."""
    yield r
    for c in r.children():
        yield from leaves_of(c)
