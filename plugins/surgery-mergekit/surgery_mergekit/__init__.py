"""surgery's mergekit plugin.

(a) Every mergekit 0.1.5 merge method that surgery does not implement natively (ties, dare_*,
    della*, breadcrumbs*, task_arithmetic, model_stock, karcher, multislerp, sce, nearswap,
    arcee_fusion, ram, ramplus_tl) becomes available to plans and mergekit configs: surgery's
    engine streams the tensors, and mergekit's own kernel (`merge_tensors`) computes each
    output tensor. mergekit is imported only when a plan uses one of these methods.
    `tokenizer: union` (mergekit's `tokenizer_source: union`) merges the models' vocabularies
    with mergekit's tokenizer code, and surgery realigns every token-indexed tensor to it.
(b) In the other direction, `surgery mergekit CONFIG OUT` runs a config with mergekit itself,
    with surgery's operations registered as mergekit merge methods (`surgery_identity`).

Uses only surgery's public plugin API (`surgery.plugins.PluginAPI`, `surgery.methods`).
"""

from __future__ import annotations

import functools
import hashlib
import threading

from surgery.methods import MERGEKIT_METHODS, MethodSpec, Param

# mergekit 0.1.5's methods that surgery runs through mergekit's kernels (the rest are native:
# linear, slerp, nuslerp, passthrough): the core's list (its error names them when this plugin is
# missing), so registering needs no mergekit import; a test checks it against mergekit's registry.
METHODS = MERGEKIT_METHODS
NATIVE = ("linear", "slerp", "nuslerp", "passthrough")
_RNG_LOCK = threading.Lock()


def register(api) -> None:
    for name in METHODS:
        api.lazy_merge_method(name, functools.partial(method_spec, name), kernel)
    api.tokenizer_source("union", UnionTokenizer)
    # `tokenizer: MODEL` (mergekit's `tokenizer_source: base` or a model) when vocabularies differ:
    # that model's tokenizer, every model's embeddings realigned to it, as mergekit does
    api.tokenizer_source("model", ModelTokenizer)
    api.chat_templates(chat_template)
    from .commands import mergekit_command

    api.command(mergekit_command)


def method_spec(name: str) -> MethodSpec:
    """surgery's view of a mergekit method: its parameters, scopes, defaults and input contract."""
    from mergekit import merge_methods

    spec = merge_methods.get(name).spec
    params = tuple(Param(p.name, None if p.required else p.default, p.required, p.scope.value) for p in spec.parameters)
    base = {"required": "required", "optional": "optional", "ignored": "ignored", "forbidden": "none"}[spec.contract.base.value]
    return MethodSpec(
        name,
        params,
        base=base,
        min_inputs=spec.contract.min_inputs,
        max_inputs=spec.contract.max_inputs,
        build=None,
        summary=spec.pretty_name or name,
    )


def tensor_seed(seed: int, name: str) -> int:
    """Random methods are seeded per output tensor, so results do not depend on execution order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def kernel(tensors, recipe):
    """One output tensor with mergekit's kernel. recipe: surgery.recipes.External."""
    import torch
    from mergekit.merge_methods import get, merge_tensors

    method = get(recipe.method)
    params = dict(recipe.shared)
    per = [dict(p) for p in recipe.per_input]
    for p in method.spec.parameters:
        if p.scope.value != "shared":
            params[p.name] = {recipe.ids[k]: per[k][p.name] for k in range(len(per)) if p.name in per[k]}

    def run():
        with torch.no_grad():
            return merge_tensors(
                list(tensors), method, parameters=params, ids=list(recipe.ids), base_index=recipe.base_index, name=recipe.name
            )

    if recipe.seed is None:
        return run()
    # mergekit's random methods draw from torch's global generator: seed and draw under one lock,
    # or the engine's other threads would interleave with the draws
    with _RNG_LOCK:
        torch.manual_seed(tensor_seed(recipe.seed, recipe.name))
        return run()


class UnionTokenizer:
    """mergekit's union tokenizer and its embedding realignment, for `tokenizer: union` in a plan
    (or `tokenizer_source: union` in a mergekit config)."""

    def __init__(self, models: dict, base: str, source: str = "union", options: dict | None = None):
        from mergekit.common import ImmutableMap, ModelReference
        from mergekit.tokenizer.build import build_tokenizer
        from mergekit.tokenizer.config import TokenEmbeddingConfig

        self.refs = {name: ModelReference.model_validate(str(path)) for name, path in models.items()}
        self.base = base
        # mergekit's tokenizer_source: "union", "base", or a model reference
        self.source = source if source in ("union", "base") else self.refs[source]
        options = options or {}
        self.pad_to_multiple_of = options.get("pad_to_multiple_of")
        tokens = {}
        for tok, setting in (options.get("tokens") or {}).items():  # plan model names -> mergekit references
            s = dict(setting)
            src = s.get("source")
            if isinstance(src, str):
                s["source"] = self.refs[src]
            elif isinstance(src, dict) and src.get("model"):
                s["source"] = {**src, "model": self.refs[src["model"]]}
            tokens[tok] = TokenEmbeddingConfig.model_validate(s)
        self.tokens = ImmutableMap(data=tokens) if tokens else None
        self.info = build_tokenizer(
            base_model=self.refs[base],
            referenced_models=list(self.refs.values()),
            tokenizer_source=self.source,
            trust_remote_code=False,
            add_tokens=list(tokens),
        )

    @property
    def vocab_size(self) -> int:
        """Rows of every realigned token-indexed tensor (the tokenizer's size, padded as configured)."""
        n = len(self.info.tokenizer.get_vocab())
        m = self.pad_to_multiple_of
        return (n // m + 1) * m if m and n % m else n

    def permute(self, tensors: dict) -> dict:
        from mergekit.common import ImmutableMap
        from mergekit.io.tasks import GatherTensors
        from mergekit.tokenizer.build import BuildTokenizer
        from mergekit.tokenizer.embed import PermutedVocabulary

        task = PermutedVocabulary(
            gather_tensors=GatherTensors(weight_info=ImmutableMap(data={})),
            tokenizer_task=BuildTokenizer(
                base_model=self.refs[self.base],
                referenced_models=tuple(self.refs.values()),
                tokenizer_source=self.source,
                add_tokens=tuple(self.tokens.keys()) if self.tokens else (),
            ),
            tokens=self.tokens,
            pad_to_multiple_of=self.pad_to_multiple_of,
            base_model=self.refs[self.base],
            vocabulary_axis=0,
        )
        out = task.execute(tokenizer_info=self.info, tensors={self.refs[n]: t for n, t in tensors.items()})
        names = {ref: n for n, ref in self.refs.items()}
        return {names[ref]: t for ref, t in out.items()}

    def save(self, folder) -> None:
        self.info.tokenizer.save_pretrained(str(folder))

    def fingerprint(self) -> str:
        """What decides the realigned rows: the merged vocabulary and each model's token map."""
        import hashlib
        import json

        perms = {
            str(ref): sorted((int(k), int(v)) for k, v in p.items())
            for ref, p in sorted(self.info.permutations.items(), key=lambda kv: str(kv[0]))
        }
        text = json.dumps(
            [
                sorted(self.info.tokenizer.get_vocab().items()),
                perms,
                self.base,
                str(self.source),
                repr(self.tokens),
                self.pad_to_multiple_of,
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()


def ModelTokenizer(models: dict, base: str, source: str, options: dict | None = None) -> UnionTokenizer:
    """One model's tokenizer (mergekit's `tokenizer_source: base` or a model), the others realigned."""
    return UnionTokenizer(models, base, "base" if source == base else source, options)


def chat_template(name: str):
    """mergekit's bundled chat templates by name (chatml, llama3, alpaca, mistral, ...)."""
    import importlib.resources

    try:
        f = importlib.resources.files("mergekit._data.chat_templates").joinpath(name + ".jinja")
        return f.read_text(encoding="utf-8") if f.is_file() else None
    except ModuleNotFoundError:
        return None
