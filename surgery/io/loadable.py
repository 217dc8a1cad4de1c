"""Before transformers touches a model folder: refuse what would run remote code or unpickle, and
turn what transformers would raise about into located errors."""

from __future__ import annotations

from pathlib import Path

from surgery.io.checkpoint import PICKLE_SUFFIXES
from surgery.errors import CheckpointError
from surgery.jsonio import read_json


def check_loadable(path: Path, where: str | None = None) -> None:
    """`path` loads with transformers' auto classes, safely: config.json readable, a model_type
    transformers knows, no `auto_map` (remote code), weights in safetensors (never a pickle)."""
    import transformers

    where = where or str(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.json", where=where, fix="point at a HuggingFace checkpoint folder")
    cfg = read_json(cfg_path, error=CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json is not a JSON object", where=str(cfg_path))
    if cfg.get("auto_map"):
        raise CheckpointError(
            f"{path.name} needs remote code (config.json has auto_map: {sorted(cfg['auto_map'])[:3]}); "
            "surgery never runs code from a model folder",
            where=where,
            fix="use a model whose architecture transformers ships, or convert it to one",
        )
    mt = cfg.get("model_type")
    if not isinstance(mt, str) or mt not in transformers.CONFIG_MAPPING:
        raise CheckpointError(
            f"model_type {mt!r} is not one transformers {transformers.__version__} knows",
            where=str(cfg_path),
            fix="upgrade transformers, or train a model of a supported architecture",
        )
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path.name} has only pickled weights ({', '.join(pickles[:3])}); pickles can run code when loaded and are refused",
                where=where,
                fix="convert it to safetensors first (e.g. `surgery apply` with --allow-pickle, "
                "which loads with torch.load(weights_only=True))",
            )
        raise CheckpointError(f"{path.name} has no weights (*.safetensors)", where=where)
    tc_path = path / "tokenizer_config.json"
    tc = read_json(tc_path, error=CheckpointError) if tc_path.is_file() else {}
    if isinstance(tc, dict) and tc.get("auto_map"):
        raise CheckpointError(
            f"{path.name}'s tokenizer needs remote code (tokenizer_config.json has auto_map: {str(tc['auto_map'])[:80]}); "
            "surgery never runs code from a model folder",
            where=str(tc_path),
            fix="use a tokenizer transformers ships (e.g. a tokenizer.json with PreTrainedTokenizerFast)",
        )
    # the same checked reader as apply and validate: headers inside their files (a truncated or zeroed
    # shard is a located error here, not a crash inside transformers) and config widths that match the tensors
    from surgery.io.checkpoint import open_checkpoint

    open_checkpoint("model", str(path), path)
