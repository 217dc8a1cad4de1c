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

from dataclasses import replace
from typing import Callable

from surgery import registry
from surgery.errors import SurgeryError
from surgery.registry import GROUP, PluginInfo, Registry

__all__ = ["GROUP", "PluginAPI", "PluginInfo", "load_plugins"]


class PluginAPI:
    """What a plugin's `register(api)` may call. Everything goes into one `Registry`."""

    def __init__(self, info: PluginInfo, reg: Registry):
        self.info = info
        self._reg = reg

    def merge_method(self, spec, kernel: Callable | None = None) -> None:
        """Add a merge method. With `spec.build=None`, `kernel(tensors, recipe)` computes it on
        whole tensors (recipe.shared / recipe.per_input hold the resolved parameters)."""
        spec = replace(spec, origin=self.info.origin)
        if spec.build is None and kernel is None:
            raise SurgeryError(f"plugin {self.info.name}: merge method {spec.name!r} needs a build function or a kernel")
        self._reg.add_method(spec, kernel)
        self.info.methods.append(spec.name)

    def lazy_merge_method(self, name: str, loader: Callable, kernel: Callable) -> None:
        """Add a merge method whose spec `loader()` builds on first use (heavy imports wait until a
        plan uses the method); `kernel(tensors, recipe)` computes it on whole tensors."""
        self._reg.add_lazy_method(name, loader, self.info.origin, kernel)
        self.info.methods.append(name)

    def tokenizer_source(self, name: str, build: Callable) -> None:
        """Add a way to make the output tokenizer (e.g. "union"). `build(models, base)` gets
        {plan model name: local folder} and the base's name, and returns an object with
        `vocab_size` (int), `permute(tensors: {name: tensor}) -> {name: tensor}` (token axis 0,
        every model's tensor aligned to the new vocabulary) and `save(folder)` (tokenizer files)."""
        self._reg.add_tokenizer_source(name, build, f"plugin {self.info.name}")

    def chat_templates(self, lookup: Callable) -> None:
        """Add named chat templates: `lookup(name)` returns the Jinja text, or None if unknown."""
        self._reg.chat_template_lookups.append(lookup)

    def command(self, cmd) -> None:
        """Add a `surgery` subcommand (a click command)."""
        self._reg.add_command(cmd, f"plugin {self.info.name}")
        self.info.commands.append(cmd.name)

    def step(self, schema, fn) -> None:
        """Add a plan step: `schema` a `surgery.plan.Step` subclass with `op`, `fn(step, stack, ctx) -> stack`."""
        self._reg.add_step(schema, fn, origin=f"plugin {self.info.name}")
        self.info.steps.append(schema.op)

    def family(self, entry: dict) -> None:
        """Add an architecture entry (the same keys as surgery/architectures/*.json)."""
        from surgery.arch import Family

        fam = Family.from_dict(entry, f"plugin {self.info.name}")
        self._reg.add_family(fam, origin=self.info.origin)
        self.info.families.append(fam.name)


def load_into(reg: Registry, entry_points=None) -> list[PluginInfo]:
    """Run each plugin's `register(api)` against `reg`, in name order, each as one transaction."""
    if entry_points is None:
        from importlib.metadata import entry_points as eps

        entry_points = eps(group=GROUP)
    added = []
    for ep in sorted(entry_points, key=lambda e: e.name):
        if any(p.name == ep.name for p in reg.plugins):
            continue
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name}=={dist.version} ({ep.value})" if dist is not None else ep.value
        info = PluginInfo(ep.name, origin)
        try:
            register = ep.load()
        except Exception as e:  # any import failure of third-party code
            raise SurgeryError(
                f"plugin {ep.name!r} ({origin}) failed to load: {type(e).__name__}: {e}",
                fix=f"fix or uninstall the package that provides it (entry point group {GROUP!r})",
            ) from None
        if not callable(register):
            raise SurgeryError(f"plugin {ep.name!r} ({origin}): the entry point must name a function register(api)")
        with reg.transaction():
            try:
                register(PluginAPI(info, reg))
            except SurgeryError:
                raise
            except Exception as e:
                raise SurgeryError(
                    f"plugin {ep.name!r} ({origin}) failed while registering: {type(e).__name__}: {e}",
                    fix="fix or uninstall the package that provides it",
                ) from None
            reg.plugins.append(info)
        added.append(info)
    return added


def load_plugins(entry_points=None) -> list[PluginInfo]:
    """The plugins loaded into the active registry. `entry_points` (for tests): load these too,
    into the active registry (use `registry.scoped()` around it)."""
    reg = registry.current()
    if entry_points is not None:
        load_into(reg, entry_points)
    return list(reg.plugins)
