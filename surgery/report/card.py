"""The model card (`README.md`) written into every output."""

from __future__ import annotations

import yaml

from surgery.io.safetensors import dtype_name
from surgery.compile import Program
from surgery.report.summary import human_bytes, human_count


def model_card(p: Program) -> str:
    hub_refs = sorted({c.ref for c in p.ckpts.values() if not c.ref.startswith((".", "/", "~"))})
    front = {
        "library_name": "transformers",
        "tags": ["surgery", "model-growth" if p.new_layers or p.num_layers > max(c.num_layers for c in p.ckpts.values()) else "merge"],
    }
    if hub_refs:
        front["base_model"] = hub_refs
    name = p.plan.body.name or f"{p.family.name} checkpoint made by surgery"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines.append(
        f"This checkpoint was made with `surgery` from the plan `{p.plan.source}`: "
        f"{p.num_layers} layers, {human_count(p.num_params)} parameters, {dtype_name(p.dtype)}, "
        f"{human_bytes(p.bytes_out)} in {len(p.shards)} shard(s)."
    )
    lines += ["", "## Sources", "", "| name | model | family | layers |", "| --- | --- | --- | --- |"]
    for n, c in p.ckpts.items():
        lines.append(f"| {n} | `{c.ref}` | {c.family.name} | {c.num_layers} |")
    lines += ["", "## Steps", ""]
    for s in p.plan.steps:
        body = s.model_dump(exclude_defaults=True, mode="json")
        lines.append(f"- `{s.op}`: `{yaml.safe_dump(body, default_flow_style=True, sort_keys=False).strip()}`")
    if p.new_layers:
        lines += ["", f"New layers (inserted or random; `surgery.json` lists them for training): {p.new_layers}."]
    if p.config_changes:
        lines += ["", "## Config changes", ""] + [f"- {c}" for c in p.config_changes]
    lines += [
        "",
        "## Layer map",
        "",
        "![layer map: source layers left, output layers right](layer_map.svg)",
        "",
        "| layer | source | how |",
        "| ---: | --- | --- |",
    ]
    for row in p.layer_map():
        lines.append(f"| {row['layer']} | {row['source']} | {row['how']} |")
    if p.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w.what} (`{w.code}`)" for w in p.warnings]
    lines += ["", "## Plan", "", "```yaml", yaml.safe_dump(p.plan.raw, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
