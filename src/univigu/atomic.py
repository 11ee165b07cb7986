"""Atomic writes: a file or a directory appears under its final name complete, or not at all.

Everything is first written under a temporary name in the same folder (so the rename stays on one
file system), flushed to disk, then renamed into place. A directory that already exists is first
moved aside and removed only after the new one is in place, so a crash leaves either the old or the
new version under the final name or, for the instant between the two renames, the old one under
`.old-NAME`, which `recover_directory` (called before a folder is read or rewritten) moves back.

A failed write (an exception, a full disk) leaves the previous file intact and no partial file
behind; a killed one leaves at most a temporary file, removed by the next write of that name.
A write that fails on the operating system's side raises `OutputError`, one line naming the file.

For the fault tests, `kill_point(name)` makes the process SIGKILL itself at a named point when the
environment says so (`UNIVIGU_KILL_AT=name` or `name@N` for its N-th time), so every interrupted
write reproduces exactly.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
KILL_ENV = "UNIVIGU_KILL_AT"
_kill_counts: dict[str, int] = {}


class OutputError(ValueError):
    """An output cannot be written (read-only place, full disk, a folder in the way): one line."""


def kill_point(name: str) -> None:
    """SIGKILL this process here when UNIVIGU_KILL_AT names this point (`name` or `name@N`)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _describe(err: OSError) -> str:
    return err.strerror or str(err)


def read_json(path: str | Path, error: type[Exception] = ValueError):
    """The JSON in `path`; a missing or broken file raises `error` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err}") from None


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Fail now, with one line, when the file `path` could not be written later: its folder
    cannot be made or written, or a folder stands under its name. Nothing is left behind but
    the folders an output needs anyway."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write {what} {path}: {_describe(err)}") from None
    return path


def fsync_dir(path: Path) -> None:
    """Persist a rename inside `path` (best effort: not every OS lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(path: Path) -> None:
    for item in sorted(path.rglob("*")):
        if item.is_file():
            fsync_file(item)
        elif item.is_dir():
            fsync_dir(item)
    fsync_dir(path)


def temporary_name(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f"{TMP_PREFIX}{final.name}"


def begin_directory(final: str | Path) -> Path:
    """An empty temporary folder beside `final` (a stale one from a killed write is removed)."""
    tmp = temporary_name(final)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_directory(tmp: str | Path, final: str | Path) -> Path:
    """Flush `tmp` to disk and rename it to `final`, replacing an existing `final`."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = old_name(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    kill_point("publish")  # between the two renames: `recover_directory` brings the old one back
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def old_name(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f"{OLD_PREFIX}{final.name}"


def recover_directory(final: str | Path, writer: bool = True) -> Path:
    """Undo what a killed `publish_directory` or `atomic_directory` left: the old folder moved
    aside comes back when the new one never arrived. A writer (the one process that may write
    `final`: it holds the run lock, or is the command writing it) also removes an unfinished
    temporary folder; a reader (`writer=False`) never touches one, which may be a live write."""
    final = Path(final)
    old, tmp = old_name(final), temporary_name(final)
    if old.is_dir():
        if final.exists():
            if writer:
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                old.rename(final)
            except OSError:  # a live writer renamed its new folder into place first
                pass
    if writer and tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """`with atomic_directory(path) as tmp:` write into `tmp`; on success it becomes `path`.
    On an exception the temporary folder is removed and `path` is untouched."""
    recover_directory(final)
    tmp = begin_directory(final)
    try:
        yield tmp
        publish_directory(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_directory(final)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {final}: {_describe(err)}") from None
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path):
    """`with atomic_file(path) as tmp:` write the file `tmp` (any writer: safetensors, PIL, ...);
    on success it is flushed and renamed to `path`, on an exception removed. The temporary name
    carries the process id, so processes writing the same file do not collide."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {final}: {_describe(err)}") from None
    _remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        kill_point("file-write")  # written, not yet renamed: the old file stays, the next write drops this one
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {final}: {_describe(err)}") from None
        raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Temporary files of `final` left by killed processes (their pid is gone)."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        pid = stale.name[len(final.name) + 2:-len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            stale.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
