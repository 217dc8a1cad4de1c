"""The plugin API: how other packages add plan steps, merge methods and architectures.

A plugin is a Python package with an entry point in the `surgery.plugins` group that names a
function `register(api)`. `api` is this module's `PluginAPI`, whose methods are the public,
stable way in:

    # pyproject.toml of the plugin
    [project.entry-points."surgery.plugins"]
    myplugin = "my_package:register"

    # my_package/__init__.py
    def register(api):
        api.merge_method(MethodSpec("my_method", (Param("alpha", 0.5),), build=None), kernel=my_kernel)

Plugins load once, on first use, in name order. A duplicate name (two plugins, or a plugin
and the core, defining the same step, method or family) and a plugin that fails to import are
clear errors naming the plugin and where it came from. `surgery plugins` lists what is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import SurgeryError

GROUP = "surgery.plugins"

# External kernels: method name -> kernel(tensors, recipe) -> tensor (whole tensors, plugin's code)
_KERNELS: dict[str, Callable] = {}
_COMMANDS: dict = {}  # CLI subcommands added by plugins
# tokenizer sources beyond a model's own files: name -> build(models: {name: path}, base: name) -> merger
_TOKENIZER_SOURCES: dict[str, Callable] = {}
_CHAT_TEMPLATE_LOOKUPS: list[Callable] = []  # name -> template text or None


@dataclass
class PluginInfo:
    name: str
    origin: str  # "distribution==version (module:attr)"
    steps: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    families: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


class PluginAPI:
    """What a plugin's `register(api)` may call."""

    def __init__(self, info: PluginInfo):
        self.info = info

    def merge_method(self, spec, kernel: Callable | None = None) -> None:
        """Add a merge method. With `spec.build=None`, `kernel(tensors, recipe)` computes it on
        whole tensors (recipe.shared / recipe.per_input hold the resolved parameters)."""
        from dataclasses import replace

        from .methods import register_method

        spec = replace(spec, origin=self.info.origin)
        if spec.build is None and kernel is None:
            raise SurgeryError(f"plugin {self.info.name}: merge method {spec.name!r} needs a build function or a kernel")
        register_method(spec)
        if kernel is not None:
            _KERNELS[spec.name] = kernel
        self.info.methods.append(spec.name)

    def lazy_merge_method(self, name: str, loader: Callable, kernel: Callable) -> None:
        """Add a merge method whose spec `loader()` builds on first use (heavy imports wait until a
        plan uses the method); `kernel(tensors, recipe)` computes it on whole tensors."""
        from .methods import register_lazy_method

        register_lazy_method(name, loader, self.info.origin)
        _KERNELS[name] = kernel
        self.info.methods.append(name)

    def tokenizer_source(self, name: str, build: Callable) -> None:
        """Add a way to make the output tokenizer (e.g. "union"). `build(models, base)` gets
        {plan model name: local folder} and the base's name, and returns an object with
        `vocab_size` (int), `permute(tensors: {name: tensor}) -> {name: tensor}` (token axis 0,
        every model's tensor aligned to the new vocabulary) and `save(folder)` (tokenizer files)."""
        if name in _TOKENIZER_SOURCES:
            raise SurgeryError(f"plugin {self.info.name}: tokenizer source {name!r} is already added")
        _TOKENIZER_SOURCES[name] = build

    def chat_templates(self, lookup: Callable) -> None:
        """Add named chat templates: `lookup(name)` returns the Jinja text, or None if unknown."""
        _CHAT_TEMPLATE_LOOKUPS.append(lookup)

    def command(self, cmd) -> None:
        """Add a `surgery` subcommand (a click command)."""
        if cmd.name in _COMMANDS:
            raise SurgeryError(f"plugin {self.info.name}: command {cmd.name!r} is already added by another plugin")
        _COMMANDS[cmd.name] = cmd
        self.info.commands.append(cmd.name)

    def step(self, schema, fn) -> None:
        """Add a plan step: `schema` a `surgery.plan.Step` subclass with `op`, `fn(step, stack, ctx) -> stack`."""
        from .compile import OPS
        from .plan import register_step

        register_step(schema)
        if schema.op in OPS:
            raise SurgeryError(f"plugin {self.info.name}: operation {schema.op!r} is already implemented")
        OPS[schema.op] = fn
        self.info.steps.append(schema.op)

    def family(self, entry: dict) -> None:
        """Add an architecture entry (the same keys as surgery/architectures/*.json)."""
        from .arch import Family, register_family

        fam = Family.from_dict(entry, f"plugin {self.info.name}")
        register_family(fam, origin=self.info.origin)
        self.info.families.append(fam.name)


_LOADED: list[PluginInfo] | None = None


def load_plugins(entry_points=None) -> list[PluginInfo]:
    """Load every installed plugin once. `entry_points` (for tests): an iterable of EntryPoint."""
    global _LOADED
    if _LOADED is not None and entry_points is None:
        return _LOADED
    if entry_points is None:
        from importlib.metadata import entry_points as eps

        entry_points = eps(group=GROUP)
    from .arch import families

    families()  # built-in families first, so a plugin clash names the plugin
    loaded = [] if _LOADED is None else list(_LOADED)
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name}=={dist.version} ({ep.value})" if dist is not None else ep.value
        info = PluginInfo(ep.name, origin)
        try:
            register = ep.load()
        except Exception as e:  # any import failure of third-party code
            raise SurgeryError(f"plugin {ep.name!r} ({origin}) failed to load: {type(e).__name__}: {e}",
                               fix=f"fix or uninstall the package that provides it (entry point group {GROUP!r})") from None
        if not callable(register):
            raise SurgeryError(f"plugin {ep.name!r} ({origin}): the entry point must name a function register(api)")
        register(PluginAPI(info))
        loaded.append(info)
    _LOADED = loaded
    return loaded


def tokenizer_sources() -> dict[str, Callable]:
    load_plugins()
    return dict(_TOKENIZER_SOURCES)


def named_chat_template(name: str) -> str | None:
    load_plugins()
    for lookup in _CHAT_TEMPLATE_LOOKUPS:
        text = lookup(name)
        if text:
            return text
    return None


def plugin_commands() -> dict:
    load_plugins()
    return dict(_COMMANDS)


def external_kernel(method: str) -> Callable:
    load_plugins()
    try:
        return _KERNELS[method]
    except KeyError:
        raise SurgeryError(f"merge method {method!r} has no kernel loaded") from None
