"""surgery.json read as the validated record it is, never as a raw dict.

Every command that acts on what a grown model's surgery.json says (which layers are new, which
tensors grew and how, what a learned operator did) reads it through `read_provenance`, so a field
of the wrong type (a string where a list of tensor names is meant, a layer index that is a float,
a `new` flag that is the string "yes") is a located error naming the field, not a loop over a
string's characters that makes `*` match everything. Unknown fields are kept (newer writers may
add some); the fields surgery reads are strict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from surgery.errors import CheckpointError, Problem
from surgery.jsonio import read_json

MAX_LAYERS = 100_000
# the formats of surgery.json this version reads: apply's "surgery/1", convert's 1, and none (before formats)
FORMATS = (None, "surgery/1", 1)


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class LayerRecord(_Record):
    layer: StrictInt = Field(ge=0, le=MAX_LAYERS)
    made: Literal["copy", "identity", "zero", "random", "merge"]
    new: StrictBool = False
    sources: list[list[Any]] = []


class Widened(_Record):
    sizes: dict[StrictStr, StrictInt] = {}
    init: Literal["split", "zero", "random"]
    shares: Literal["even", "random"] = "even"
    seed: StrictInt = 0
    tensors: list[StrictStr] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self):
        bad = [n for n in self.tensors if not n or len(n) > 1024 or "\0" in n]
        if bad:
            raise ValueError(f"widened.tensors holds a name that is not a tensor name: {bad[0][:60]!r}")
        if any(v <= 0 or v > 1 << 24 for v in self.sizes.values()):
            raise ValueError("widened.sizes holds a size that is not a positive width")
        return self


class Provenance(_Record):
    format: Optional[Any] = None  # "surgery-provenance/N"; older outputs have none
    new_layers: list[StrictInt] = []
    layer_map: list[LayerRecord] = []
    widened: Optional[Widened] = None
    output: Optional[dict] = None  # num_layers, parameters, shards (names, sizes, header hashes, checksums)
    growth_operator: Optional[dict] = None  # G_learn's record
    plan: Optional[dict] = None  # the plan's text and seed (recompute)
    sources: Optional[dict] = None  # name -> {path, ...} (recompute)
    converted: Optional[dict] = None  # a GGUF conversion: {from, sha256, dtype}
    build: Optional[StrictStr] = None  # the build that wrote it (resume)

    @model_validator(mode="after")
    def _consistent(self):
        if self.format not in FORMATS:
            raise ValueError(
                f"format {self.format!r} is not one this surgery reads ({', '.join(map(repr, FORMATS[1:]))}): "
                "written by a newer version? upgrade surgery"
            )
        n = len(self.layer_map)
        if any(r.layer != i for i, r in enumerate(self.layer_map)):
            raise ValueError("layer_map's entries are not layers 0, 1, 2, ... in order")
        if n and any(not 0 <= i < n for i in self.new_layers):
            raise ValueError(f"new_layers names a layer outside the {n} of layer_map")
        if n and sorted(self.new_layers) != [r.layer for r in self.layer_map if r.new]:
            raise ValueError("new_layers disagrees with the layers layer_map marks new")
        return self

    @property
    def zero_layers(self) -> list[int]:
        """New layers made all zero (`init: zero`): no gradient reaches them."""
        return [r.layer for r in self.layer_map if r.new and r.made == "zero"]

    def record(self) -> dict:
        """The record as it was read (unknown fields kept, no defaults added): what a writer that
        updates surgery.json (a learned operator's weights) starts from."""
        return self.model_dump(mode="json", exclude_unset=True)

    @property
    def shards(self) -> list | None:
        """output.shards as recorded (verify checks each entry), or None."""
        return self.output.get("shards") if isinstance(self.output, dict) else None

    def layer_map_dicts(self) -> list[dict]:
        return [r.model_dump() for r in self.layer_map]

    def widened_dict(self) -> dict:
        return self.widened.model_dump() if self.widened is not None else {}


def read_provenance(folder: str | Path, *, required: bool = False, where: str | None = None) -> Provenance | None:
    """The validated surgery.json of `folder`; None when there is none (unless `required`)."""
    path = Path(folder) / "surgery.json"
    if not path.is_file():
        if required:
            raise CheckpointError(
                f"{folder} has no surgery.json", where=where or str(folder), fix="use a folder written by `surgery apply`"
            )
        return None
    data = read_json(path, error=CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError("surgery.json is not a JSON object", where=str(path), fix="regenerate it with `surgery apply`")
    try:
        return Provenance.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors()[:5]:
            loc = ".".join(str(x) for x in err["loc"])
            problems.append(
                Problem(
                    f"{path}: {loc}" if loc else str(path),
                    f"{err['msg']} (got {str(err.get('input'))[:60]!r})",
                    "surgery.json is written by surgery: regenerate the model with `surgery apply` rather than editing it",
                )
            )
        raise CheckpointError(problems) from None
