"""JSON Schemas: the plan language (`surgery schema`), training configs (`--train`) and the
`validate --format json` report (`--report`).

Editors use the plan schema through a yaml-language-server comment on a plan's first line;
the schema is built from the same pydantic models that check plans, with one entry per
operation (plugins' steps included), so it cannot drift from the checker.
"""

from __future__ import annotations

import copy
from typing import Any

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _lift_defs(schema: dict, defs: dict) -> dict:
    schema = copy.deepcopy(schema)
    defs.update(schema.pop("$defs", {}))
    return schema


def plan_schema() -> dict[str, Any]:
    from surgery.plan import PlanBody, step_types

    defs: dict[str, Any] = {}
    body = _lift_defs(PlanBody.model_json_schema(), defs)
    alternatives = []
    for op, cls in step_types().items():
        name = f"step_{op}"
        s = _lift_defs(cls.model_json_schema(), defs)
        s["description"] = getattr(cls, "summary", "") or s.get("description", "")
        defs[name] = s
        alternatives.append(
            {
                "type": "object",
                "properties": {op: {"anyOf": [{"$ref": f"#/$defs/{name}"}, {"type": "null"}]}},
                "required": [op],
                "additionalProperties": False,
                "title": op,
            }
        )
    body["properties"]["steps"] = {
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": alternatives},
        "description": "ordered operations; each item is {operation: {...}}",
    }
    body["properties"]["models"]["propertyNames"] = {"pattern": r"^[A-Za-z_][\w.-]*$"}
    body.update({"$schema": DIALECT, "$id": "https://surgery.dev/schemas/plan.schema.json", "title": "surgery plan", "$defs": defs})
    return body


_PROBLEM = {
    "type": "object",
    "required": ["where", "what", "fix"],
    "additionalProperties": False,
    "properties": {
        "where": {"type": ["string", "null"], "description": "plan file:line, tensor or file name"},
        "what": {"type": "string"},
        "fix": {"type": ["string", "null"]},
        "code": {"type": "string", "description": "warnings only: the code --ignore takes"},
    },
}


def report_schema() -> dict[str, Any]:
    """The `surgery validate --format json` document, format `surgery.validate/2`."""
    source = {
        "type": "object",
        "required": ["ref", "path", "family", "num_layers", "dtype", "parameters", "bytes"],
        "properties": {
            "ref": {"type": "string"},
            "path": {"type": "string"},
            "family": {"type": "string"},
            "family_guessed": {"type": "boolean"},
            "model_type": {"type": ["string", "null"]},
            "num_layers": {"type": "integer"},
            "dtype": {"type": "string"},
            "parameters": {"type": "integer"},
            "bytes": {"type": "integer"},
            "tied_embeddings": {"type": "boolean"},
            "files": {"type": "array", "items": {"type": "string"}},
            "pickled": {"type": "boolean"},
        },
    }
    layer = {
        "type": "object",
        "required": ["layer", "source", "how", "new", "sources", "step", "where"],
        "properties": {
            "layer": {"type": "integer"},
            "source": {"type": "string"},
            "how": {"type": "string"},
            "new": {"type": "boolean"},
            "made": {"type": "string"},
            "sources": {"type": "array", "items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}},
            "step": {"type": "string"},
            "where": {"type": "string"},
        },
    }
    output = {
        "type": "object",
        "required": [
            "num_layers",
            "dtype",
            "parameters",
            "bytes",
            "bytes_read",
            "tensors",
            "shards",
            "new_layers",
            "config_changes",
            "family",
        ],
        "properties": {
            "num_layers": {"type": "integer"},
            "dtype": {"type": "string"},
            "parameters": {"type": "integer"},
            "bytes": {"type": "integer"},
            "bytes_read": {"type": "integer"},
            "tensors": {"type": "integer"},
            "shards": {"type": "array", "items": {"type": "object", "required": ["name", "bytes", "tensors"]}},
            "new_layers": {"type": "array", "items": {"type": "integer"}},
            "config_changes": {"type": "array", "items": {"type": "string"}},
            "family": {"type": "string"},
        },
    }
    plan = {
        "type": "object",
        "required": ["plan", "valid", "passed", "errors", "warnings"],
        "properties": {
            "plan": {"type": "string"},
            "valid": {"type": "boolean"},
            "passed": {"type": "boolean", "description": "valid, and warning-free under --strict"},
            "errors": {"type": "array", "items": {"$ref": "#/$defs/problem"}},
            "warnings": {"type": "array", "items": {"$ref": "#/$defs/problem"}},
            "sources": {"type": "object", "additionalProperties": source},
            "output": output,
            "layer_map": {"type": "array", "items": layer},
        },
    }
    return {
        "$schema": DIALECT,
        "$id": "https://surgery.dev/schemas/validate-report.schema.json",
        "title": "surgery validate report",
        "type": "object",
        "required": ["format", "surgery_version", "strict", "valid", "plans"],
        "properties": {
            "format": {"const": "surgery.validate/2"},
            "surgery_version": {"type": "string"},
            "strict": {"type": "boolean"},
            "valid": {"type": "boolean", "description": "every plan passed"},
            "plans": {"type": "array", "items": plan},
        },
        "$defs": {"problem": _PROBLEM},
    }
