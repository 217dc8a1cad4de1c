"""Plan + checkpoint catalogs -> Program. Reads headers and configs only, never tensor data.

The program holds everything `apply` will do: the layer map (output layer <- source layers and
how it was made), every output tensor's name, dtype, shape and recipe, the output config and the
shard layout. `validate` prints it; the engine executes it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from surgery import registry
from surgery.arch import Family
from surgery.compile.lint import lint
from surgery.io.checkpoint import Checkpoint, open_checkpoint, resolve_ref, small_files
from surgery.io.safetensors import DTYPE_NAMES
from surgery.errors import CheckpointError, PlanError, Problem, SurgeryError
from surgery.jsonio import read_json
from surgery.plan import Merge, Plan, Take


from surgery.compile.outconfig import output_config
from surgery.compile.stack import Ctx, LayerSpec
from surgery.compile.tensors import (
    has_layer_norm,
    widen_hidden,
    OutTensor,
    layer_tensors,
    non_layer_tensors,
    realign_vocab,
    vocabularies_differ,
)


@dataclass(frozen=True)
class Shard:
    name: str
    tensors: tuple[OutTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class Program:
    plan: Plan
    ckpts: dict[str, Checkpoint]
    family: Family
    config_model: str
    tokenizer_model: str
    stack: list[LayerSpec]
    tensors: list[OutTensor]
    shards: list[Shard]
    config: dict
    config_changes: list[str]
    dtype: str
    warnings: list[Problem] = field(default_factory=list)
    tokenizer_merger: object = None  # a plugin's merged tokenizer (tokenizer: union), else None
    chat_template: str | None = None  # written as chat_template.jinja when set

    @property
    def num_layers(self) -> int:
        return len(self.stack)

    @property
    def num_params(self) -> int:
        return sum(t.recipe.numel for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_in(self) -> int:
        """Bytes of source tensor data the program reads (each source tensor counted once)."""
        seen = {}
        for t in self.tensors:
            for i in t.recipe.inputs():
                seen[(i.file, i.name)] = i.nbytes
        return sum(seen.values())

    def widened(self) -> dict:
        """What a `widen` step grew: the sizes asked for and every tensor whose shape changed."""
        w = self.stack[0].widen if self.stack else None
        if w is None:
            return {}
        from surgery.recipes import Regrouped, leaves_of

        grown = [t.name for t in self.tensors if any(isinstance(r, Regrouped) for r in leaves_of(t.recipe))]
        sizes = {
            k: v
            for k, v in (("intermediate", w.intermediate), ("hidden", w.hidden), ("heads", w.heads), ("kv_heads", w.kv_heads))
            if v is not None
        }
        return {"sizes": sizes, "init": w.init, "shares": w.shares, "seed": w.seed, "tensors": grown}

    @property
    def new_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.stack) if s.new]

    def small_files(self) -> list[Path]:
        return small_files(self.ckpts[self.tokenizer_model].path)

    def layer_map(self) -> list[dict]:
        return [
            {
                "layer": i,
                "source": s.source_text(),
                "how": s.how(),
                "new": s.new,
                "sources": [list(x) for x in s.sources],
                "made": s.init if s.merge is None or s.init != "copy" else "merge",
                "step": s.step,
                "where": s.where,
            }
            for i, s in enumerate(self.stack)
        ]


def open_models(plan: Plan, *, allow_pickle: bool = False, headers_only: bool = False, offline: bool = False) -> dict[str, Checkpoint]:
    """Resolve and open every model the plan names; all failures are reported together."""
    ckpts: dict[str, Checkpoint] = {}
    problems: list[Problem] = []
    for name in plan.body.models:
        ref = plan.model_ref(name)
        try:
            path = resolve_ref(
                ref.path, plan.base_dir, revision=ref.revision, where=plan.where("models", name), headers_only=headers_only, offline=offline
            )
            ckpts[name] = open_checkpoint(name, ref.path, path, allow_pickle=allow_pickle)
        except SurgeryError as e:
            problems += e.problems
    if problems:
        raise SurgeryError(problems)
    return ckpts


def compile_plan(
    plan: Plan, *, allow_pickle: bool = False, ckpts: dict[str, Checkpoint] | None = None, headers_only: bool = False, offline: bool = False
) -> Program:
    """The plan against its models' headers. `headers_only`: hub models may be header-only views
    (validate); a Program compiled so is for reporting, not for `execute`."""
    ckpts = ckpts if ckpts is not None else open_models(plan, allow_pickle=allow_pickle, headers_only=headers_only, offline=offline)
    first = plan.steps[0]
    first_model = first.model if isinstance(first, Take) else first.sources[0].model if isinstance(first, Merge) else None
    if first_model is None:
        raise PlanError(
            Problem(plan.step_where(0), f"the first step is `{first.op}`, which needs layers to work on", "start with `take` or `merge`")
        )
    config_model = plan.body.non_layer or first_model
    base = ckpts[config_model]
    default_std = float(
        base.family.lm_config(base.config).get("initializer_range", 0.02) or base.config.get("initializer_range", 0.02) or 0.02
    )

    stack: list[LayerSpec] = []
    for i, step in enumerate(plan.steps):
        stack = registry.current().ops[step.op](step, stack, Ctx(plan, ckpts, i, step, default_std))

    widths = {x.widen for x in stack}
    if len(widths) > 1:
        w = next(x for x in stack if x.widen is not None)
        raise PlanError(
            Problem(
                w.widen_where,
                "some layers are widened and some are not: steps after `widen` added layers of the original width",
                "put `widen` after the last step that adds layers",
            )
        )
    family = base.family
    warnings: list = []  # Problems with a code; plain strings (config notes) get the code `config` below
    if family.guessed:
        warnings.append(
            Problem(
                plan.where("models", config_model),
                f"model {config_model!r}: unknown family; {family.notes}",
                "register an architecture entry (a plugin's api.family) if the guess is wrong",
                code="unknown-family",
            )
        )
    out_code = DTYPE_NAMES[plan.body.output.dtype] if plan.body.output.dtype else base.dtype

    tok = plan.body.tokenizer or config_model
    realign = None  # the tokenizer source that realigns token-indexed tensors, decided before shapes are compared
    if tok not in ckpts:  # a tokenizer source from a plugin, e.g. "union"
        realign = tok
    elif plan.body.tokenizer is not None and (plan.body.tokenizer_options is not None or vocabularies_differ(plan, ckpts, family, tok)):
        if "model" not in registry.current().tokenizer_sources:
            raise PlanError(
                Problem(
                    plan.where("tokenizer"),
                    f"the models' vocabularies differ from {tok!r}'s; realigning "
                    "their embeddings to its tokenizer (as mergekit's tokenizer_source does), or "
                    "tokenizer_options, needs the mergekit plugin",
                    "install the surgery-mergekit plugin (from a source checkout: pip install -e plugins/surgery-mergekit)",
                )
            )
        realign = "model"
    vocab_rows_free = (set(family.embeddings) | {family.lm_head}) if realign else set()
    tensors: list[OutTensor] = []
    pre, post = non_layer_tensors(plan, ckpts, base, first, out_code, warnings, vocab_rows_free)
    tensors += pre
    problems: list[Problem] = []
    for j, spec in enumerate(stack):
        try:
            tensors += layer_tensors(
                j,
                spec,
                ckpts,
                family,
                base,
                out_code,
                warnings,
                DTYPE_NAMES[plan.body.input_dtype] if plan.body.input_dtype else None,
                plan.body.seed,
            )
        except SurgeryError as e:
            problems += e.problems
    if problems:
        raise SurgeryError(problems)
    tensors += post
    if any(s.init == "identity" for s in stack) and family.guessed:
        first_id = next(s for s in stack if s.init == "identity")
        warnings.append(
            Problem(
                first_id.where or plan.where(),
                "identity blocks in a family surgery does not know: output "
                "projections were guessed by name, so the expansion may not preserve the function",
                "check `surgery validate --tensors`, or register an architecture entry",
                code="guessed-identity",
            )
        )
    config, changes = output_config(base, ckpts, stack, family, out_code, warnings)
    shards = _schedule(tensors, plan.body.output.shard_size)
    merger = None
    if realign is not None:
        tensors, merger = realign_vocab(plan, ckpts, family, tensors, realign, config_model, tok if realign == "model" else None)
        lm = family.lm_config(config)
        old_v = lm.get("vocab_size")
        lm["vocab_size"] = merger.vocab_size
        if old_v != merger.vocab_size:
            changes.append(f"vocab_size: {old_v} -> {merger.vocab_size} (tokenizer: {plan.body.tokenizer})")
        tok = config_model
        shards = _schedule(tensors, plan.body.output.shard_size)
    if stack and stack[0].widen is not None and stack[0].widen.hidden is not None:
        tensors = widen_hidden(tensors, stack[0], family, base)
        h_old = family.lm_config(base.config).get(family.hidden_key)
        if isinstance(h_old, int) and stack[0].widen.hidden % h_old and stack[0].widen.init == "split":
            warnings.append(
                Problem(
                    stack[0].widen_where,
                    f"hidden {h_old} -> {stack[0].widen.hidden} is not a whole "
                    "multiple: units are copied unevenly, so norms see a different RMS and the grown model "
                    "computes the original function only approximately",
                    f"use a multiple of {h_old} (e.g. {2 * h_old}) for an exact copy",
                    code="approximate-growth",
                )
            )
        if stack[0].widen.init == "zero" and has_layer_norm(family, base) and stack[0].widen.hidden != h_old:
            warnings.append(
                Problem(
                    stack[0].widen_where,
                    f"the paper's G_zero keeps the function through RMS norms (their gains are rescaled); {family.name}'s "
                    "LayerNorms also subtract a mean, which now runs over the new zero units, so the grown model computes "
                    "the original function only approximately",
                    "train it further as it is, or use `init: split` (exact) or `init: random` with grow.mask_steps (exact at mask 0)",
                    code="approximate-growth",
                )
            )
        shards = _schedule(tensors, plan.body.output.shard_size)
    if any(x.upcycle is not None for x in stack):
        from surgery.compile.upcycle import upcycle_config, upcycle_tensors

        in_dt = DTYPE_NAMES[plan.body.input_dtype] if plan.body.input_dtype else None
        tensors = upcycle_tensors(tensors, stack, family, out_code, ckpts, base, in_dt)
        upcycle_config(config, stack, family, changes)
        shards = _schedule(tensors, plan.body.output.shard_size)
    w = stack[0].widen if stack else None
    if w is not None and w.init == "split" and w.shares == "even":
        warnings.append(
            Problem(
                stack[0].widen_where,
                "split with even shares: a unit's copies have the same weights in and the same share out, so they get "
                "the same gradient and stay copies under training (the wider model keeps the narrow one's capacity; "
                "measured in bench/RESULTS.md: split copies are still bit-identical after training)",
                "add `shares: random` to the widen step (the same function, copies that can diverge), or train it as it is",
                code="symmetric-split",
            )
        )
    chat = _chat_template(plan, ckpts, warnings) if plan.body.chat_template else None
    if chat is not None:  # apply rewrites the copied tokenizer_config.json: it must parse now, in validate too
        tc = ckpts[tok].path / "tokenizer_config.json" if merger is None else None
        if tc is not None and tc.is_file() and not isinstance(read_json(tc, error=CheckpointError), dict):
            raise CheckpointError("tokenizer_config.json is not a JSON object", where=str(tc))
    small_files(ckpts[tok].path)  # links leading out of a model folder are refused in validate, not after the shards
    warnings += lint(plan, ckpts, stack, out_code)
    warnings = list(plan.doc.notes) + [w if isinstance(w, Problem) else Problem(plan.where(), w, code="config") for w in warnings]
    return Program(plan, ckpts, family, config_model, tok, stack, tensors, shards, config, changes, out_code, warnings, merger, chat)


def model_chat_template(path) -> str | None:
    """A checkpoint's chat template: chat_template.jinja, or tokenizer_config.json's (its default)."""

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        data = read_json(cfg, error=CheckpointError)  # `apply` rewrites this file: a corrupt one fails now
        if not isinstance(data, dict):
            raise CheckpointError("tokenizer_config.json is not a JSON object", where=str(cfg))
        t = data.get("chat_template")
        if isinstance(t, list):  # [{name, template}, ...]
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def _chat_template(plan: Plan, ckpts, warnings) -> str | None:
    """mergekit's rules: "auto" takes the most common template among the models (first seen wins a
    tie), a string with '{' or a newline is the template itself, anything else names a template."""
    from collections import Counter

    value = plan.body.chat_template
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(c.path) for c in ckpts.values()) if t]
        if not found:
            warnings.append(
                Problem(
                    plan.where("chat_template"),
                    "chat_template: auto found no chat template in the models; none written",
                    code="chat-template",
                )
            )
            return None
        return Counter(found).most_common(1)[0][0]
    if "{" in value or "\n" in value or len(value) >= 256:
        return value
    text = registry.current().chat_template(value)
    if text is None:
        raise PlanError(
            Problem(
                plan.where("chat_template"),
                f"unknown chat template name {value!r}",
                "give the Jinja template itself, `auto`, or a name the mergekit plugin ships (chatml, llama3, alpaca, mistral, ...)",
            )
        )
    return text


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _schedule(tensors: list[OutTensor], shard_size: int) -> list[Shard]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    return [Shard(shard_name(i, n), tuple(g)) for i, g in enumerate(groups)]
