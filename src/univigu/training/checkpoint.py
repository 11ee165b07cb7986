"""Atomic training checkpoints: write into a temporary folder, fsync, rename; keep the last N.

A checkpoint folder `ckpt-00001000/` holds `model.safetensors`, `ema.safetensors`,
`optimizer.pt` (tensors and plain containers only, loaded with `weights_only=True`) and
`state.json` (step, scheduler, data position). A folder only gets its final name once every file
in it is on disk, so a write killed half-way leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A training checkpoint is missing or unreadable."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _plain_state(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict | None,
                    optimizer_state: dict, state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep_last`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_plain_state(model_state), str(tmp / "model.safetensors"))
    if ema_state is not None:
        save_file(_plain_state(ema_state), str(tmp / "ema.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    """{'model', 'ema' (or None), 'optimizer', 'state'} of one checkpoint folder."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no state.json)")
    ema = path / "ema.safetensors"
    return {
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(ema)) if ema.is_file() else None,
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }
