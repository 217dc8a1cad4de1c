"""Architecture knowledge, kept as data.

Each model family is one JSON file in `surgery/architectures/` (plugins may register more):
where its layers live in tensor names, which tensors are a block's output projections (what
`init: identity` zeroes), which are norms (kept by `init: zero` and `init: random`), which config
key counts layers and which config fields are per-layer and must follow the layer map.
Surgery operations never branch on the model family; they ask a `Family`.

An unknown family falls back to detecting `prefix.{i}.suffix` from the tensor names, and the
report says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

from surgery import registry
from surgery.errors import SurgeryError

# Output projections of blocks in families surgery has no entry for: a guess, reported as such.
_GUESS_OUTPUT_PROJECTIONS = (
    r"(.*\.)?(o_proj|out_proj|c_proj|down_proj|dense_4h_to_h|fc2|w2|wo)\.(weight|bias)",
    r"(self_)?attention\.dense\.(weight|bias)",
    r"mlp\.experts\.down_proj",
)
_GUESS_NORMS = (r"(.*\.)?[^.]*(norm|ln)[^.]*\..*",)


class MlpEntry(NamedTuple):
    """One kind of MLP tensor indexed by the intermediate units (family data `mlp_in` / `mlp_out`,
    written in JSON as [pattern, dim, parts] or [pattern, dim, parts, size_key])."""

    pattern: str  # a regex over the tensor's name inside its layer
    dim: int  # the dimension that indexes the units
    parts: int  # 2 for a fused gate|up tensor (each half on its own)
    size_key: str = ""  # the config key sizing these units, when a model has several (Qwen-MoE); "" = intermediate_key


def _mlp_entries(v, origin: str) -> tuple:
    out = []
    for e in v:
        if isinstance(e, dict):
            e = [e.get("pattern"), e.get("dim"), e.get("parts", 1), e.get("size_key", "")]
        if not isinstance(e, (list, tuple)) or not 3 <= len(e) <= 4 or not isinstance(e[0], str):
            raise SurgeryError(f"an mlp_in/mlp_out entry is [pattern, dim, parts(, size_key)], not {e!r}", where=origin)
        out.append(MlpEntry(e[0], int(e[1]), int(e[2]), (e[3] if len(e) > 3 else "") or ""))
    return tuple(out)


def _frozen(v):
    """JSON lists and objects as tuples (a family is hashable data)."""
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _frozen(x)) for k, x in v.items())
    return v


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layer_prefix: str
    num_layers_key: str
    embeddings: tuple[str, ...]
    lm_head: str
    output_projections: tuple[str, ...]
    norms: tuple[str, ...]
    per_layer_config: tuple[str, ...] = ()
    layer_threshold_config: tuple[str, ...] = ()
    position_dependent_config: tuple[str, ...] = ()
    notes: str = ""
    # vision-language checkpoints: the key of the nested config that holds the language model's
    # settings (layer count, per-layer lists, vocab_size), e.g. "text_config" for LLaVA
    text_config: str = ""
    # other tensor-name layouts of the same model_type (e.g. LLaVA saved before and after
    # transformers 4.52): each a {layer_prefix, embeddings, lm_head} override, chosen by the tensor names
    name_variants: tuple = ()
    # width growth (`widen`): the dense MLP's tensors whose `dim` indexes the intermediate units, as
    # [suffix regex, dim, parts] (parts: 2 for a fused gate_up_proj, each half widened on its own);
    # mlp_in: tensors producing the units (rows copied), mlp_out: reading them (columns split); an
    # optional 4th item names the config key sizing those units when a model has several (Qwen-MoE:
    # experts, shared expert, dense layers): `widen: {intermediate}` sets intermediate_key and grows
    # the others by the same ratio
    mlp_in: tuple = ()
    mlp_out: tuple = ()
    intermediate_key: str = "intermediate_size"
    # hidden-size growth (`widen: {hidden}`): layer tensors reading the residual stream ([regex, dim]:
    # that dim is the hidden one, split among the copies), writing it (copied), the final norm's
    # name, whether norms scale by (1 + w) and the embedding by sqrt(hidden) (Gemma)
    hidden_in: tuple = ()
    hidden_out: tuple = ()
    final_norm: str = ""
    norm_plus_one: bool = False
    embed_scaled: bool = False
    # head growth (`widen: {heads, kv_heads}`): attention projections by role: q, k, v (rows are
    # heads x head_dim), or a fused qkv; o (columns are heads x head_dim)
    attention: tuple = ()  # ((role, regex or [[regex, dim], ...]), ...), from a JSON object; dim: where the heads are
    # config keys of the widths; GPT-2 writes n_embd and n_head and cannot state a head size (it is
    # hidden / heads, so its heads grow with the hidden size): head_dim_key "" says so
    hidden_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = "num_key_value_heads"
    head_dim_key: str = "head_dim"
    # other non-layer tensors sized by the hidden size, as [regex, dim, "in" | "out"]: a VLM's projector
    # writes the stream ("out": units copied) and, in transformers' LLaVA, its inner layer is as wide
    # as the stream too (linear_1 writes it, linear_2 reads it: "in", divided among the copies)
    hidden_other: tuple = ()
    position_embeddings: tuple = ()  # absolute position embeddings [positions, hidden] (GPT-2's wpe): written to the stream
    intermediate_factor: int = 0  # MLP units per hidden unit when intermediate_key is null in the config (GPT-2: 4)
    # how transformers holds a layer's tensors in memory when that differs from the checkpoint (read by
    # `analyze`, which streams layers into modules): fused_experts maps an in-memory parameter (one
    # [experts, ...] tensor) to the per-expert layouts it may be stored in, each the list of parts
    # concatenated per expert ({e} the expert); renamed maps an in-memory name to the stored ones
    fused_experts: tuple = ()  # ((in-memory suffix, ((part, ...), ...)), ...), from a JSON object
    renamed: tuple = ()  # ((in-memory suffix, (stored suffix, ...)), ...), from a JSON object
    # sparse upcycling (`upcycle`): the MoE this family grows into, as a JSON object: model_type,
    # architectures, the dense MLP's tensors {gate, up, down}, the experts' ({e}: the expert), the
    # router, an optional shared expert {gate, up, down, router}, every_layer (Mixtral has no dense
    # layers) or dense_layers_key (Qwen-MoE's mlp_only_layers), config keys to set (values "experts",
    # "top_k", "intermediate", "router_aux_loss_coef" are the step's), config values refused
    upcycle: dict = field(default_factory=dict, compare=False, hash=False)
    guessed: bool = False  # True for the fallback built from tensor names
    _out_re: re.Pattern = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _norm_re: re.Pattern = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self):
        object.__setattr__(self, "_out_re", re.compile("|".join(f"(?:{p})" for p in self.output_projections) or "(?!)"))
        object.__setattr__(self, "_norm_re", re.compile("|".join(f"(?:{p})" for p in self.norms) or "(?!)"))

    @classmethod
    def from_dict(cls, d: dict, origin: str) -> "Family":
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_") and f != "guessed"}
        unknown = set(d) - known
        if unknown:
            raise SurgeryError(f"unknown keys {sorted(unknown)} in architecture entry", where=origin, fix=f"valid keys: {sorted(known)}")
        missing = {"name", "model_types", "layer_prefix", "num_layers_key", "embeddings", "lm_head", "output_projections", "norms"} - set(d)
        if missing:
            raise SurgeryError(f"architecture entry lacks {sorted(missing)}", where=origin)
        for v in d.get("name_variants", ()):
            if not isinstance(v, dict) or not set(v) <= {"layer_prefix", "embeddings", "lm_head", "final_norm"} or "layer_prefix" not in v:
                raise SurgeryError("each name_variants entry is {layer_prefix, embeddings?, lm_head?, final_norm?}", where=origin)
        tuples = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) for k, v in d.items() if isinstance(v, list)}
        tuples.update({k: tuple(v.items()) for k, v in d.items() if isinstance(v, dict)})
        for key in ("mlp_in", "mlp_out"):
            if key in d:
                tuples[key] = _mlp_entries(d[key], origin)
        if "upcycle" in d:
            if not isinstance(d["upcycle"], dict) or not {"model_type", "dense", "experts", "router"} <= set(d["upcycle"]):
                raise SurgeryError("upcycle is a JSON object with model_type, dense, experts and router", where=origin)
            tuples["upcycle"] = d["upcycle"]
        for key in ("fused_experts", "renamed"):
            if key in d:
                if not isinstance(d[key], dict):
                    raise SurgeryError(f"{key} is a JSON object (in-memory name -> stored layouts)", where=origin)
                tuples[key] = _frozen(d[key])
        return cls(**{**d, **tuples})

    # -- tensor names ------------------------------------------------------------------------
    def split(self, name: str) -> tuple[int, str] | None:
        """`model.layers.3.mlp.down_proj.weight` -> (3, "mlp.down_proj.weight"); None for non-layer tensors."""
        if not name.startswith(self.layer_prefix):
            return None
        rest = name[len(self.layer_prefix) :]
        idx, dot, suffix = rest.partition(".")
        if not dot or not idx.isdigit():
            return None
        return int(idx), suffix

    def layer_name(self, index: int, suffix: str) -> str:
        return f"{self.layer_prefix}{index}.{suffix}"

    def is_output_projection(self, suffix: str) -> bool:
        return self._out_re.fullmatch(suffix) is not None

    def stored_layouts(self, suffix: str) -> tuple:
        """How an in-memory layer parameter is stored: ((part, ...), ...) for fused experts (one
        tuple of parts per layout), ((name,), ...) for a renamed one, () when stored as named."""
        for name, layouts in self.fused_experts:
            if name == suffix:
                return layouts
        for name, stored in self.renamed:
            if name == suffix:
                return tuple((x,) for x in stored)
        return ()

    def mlp_role(self, suffix: str) -> tuple[str, int, int] | None:
        """("in" | "out", dim, parts) when `suffix` is a dense-MLP tensor indexed by the intermediate units."""
        entry = self._mlp_entry(suffix)
        return None if entry is None else entry[:3]

    def mlp_size_key(self, suffix: str) -> str:
        """The config key sizing the units `suffix` holds: an entry's own (Qwen-MoE's experts, shared
        expert and dense layers have three sizes) or intermediate_key."""
        entry = self._mlp_entry(suffix)
        return entry[3] or self.intermediate_key if entry is not None else self.intermediate_key

    def mlp_size_keys(self) -> list[str]:
        """Every config key sizing MLP units, intermediate_key first."""
        keys = [self.intermediate_key]
        for e in tuple(self.mlp_in) + tuple(self.mlp_out):
            if e.size_key and e.size_key not in keys:
                keys.append(e.size_key)
        return keys

    def _mlp_entry(self, suffix: str):
        for role, entries in (("in", self.mlp_in), ("out", self.mlp_out)):
            for e in entries:
                if re.fullmatch(e.pattern, suffix):
                    return role, e.dim, e.parts, e.size_key
        return None

    def hidden_role(self, suffix: str) -> tuple[str, int] | None:
        """("in" | "out", dim) for a layer tensor that reads or writes the residual stream."""
        for role, entries in (("in", self.hidden_in), ("out", self.hidden_out)):
            for pattern, dim in entries:
                if re.fullmatch(pattern, suffix):
                    return role, int(dim)
        return None

    def other_roles(self, name: str) -> list[tuple[str, int]]:
        """[(in | out, dim)] of a non-layer tensor sized by the hidden size (hidden_other)."""
        return [(role, int(dim)) for pattern, dim, role in self.hidden_other if re.fullmatch(pattern, name)]

    def attention_role(self, suffix: str) -> str | None:
        entry = self.attention_entry(suffix)
        return entry[0] if entry else None

    def attention_entry(self, suffix: str) -> tuple[str, int | None] | None:
        """(role, the dimension that indexes heads, or None for the role's usual one) of an attention tensor."""
        for role, patterns in self.attention:
            for pattern, dim in [(patterns, None)] if isinstance(patterns, str) else [(x[0], int(x[1])) for x in patterns]:
                if re.fullmatch(pattern, suffix):
                    return role, dim
        return None

    def is_norm(self, suffix: str) -> bool:
        return self._norm_re.fullmatch(suffix) is not None

    def lm_config(self, config: dict) -> dict:
        """The (mutable) part of `config` that describes the language model's layers."""
        sub = config.get(self.text_config) if self.text_config else None
        return sub if isinstance(sub, dict) else config

    # -- widths (of a language-model config: `lm_config(config)`) ----------------------------------
    def head_size(self, cfg: dict) -> int | None:
        """The attention head size: the config's own, or hidden / heads (GPT-2, NeoX: no key for it)."""
        d = cfg.get(self.head_dim_key) if self.head_dim_key else None
        if isinstance(d, int) and d:
            return d
        h, a = cfg.get(self.hidden_key), cfg.get(self.heads_key)
        return h // a if isinstance(h, int) and isinstance(a, int) and a else None

    def mlp_size(self, cfg: dict) -> int | None:
        """The MLP's units (intermediate_key), or intermediate_factor x hidden where the config leaves it null (GPT-2)."""
        v = cfg.get(self.intermediate_key)
        if isinstance(v, int):
            return v
        h = cfg.get(self.hidden_key)
        return self.intermediate_factor * h if self.intermediate_factor and isinstance(h, int) else None

    def mlp_sizes_after(self, cfg: dict, new_primary: int) -> dict[str, int]:
        """Every MLP size key's value once intermediate_key grows to `new_primary`: the others (a
        shared expert, dense layers) by the same ratio."""
        primary = cfg.get(self.intermediate_key)
        out = {self.intermediate_key: new_primary}
        for key in self.mlp_size_keys()[1:]:
            old = cfg.get(key)
            if isinstance(old, int) and isinstance(primary, int) and primary:
                out[key] = round(old * new_primary / primary)
        return out

    @property
    def final_norm_bias(self) -> str:
        """The final norm's bias (a LayerNorm's: GPT-2's ln_f.bias), or ""."""
        return self.final_norm[: -len("weight")] + "bias" if self.final_norm.endswith(".weight") else ""

    def for_tensors(self, names: list[str]) -> "Family":
        """This family in the tensor-name layout `names` use (see name_variants)."""
        if any(n.startswith(self.layer_prefix) for n in names):
            return self
        import dataclasses

        for v in self.name_variants:
            if any(n.startswith(v["layer_prefix"]) for n in names):
                return dataclasses.replace(self, **{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()}, name_variants=())
        return self

    def num_layers(self, config: dict) -> int | None:
        config = self.lm_config(config)
        for key in (self.num_layers_key, "num_hidden_layers", "n_layer", "num_layers"):
            v = config.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None


def builtin_families() -> list[tuple[Family, str]]:
    """The families in surgery/architectures/*.json, with where each came from."""
    folder = resources.files("surgery") / "architectures"
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            origin = f"surgery/architectures/{entry.name}"
            out.append((Family.from_dict(json.loads(entry.read_text()), origin), origin))
    return out


def families() -> dict[str, Family]:
    """Every registered family (built-in and from plugins): name -> Family."""
    return dict(registry.current().families)


def detect_family(config: dict, tensor_names: list[str], where: str) -> Family:
    """The family of a checkpoint: by `model_type`, else guessed from tensor names."""
    by_type = registry.current().by_model_type
    mt = config.get("model_type")
    if isinstance(mt, str) and mt in by_type:
        return by_type[mt].for_tensors(tensor_names)
    return _guess_family(config, tensor_names, where)


_LAYER_RE = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def _guess_family(config: dict, tensor_names: list[str], where: str) -> Family:
    counts: dict[str, set[int]] = {}
    for name in tensor_names:
        m = _LAYER_RE.match(name)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not counts:
        raise SurgeryError(
            f"unknown model_type {config.get('model_type')!r} and no tensor names of the form "
            "'prefix.{i}.suffix', so the layers cannot be found",
            where=where,
            fix=f"known model types: {sorted(registry.current().by_model_type)}; or register an architecture entry",
        )
    # The layer stack is the prefix with the most distinct indices (ties: the shortest prefix).
    prefix = max(counts, key=lambda p: (len(counts[p]), -len(p)))
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)), "num_hidden_layers")
    lm_head = next((n for n in tensor_names if n in ("lm_head.weight", "embed_out.weight")), "lm_head.weight")
    embeddings = tuple(n for n in tensor_names if re.search(r"(embed_tokens|wte|embed_in|word_embeddings)\.weight$", n))
    per_layer = tuple(k for k, v in config.items() if isinstance(v, list) and len(v) == len(counts[prefix]) and k != "architectures")
    return Family(
        name=f"unknown:{config.get('model_type', '?')}",
        model_types=(),
        layer_prefix=prefix,
        num_layers_key=key,
        embeddings=embeddings,
        lm_head=lm_head,
        output_projections=_GUESS_OUTPUT_PROJECTIONS,
        norms=_GUESS_NORMS,
        per_layer_config=per_layer,
        guessed=True,
        notes=f"layers detected from tensor names as '{prefix}{{i}}.'; output projections and norms guessed by name",
    )
