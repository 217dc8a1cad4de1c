"""One registry of everything surgery can be extended with, filled once.

Extension points (plan steps and their stack operations, merge methods and their kernels,
architecture families, tokenizer sources, named chat templates, CLI commands) live in one
`Registry` object instead of module-level dicts. It is filled in one place, `load()`: the
built-ins first (`surgery.builtins`), then every installed plugin in name order. The entry points
(the API functions, the CLI group, `surgery train`) call `load()`; `current()` loads on first
use too, so a library caller that goes straight to `plan_from_text` sees the same methods as the
CLI (before this, `method: ties` failed on the first call and worked on the second).

Registration is transactional: a plugin that fails half-way (a name that clashes, an exception
in its `register`) leaves the registry exactly as it was before it started.

Tests use `scoped()` to work on a copy and throw it away afterwards.

This module sits at the bottom of the package: it imports only `errors`; the built-ins and the
plugin loader, which sit above it, are imported by name when the registry is first filled. What it stores is
described by the Protocols below; the concrete classes live in the layers above.
"""

from __future__ import annotations

import copy
import importlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from surgery.errors import SurgeryError


class StepSchema(Protocol):
    """A plan step's pydantic model (see `surgery.plan.Step`): `op` is its key in a plan."""

    op: str
    summary: str


class StackOp(Protocol):
    """What a step does to the layer stack: `(step, stack, ctx) -> new stack` (a list of LayerSpec)."""

    def __call__(self, step: Any, stack: list, ctx: Any) -> list: ...


class MethodSpecLike(Protocol):
    """A merge method's spec (`surgery.methods.MethodSpec`)."""

    name: str
    origin: str


class Kernel(Protocol):
    """A plugin's merge computation on whole tensors: `(tensors, recipe) -> tensor`."""

    def __call__(self, tensors: list, recipe: Any) -> Any: ...


class FamilyLike(Protocol):
    """An architecture entry (`surgery.arch.Family`)."""

    name: str
    model_types: tuple


class TokenizerSource(Protocol):
    """`build(models: {plan name: folder}, base: name)` -> a merger with `vocab_size`,
    `permute(tensors)`, `save(folder)` and `index_maps()`."""

    def __call__(self, models: dict, base: str | None) -> Any: ...


@dataclass
class PluginInfo:
    name: str
    origin: str  # "distribution==version (module:attr)"
    steps: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


@dataclass
class Registry:
    steps: dict[str, Any] = field(default_factory=dict)  # op -> StepSchema
    ops: dict[str, StackOp] = field(default_factory=dict)  # op -> StackOp
    methods: dict[str, Any] = field(default_factory=dict)  # name -> MethodSpec
    lazy_methods: dict[str, tuple[Callable[[], Any], str]] = field(default_factory=dict)
    kernels: dict[str, Kernel] = field(default_factory=dict)
    families: dict[str, Any] = field(default_factory=dict)  # name -> Family
    family_origins: dict[str, str] = field(default_factory=dict)
    by_model_type: dict[str, Any] = field(default_factory=dict)
    tokenizer_sources: dict[str, TokenizerSource] = field(default_factory=dict)
    chat_template_lookups: list[Callable[[str], str | None]] = field(default_factory=list)
    commands: dict[str, Any] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    # -- adding --------------------------------------------------------------------------------
    def add_step(self, schema: Any, fn: StackOp, origin: str = "surgery") -> None:
        op = schema.op
        if op in self.steps or op in self.ops:
            owner = getattr(self.steps.get(op), "__module__", None) or getattr(self.ops.get(op), "__module__", "?")
            raise SurgeryError(f"plan step {op!r} from {origin} is already defined by {owner}", fix="give the new step another name")
        self.steps[op] = schema
        self.ops[op] = fn

    def method_owner(self, name: str) -> str | None:
        if name in self.methods:
            return self.methods[name].origin
        return self.lazy_methods[name][1] if name in self.lazy_methods else None

    def add_method(self, spec: Any, kernel: Kernel | None = None) -> None:
        owner = self.method_owner(spec.name)
        if owner:
            raise SurgeryError(
                f"merge method {spec.name!r} from {spec.origin} is already registered by {owner}", fix="give the method another name"
            )
        self.methods[spec.name] = spec
        if kernel is not None:
            self.kernels[spec.name] = kernel

    def add_lazy_method(self, name: str, loader: Callable[[], Any], origin: str, kernel: Kernel) -> None:
        owner = self.method_owner(name)
        if owner:
            raise SurgeryError(f"merge method {name!r} from {origin} is already registered by {owner}", fix="give the method another name")
        self.lazy_methods[name] = (loader, origin)
        self.kernels[name] = kernel

    def method_names(self) -> list[str]:
        return sorted(set(self.methods) | set(self.lazy_methods))

    def resolve_method(self, name: str) -> Any | None:
        """The spec of `name` (building a lazy one now), or None when there is no such method."""
        with _LOCK:
            if name in self.methods:
                return self.methods[name]
            if name in self.lazy_methods:
                from dataclasses import replace

                loader, origin = self.lazy_methods[name]
                spec = replace(loader(), origin=origin)
                self.methods[name] = spec
                del self.lazy_methods[name]
                return spec
        return None

    def add_family(self, family: Any, origin: str = "surgery") -> None:
        if family.name in self.families:
            raise SurgeryError(
                f"architecture {family.name!r} from {origin} is already registered by {self.family_origins[family.name]}",
                fix="give the entry another name",
            )
        for mt in family.model_types:
            if mt in self.by_model_type:
                other = self.by_model_type[mt].name
                raise SurgeryError(
                    f"model_type {mt!r} of architecture {family.name!r} ({origin}) is already claimed by "
                    f"{other!r} ({self.family_origins[other]})"
                )
        self.families[family.name] = family
        self.family_origins[family.name] = origin
        for mt in family.model_types:
            self.by_model_type[mt] = family

    def add_tokenizer_source(self, name: str, build: TokenizerSource, origin: str) -> None:
        if name in self.tokenizer_sources:
            raise SurgeryError(f"{origin}: tokenizer source {name!r} is already added")
        self.tokenizer_sources[name] = build

    def add_command(self, cmd: Any, origin: str) -> None:
        if cmd.name in self.commands:
            raise SurgeryError(f"{origin}: command {cmd.name!r} is already added by another plugin")
        self.commands[cmd.name] = cmd

    # -- reading -------------------------------------------------------------------------------
    def kernel(self, method: str) -> Kernel:
        try:
            return self.kernels[method]
        except KeyError:
            raise SurgeryError(f"merge method {method!r} has no kernel loaded") from None

    def chat_template(self, name: str) -> str | None:
        for lookup in self.chat_template_lookups:
            text = lookup(name)
            if text:
                return text
        return None

    # -- transactions --------------------------------------------------------------------------
    def snapshot(self) -> Registry:
        """A copy whose tables can change without touching this one (entries are shared)."""
        return Registry(**{k: copy.copy(v) for k, v in self.__dict__.items()})

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """Changes made inside are kept only if the block finishes without an exception."""
        saved = self.snapshot()
        try:
            yield self
        except BaseException:
            self.__dict__.update(saved.__dict__)
            raise


_LOCK = threading.RLock()
_ACTIVE: Registry | None = None
GROUP = "surgery.plugins"


def builtin_registry() -> Registry:
    """A registry holding only what surgery itself defines (no plugins)."""
    reg = Registry()
    # `surgery.builtins` sits above every layer it registers; it is imported by name so that this
    # bottom module has no import edge upwards.
    importlib.import_module("surgery.builtins").register(reg)
    return reg


def load(entry_points: Any = None) -> Registry:
    """Fill the active registry once (built-ins, then installed plugins); return it."""
    global _ACTIVE
    with _LOCK:
        if _ACTIVE is None:
            reg = builtin_registry()
            # surgery.plugins sits above this module: imported by name, like surgery.builtins
            importlib.import_module("surgery.plugins").load_into(reg, entry_points)
            _ACTIVE = reg
        return _ACTIVE


def current() -> Registry:
    return _ACTIVE if _ACTIVE is not None else load()


@contextmanager
def scoped(reg: Registry | None = None) -> Iterator[Registry]:
    """Make `reg` (default: a copy of the current registry) the active one inside the block."""
    global _ACTIVE
    with _LOCK:
        previous = _ACTIVE
        active = reg if reg is not None else current().snapshot()
        _ACTIVE = active
    try:
        yield active
    finally:
        with _LOCK:
            _ACTIVE = previous
