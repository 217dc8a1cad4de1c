"""Safe YAML loading that remembers where every value came from.

PyYAML's `safe_load` forgets line numbers, silently keeps the last of two duplicate keys and
expands aliases without limit. Here the document is composed into nodes (safe: no object tags),
then built into plain Python values by a walk that

- records `path -> line` for every mapping key and sequence item, so schema errors can name
  `plan.yaml:12`;
- rejects duplicate keys;
- bounds the number of values built and the nesting depth, so an alias bomb ("billion laughs")
  or a deeply nested document is an error instead of an out-of-memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import PlanError
from surgery.jsonio import bracket_depth
from surgery.io.paths import resolve_path  # noqa: F401  (FromDocument.path; train imports it from here)

MAX_NODES = 100_000
MAX_INT = 2**64  # every count, index, size or seed a plan or config holds fits in 64 bits; bigger is a typo or an attack
MAX_DEPTH = 64
MAX_BYTES = 4 * 1024 * 1024


@dataclass
class Located:
    """A YAML document as plain data, with the source line of each path."""

    data: Any
    source: str  # file name shown in errors
    lines: dict[tuple, int] = field(default_factory=dict)
    notes: list = field(default_factory=list)  # located warnings made while reading (e.g. a translated mergekit config)

    def where(self, path: tuple = ()) -> str:
        """`file:line` for the deepest recorded prefix of `path`."""
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.source}:{line}" if line else self.source


class FromDocument:
    """For objects made from a located document (`doc`) in a folder (`base_dir`): plans and training
    configs. Where a value came from (`file:line`), and paths relative to the file."""

    doc: Located
    base_dir: Path

    @property
    def source(self) -> str:
        return self.doc.source

    def where(self, *path) -> str:
        return self.doc.where(tuple(path))

    def path(self, p: str | Path) -> Path:
        return resolve_path(p, self.base_dir)


def load_yaml_text(text: str, source: str) -> Located:
    if len(text) > MAX_BYTES:
        raise PlanError(f"file is {len(text)} bytes; plans are limited to {MAX_BYTES}", where=source)
    depth = bracket_depth(text, _QUOTED, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise PlanError(
            f"nesting deeper than {MAX_DEPTH} levels of brackets", where=source, fix="plans are shallow: write the lists and mappings out"
        )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except RecursionError:
        raise PlanError(
            f"nesting deeper than {MAX_DEPTH} levels", where=source, fix="plans are shallow: write the lists and mappings out"
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        what = f"not valid YAML: {e.problem or e.context}"
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            what += f" ({e.context} at line {e.context_mark.line + 1})"
        raise PlanError(what, where=where, fix="check indentation and quoting near this line") from None
    except yaml.YAMLError as e:
        raise PlanError(f"not valid YAML: {e}", where=source) from None
    finally:
        loader.dispose()
    doc = Located(None, source)
    if node is None:
        return doc
    builder = _Builder(loader, doc)
    doc.data = builder.build(node, (), 0)
    doc.lines[()] = node.start_mark.line + 1
    return doc


def load_yaml_file(path: str | Path) -> Located:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PlanError("file not found", where=str(path), fix="check the path") from None
    except OSError as e:
        raise PlanError(f"cannot read: {e.strerror}", where=str(path)) from None
    if len(raw) > MAX_BYTES:
        raise PlanError(f"file is {len(raw)} bytes; plans are limited to {MAX_BYTES}", where=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PlanError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", where=f"{path}:{line}", fix="save the plan as UTF-8"
        ) from None
    return load_yaml_text(text, str(path))


_QUOTED = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|\'[^\']*(?:\'\'[^\']*)*\'|#[^\n]*')  # strings and comments


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, doc: Located):
        self.loader = loader
        self.doc = doc
        self.count = 0

    def _where(self, node) -> str:
        return f"{self.doc.source}:{node.start_mark.line + 1}"

    def build(self, node, path: tuple, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise PlanError(
                f"document expands to more than {MAX_NODES} values (an alias bomb?)",
                where=self._where(node),
                fix="write the plan out without YAML aliases",
            )
        if depth > MAX_DEPTH:
            raise PlanError(f"nesting deeper than {MAX_DEPTH} levels", where=self._where(node))
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
            raise PlanError(
                f"unsupported YAML value: tag {node.tag!r}",
                where=self._where(node),
                fix="plans use plain YAML: strings, numbers, lists and mappings",
            )
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolves `<<:` merge keys, safely
            out: dict = {}
            for knode, vnode in node.value:
                key = self.build(knode, path, depth + 1)
                if isinstance(key, (list, dict)):
                    raise PlanError("mapping keys must be plain values", where=self._where(knode))
                if key in out:
                    raise PlanError(
                        f"duplicate key {key!r}", where=self._where(knode), fix="each key may appear once in a mapping; remove one"
                    )
                self.doc.lines[path + (key,)] = knode.start_mark.line + 1
                out[key] = self.build(vnode, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.doc.lines[path + (i,)] = item.start_mark.line + 1
                items.append(self.build(item, path + (i,), depth + 1))
            return items
        try:
            value = self.loader.construct_object(node, deep=False)
        except yaml.constructor.ConstructorError as e:
            raise PlanError(
                f"unsupported YAML value: {e.problem}",
                where=self._where(node),
                fix="plans use plain YAML: strings, numbers, lists and mappings",
            ) from None
        except (ValueError, OverflowError) as e:  # a 5,000-digit integer: Python refuses to convert it
            raise PlanError(
                f"the number {str(node.value)[:24]}... ({len(str(node.value))} characters) cannot be read: {str(e)[:80]}",
                where=self._where(node),
                fix="numbers in plans and configs fit in 64 bits",
            ) from None
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise PlanError(
                f"the integer {str(value)[:24]}{'...' if len(str(value)) > 24 else ''} is out of range (more than 64 bits)",
                where=self._where(node),
                fix="give a realistic count or index",
            )
        if isinstance(value, (bytes, bytearray)):
            raise PlanError(
                f"unsupported YAML value: tag {node.tag!r} (binary data)",
                where=self._where(node),
                fix="plans use plain YAML: strings, numbers, lists and mappings",
            )
        return value
