"""The output-folder protocol, shared by `surgery apply` and `surgery train`.

An output folder OUT is never written in place. Everything happens next to it:

    .OUT.surgery-lock      a lock file, held (flock) by the one process writing OUT; holds its PID
    .OUT.surgery-partial   the side folder the new output is built in
    .OUT.surgery-old       the previous OUT, for the moment between the two renames of a --force publish

Publishing: every file of the side folder and the folder itself are fsynced, a marker
(`.surgery-complete`) is written and fsynced, then OUT (if any) is renamed to `.OUT.surgery-old`,
the side folder is renamed to OUT, the parent folder is fsynced and the old folder removed.
A kill at any point leaves a state that `recover()` (run by the next apply/train of OUT, with
or without --resume) completes: a marked side folder is published, never thrown away; an
unmarked one stays for --resume; a lone `.OUT.surgery-old` is put back.

What --force may replace (`check_target`): only a folder that surgery or a HuggingFace save wrote
(a safetensors index, `surgery.json`, `train.json`, or config.json with weights) or an empty
one; never a symbolic link, the current directory, or anything the command reads.

What a command reads is part of its contract with this module: `check_target` (which every writer
calls before it writes) refuses to run unless `OutputFolder(out, force=..., reads=...)` was given
`reads`, so every writer (apply, train, analyze, convert, and any to come) says which files and
folders it reads (plan, config, models, data files, caches), and
no folder this protocol removes or replaces (OUT, its side folder, its old copy, a run's work
folder) may be one of them or hold one of them, with or without --force. One-file outputs
(`check_file_target`) follow the same rule: never a file the command reads, nor an existing file
inside a folder it reads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from surgery.errors import OutputError

Reads = Mapping[str, "str | os.PathLike | Iterable[str | os.PathLike]"]

PARTIAL, OLD, LOCK, COMPLETE = ".surgery-partial", ".surgery-old", ".surgery-lock", ".surgery-complete"
# what marks a folder as one surgery wrote (a model, a training run, an `analyze -o` report), so
# that --force may replace it
OUTPUT_MARKERS = ("model.safetensors.index.json", "surgery.json", "train.json", "analysis.json")


def output_path(value: str | os.PathLike | None, *, option: str = "-o/--output") -> Path:
    """Check a user-given output path and make it absolute (not resolved: a link stays a link)."""
    if value is None or not str(value).strip():
        raise OutputError(f"{option}: the output path is empty", fix="give the folder to write, e.g. -o ./grown")
    text = os.fspath(value)
    if "\0" in text:
        raise OutputError(f"{option}: the output path contains a NUL byte", fix="give a plain folder path")
    try:
        p = Path(text).expanduser()
    except RuntimeError:
        p = Path("~")
    if str(p).startswith("~"):
        raise OutputError(f"{option}: cannot expand {text[:80]!r} (no such user)", fix="write the path out in full")
    p = p.absolute()
    if p.name in ("", ".", ".."):
        raise OutputError(f"{option}: {text!r} does not name a folder of its own", where=str(p), fix="name a new folder, e.g. -o ./grown")
    limit = _name_max(p.parent)
    longest = len(f".{p.name}{PARTIAL}".encode())
    if longest > limit:
        raise OutputError(
            f"{option}: the folder name ({p.name[:24]}…) is {len(p.name.encode())} bytes; surgery's side "
            f"folder '.NAME{PARTIAL}' must fit the file system's limit of {limit} bytes",
            fix=f"use a name of at most {limit - len(PARTIAL) - 1} bytes",
        )
    return p


def _name_max(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every regular file under `folder` and every folder, deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for f in files:
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(root), directory=True)


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, fsynced, so `path` is old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(create_file(tmp), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_file(path: Path, mode: int = 0o644) -> int:
    """Open `path` for writing, truncated, never following a symbolic link planted at that name
    (a link there is replaced by a new file instead of writing through it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, mode)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        os.unlink(path)
        return os.open(path, flags | os.O_EXCL, mode)


def _spellings(p: str | os.PathLike) -> set[Path]:
    """A path as written (absolute, normalised, links not followed) and as resolved: a file read
    through a link is guarded both where the link is and where it points."""
    text = os.fspath(p)
    out = {Path(os.path.abspath(os.path.expanduser(text)))}
    try:
        out.add(Path(text).expanduser().resolve())
    except (OSError, RuntimeError):
        pass
    return out


def read_paths(reads: Reads) -> list[tuple[str, Path]]:
    """(what, path) for every declared read, a value being one path or several."""
    pairs: list[tuple[str, Path]] = []
    for what, value in reads.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        for v in values:
            if v is not None and os.fspath(v).strip() and "\0" not in os.fspath(v):
                pairs.append((what, Path(os.fspath(v))))
    return pairs


def refuse_over_reads(target: Path, reads: Reads, *, role: str = "the output") -> None:
    """Refuse `target` (a folder this command will remove or replace) when it is, or holds,
    anything the command reads."""
    mine = _spellings(target)
    for what, r in read_paths(reads):
        for rp in _spellings(r):
            hit = next((t for t in mine if t == rp or t in rp.parents), None)
            if hit is not None:
                holds = "is" if hit == rp else "holds"
                raise OutputError(
                    f"{role} {target} {holds} {what} this command reads ({r}); it is never replaced or removed, with or without --force",
                    where=str(target),
                    fix="write the output to another folder",
                )


def check_file_target(out: Path, force: bool, reads: Reads, *, option: str = "-o/--out") -> None:
    """A one-file output (a schema, an exported config, a picture): never over an existing file
    without --force, never over a link, a file the command reads, or an existing file inside a
    folder it reads, whatever --force says."""
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise OutputError(f"{option}: {out} is a link or not a regular file", fix="write to a new file")
    mine = _spellings(out)
    for what, r in read_paths(reads):
        for rp in _spellings(r):
            if rp in mine or (out.exists() and rp.is_dir() and any(rp in t.parents for t in mine)):
                inside = "" if rp in mine else f" inside {rp}"
                raise OutputError(
                    f"{option}: {out} is{inside} {what} this command reads; it is never replaced",
                    where=str(out),
                    fix="write to another file",
                )
    if out.exists() and not force:
        raise OutputError(f"{option}: {out} already exists", fix="pass --force to replace it")


class OutputFolder:
    """Owns OUT while one run writes it: `with OutputFolder(out, force=..., reads=...) as o: ... o.publish()`.

    `reads`: what the command reads, {what: path or paths}, required before `check_target` (a
    lock-only use needs none); `side`: more folders of this run that the protocol may remove (a
    training run's work folder)."""

    def __init__(self, out: Path, *, force: bool = False, reads: Reads | None = None, side: Iterable[Path] = ()):
        self.out = out
        self.force = force
        self.reads = None if reads is None else dict(reads)
        self.staging = out.parent / f".{out.name}{PARTIAL}"
        self.old = out.parent / f".{out.name}{OLD}"
        self.lock_path = out.parent / f".{out.name}{LOCK}"
        self.side = [Path(p) for p in side]
        self._lock_fd: int | None = None
        self.notes: list[str] = []

    # -- lock ----------------------------------------------------------------------------------
    def __enter__(self) -> OutputFolder:
        self.acquire()
        try:
            self.recover()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        parent = self.out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(
                f"cannot create the output's parent folder: {e.strerror}", where=str(parent), fix="choose an output folder you can write to"
            ) from None
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:  # a link planted at the lock's name: never ours, never followed
                    self.lock_path.unlink()
                    continue
                raise OutputError(
                    f"cannot create the lock file next to the output: {e.strerror}",
                    where=str(self.lock_path),
                    fix="choose an output folder in a place you can write to",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(
                        f"output {self.out} is already being written by "
                        f"{'PID ' + pid if pid else 'another process'} (lock {self.lock_path.name})",
                        fix="wait for that run to finish, or write to another folder",
                    ) from None
                raise OutputError(f"cannot lock the output: {e.strerror}", where=str(self.lock_path)) from None
            # the holder we waited for may have removed the file after we opened it: lock the current one
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            try:
                self.lock_path.unlink()
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- recovery ------------------------------------------------------------------------------
    def staging_complete(self) -> bool:
        return (self.staging / COMPLETE).is_file()

    def recover(self) -> None:
        """Finish or undo a publish that a kill interrupted (see the module's docstring)."""
        old_there = self.old.exists() or self.old.is_symlink()
        out_there = self.out.exists() or self.out.is_symlink()
        if self.staging.is_symlink():  # never ours: a side folder is always a real folder
            _remove(self.staging)
        if self.staging_complete():
            # the interrupted run had finished its output (and, if OUT existed, had --force to replace it)
            if out_there:
                _remove(self.old)
                os.replace(self.out, self.old)
            os.replace(self.staging, self.out)
            fsync_path(self.out.parent, directory=True)
            (self.out / COMPLETE).unlink(missing_ok=True)
            _remove(self.old)
            self.notes.append(f"finished publishing {self.out}, which an interrupted run had completed")
        elif old_there and not out_there:
            os.replace(self.old, self.out)  # the new output was not complete: put the old one back
            fsync_path(self.out.parent, directory=True)
            self.notes.append(f"restored the previous {self.out}, which an interrupted --force run had moved aside")
        elif old_there:
            _remove(self.old)  # the publish finished; only the old copy's removal was interrupted
        for n in self.notes:
            print(f"note: {n}", file=sys.stderr)

    # -- the target ----------------------------------------------------------------------------
    def check_target(self) -> None:
        """Refuse an output that exists (without --force) or that --force must not replace, and
        any folder of this run (OUT, its side folders) that is or holds something the command reads."""
        out = self.out
        if self.reads is None:  # a writer that has not said what it reads cannot be checked: a bug, not a user error
            raise TypeError("OutputFolder.check_target: the command must declare what it reads (reads={...}, {} for nothing)")
        if out.is_symlink():
            raise OutputError(
                f"output {out} is a symbolic link; surgery replaces folders, not links",
                fix="remove the link, or write to the folder it points to by its own path",
            )
        if out.exists() and self.force:
            real = out.resolve()
            cwd = Path.cwd().resolve()
            if real == cwd or real in cwd.parents:
                raise OutputError(
                    f"--force would replace {out}, which is (or contains) the current directory", fix="write the output to a new folder"
                )
        refuse_over_reads(out, self.reads)
        sides = [(self.staging, "the side folder"), (self.old, "the old-output folder")] + [(p, "the run's work folder") for p in self.side]
        for p, role in sides:
            refuse_over_reads(p, self.reads, role=role)
        if not out.exists():
            return
        if not out.is_dir():
            raise OutputError(f"output path {out} exists and is not a folder", fix="choose another output path")
        if not self.force:
            raise OutputError(
                f"output folder {out} already exists",
                fix="pass --force to replace it (only once the new one is complete), or choose another folder",
            )
        entries = [e.name for e in out.iterdir()]
        if entries and not _looks_like_output(out):
            raise OutputError(
                f"--force replaces only a model folder (one with {', '.join(OUTPUT_MARKERS)}, or config.json "
                f"and .safetensors weights) or an empty folder; {out} holds {len(entries)} other entr"
                f"{'y' if len(entries) == 1 else 'ies'} (e.g. {sorted(entries)[0]!r})",
                fix="choose a new output folder, or remove that folder yourself",
            )

    # -- staging and publishing ----------------------------------------------------------------
    def fresh_staging(self) -> Path:
        """An empty side folder (an interrupted, unmarked one is discarded)."""
        try:
            if self.staging.exists() or self.staging.is_symlink():
                _remove(self.staging)
            self.staging.mkdir()
        except OSError as e:
            raise OutputError(
                f"cannot create the side folder: {e.strerror}",
                where=str(self.staging),
                fix="choose an output folder in a place you can write to",
            ) from None
        return self.staging

    def discard_staging(self) -> None:
        _remove(self.staging)

    def publish(self) -> None:
        """Make the side folder OUT, atomically for readers and recoverably after a kill."""
        fsync_tree(self.staging)
        marker = self.staging / COMPLETE
        marker.write_text("")
        fsync_path(marker)
        fsync_path(self.staging, directory=True)
        if self.out.exists():
            _remove(self.old)
            os.replace(self.out, self.old)
            fsync_path(self.out.parent, directory=True)
        os.replace(self.staging, self.out)
        fsync_path(self.out.parent, directory=True)
        (self.out / COMPLETE).unlink(missing_ok=True)
        _remove(self.old)


def _looks_like_output(folder: Path) -> bool:
    if any((folder / m).is_file() for m in OUTPUT_MARKERS):
        return True
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    elif p.exists():
        shutil.rmtree(p, ignore_errors=True)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
