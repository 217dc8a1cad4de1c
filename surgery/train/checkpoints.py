"""Checkpoints a kill cannot corrupt: a checkpoint counts only once its marker is written (fsynced),
half-written ones are set aside on --resume, rotation never deletes the last complete one; and what
a resumed run must share with the interrupted one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from surgery.errors import OutputError
from surgery.train.dist import barrier, is_main


CHECKPOINT_DONE = "surgery-complete"


def mark_checkpoint_complete(folder: Path) -> None:
    from surgery.io.outdir import fsync_path, fsync_tree

    fsync_tree(folder)
    (folder / CHECKPOINT_DONE).write_text("")
    fsync_path(folder / CHECKPOINT_DONE)
    fsync_path(folder, directory=True)


def _checkpoints(folder: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint-N folder, oldest first."""
    out = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p, (p / CHECKPOINT_DONE).is_file() and (p / "trainer_state.json").is_file()))
    return sorted(out)


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints (and nothing incomplete older than them)."""
    if not keep:
        return
    complete = [p for _, p, ok in _checkpoints(folder) if ok]
    for p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def last_complete_checkpoint(folder: Path, echo=print) -> str | None:
    """The newest checkpoint whose save finished; newer, half-written ones (a kill during a save)
    are set aside so the Trainer never sees them."""
    found = _checkpoints(folder)
    good = [p for _, p, ok in found if ok]
    newest = good[-1] if good else None
    for step, p, ok in found:
        if not ok:
            echo(
                f"note: {p.name} was not saved completely (interrupted); resuming from "
                f"{newest.name if newest else 'the start of the stage'}"
            )
            shutil.rmtree(p, ignore_errors=True)
    return str(newest) if newest else None


# what a resumed run must share with the interrupted one (the rest, e.g. eval_every, may change)
RESUME_KEYS = (
    "model",
    "data",
    "trainable",
    "freeze_embeddings",
    "micro_batch",
    "grad_accum",
    "tokens",
    "steps",
    "seed",
    "grow",
    "schedule",
    "fsdp",
)


def check_resumable(saved: Path, body, where: str) -> None:
    if not saved.is_file():
        return
    before = json.loads(saved.read_text())
    now = body.model_dump(mode="json")
    changed = [k for k in RESUME_KEYS if before.get(k) != now.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise OutputError(
            f"--resume with a different config than the interrupted run ({diff})"[:900],
            where=where,
            fix="resume with the same settings, or pass --force (without --resume) to start over",
        )


def save_stage(trainer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if is_main() and tmp.exists():
        shutil.rmtree(tmp)
    trainer.save_model(str(tmp))
    barrier()
    if is_main():
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier()
