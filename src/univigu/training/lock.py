"""One run per output folder: `OUT/.lock` holds the PID, host and start time of the run using it
(PyTorch Lightning and torchtitan refuse a second run into a live folder too).

Under torchrun rank 0 takes the lock for the whole run and every rank learns the outcome, so all
of them stop together when another run holds the folder. A lock left by a process of this host
that is gone is taken over with a warning; a lock of another host cannot be checked, so it is
honoured unless the run is started with `--force`. The same process may take its own lock again
(a resumed `Trainer` in one Python process).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from ..atomic import pid_alive
from .build import TrainingError

LOCK_NAME = ".lock"


class RunLockError(TrainingError):
    """Another live run writes into the same output folder."""


def _holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: a lock file cut short by a kill
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


class RunLock:
    """`OUT/.lock`, taken by `acquire` and removed by `release` (only while it is still ours)."""

    def __init__(self, out: str | Path, force: bool = False):
        self.out, self.force = Path(out), force
        self.path = self.out / LOCK_NAME
        self.held = False
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def _may_take_over(self, holder: dict | None) -> bool:
        """Whether the lock of `holder` may be replaced (RunLockError when it may not)."""
        if holder is None:
            return True
        if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            return True
        if not holder:
            warnings.warn(f"{self.path} is unreadable (a run killed while taking it); taking the lock", stacklevel=4)
            return True
        if holder.get("host") == self.me["host"]:
            pid = holder.get("pid")
            if isinstance(pid, int) and pid_alive(pid):
                raise RunLockError(f"{self.out} is in use by another training run ({_describe(holder)}); "
                                   "wait for it, stop it, or give this run another train.output_dir")
            warnings.warn(f"taking over the lock of {self.out} from a run that is gone ({_describe(holder)})",
                          stacklevel=4)
            return True
        if not self.force:
            raise RunLockError(f"{self.out} is locked by a run on another host ({_describe(holder)}); if that "
                               f"run is gone, start again with --force (or delete {self.path})")
        warnings.warn(f"--force: taking over the lock of {self.out} from {_describe(holder)}", stacklevel=4)
        return True

    def _create(self, tmp: Path) -> bool:
        """Create the lock from the written `tmp` unless a lock exists: a hard link (complete in one
        step), or an exclusive create where the file system has no hard links."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
        return True

    def acquire(self) -> "RunLock":
        """Take the lock, so that two runs starting at once cannot both get it: the lock file is
        created only where none exists, and a stale one is moved aside by one taker only."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / f"{LOCK_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({**self.me, "started": time.time()}))
        try:
            for _ in range(3):
                if self._create(tmp):
                    self.held = True
                    return self
                holder = _holder(self.path)
                if self._may_take_over(holder):
                    aside = self.out / f"{LOCK_NAME}.{os.getpid()}.stale"
                    try:
                        os.rename(self.path, aside)  # one taker only: the others find no file to move
                    except FileNotFoundError:
                        continue
                    if _holder(aside) != holder:  # another run took the stale lock in between: give it back
                        try:
                            os.link(aside, self.path)
                        except OSError:
                            pass
                    aside.unlink(missing_ok=True)
            raise RunLockError(f"cannot take the lock {self.path}: other runs keep taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _holder(self.path)
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)


def acquire_run_lock(out: str | Path, dist=None, force: bool = False) -> RunLock | None:
    """Rank 0 takes the lock of `out`; every rank raises the same RunLockError when it cannot."""
    lock, error = None, None
    if dist is None or dist.is_main:
        try:
            lock = RunLock(out, force).acquire()
        except RunLockError as err:
            error = str(err)
    if dist is not None:
        error = dist.broadcast_object(error)
    if error is not None:
        raise RunLockError(error)
    return lock
