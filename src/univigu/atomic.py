"""Atomic writes: a file or a directory appears under its final name complete, or not at all.

Everything is first written under a temporary name in the same folder (so the rename stays on one
file system), flushed to disk, then renamed into place. A directory that already exists is first
moved aside and removed only after the new one is in place, so a crash leaves either the old or the
new version under the final name or, for the instant between the two renames, the old one under
`.old-NAME`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


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
    old = final.parent / f"{OLD_PREFIX}{final.name}"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path):
    """`with atomic_directory(path) as tmp:` write into `tmp`; on success it becomes `path`.
    On an exception the temporary folder is removed and `path` is untouched."""
    tmp = begin_directory(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | Path):
    """`with atomic_file(path) as tmp:` write the file `tmp` (any writer: safetensors, PIL, ...);
    on success it is flushed and renamed to `path`, on an exception removed. The temporary name
    carries the process id, so processes writing the same file do not collide."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
