"""Atomic training checkpoints: write into a temporary folder, fsync, rename; keep the last N.

A checkpoint folder `ckpt-00001000/` holds `state.json` (step, stage, config, format) and either

* `format: "safetensors"` (one process): `model.safetensors`, `ema.safetensors`, `optimizer.pt`
  (the optimizer state keyed by parameter names, tensors and plain containers only, loaded with
  `weights_only=True`) and `rng.safetensors`;
* `format: "dcp"` (torchrun + FSDP2): `dcp/` — model, optimizer and EMA shards written by every
  rank with torch.distributed.checkpoint — and `rng-<rank>.safetensors`.

Both resume under any number of processes: DCP reshards on load, and a safetensors checkpoint is
scattered onto the shards. A folder only gets its final name once every file in it is on disk
(`state.json` is written last), so a write killed half-way leaves the previous checkpoint as the
newest complete one. Old checkpoints are renamed aside before they are deleted, so a kill during
the deletion leaves no half-deleted `ckpt-*`; `clean_incomplete` (at the start of every run)
removes what interrupted writes and deletions left.

Loading validates what it reads (each safetensors header against the file's size, the optimizer
state through `weights_only=True`, never pickle), and `CheckpointManager.resume` falls back over
a damaged newest checkpoint to the newest intact one, moving the bad one aside with a warning.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import (OLD_PREFIX, TMP_PREFIX, atomic_directory, begin_directory, kill_point, publish_directory,
                      recover_directory, temporary_name)
from ..models.weights import CheckpointError, check_safetensors
from .build import TrainingError

PREFIX = "ckpt-"
TRASH_PREFIX = ".trash-"  # an old checkpoint being deleted
CORRUPT_PREFIX = "corrupt-"  # a damaged checkpoint moved out of the way by resume


def _plain_state(state: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _begin(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(final folder, empty temporary folder) of checkpoint `step`; stale temporary folders of
    interrupted writes are removed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f"{TMP_PREFIX}{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / f"{PREFIX}{step:08d}"
    return final, begin_directory(final)


def _publish(tmp: Path, final: Path, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write state.json last, rename into place (atomic.py), prune old checkpoints."""
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    kill_point("checkpoint-publish")
    publish_directory(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        remove_checkpoint(old)
    return final


def remove_checkpoint(path: Path) -> None:
    """Rename `path` aside first (one atomic step), then delete it: a kill in between leaves a
    `.trash-` folder that `clean_incomplete` removes, never a half-deleted `ckpt-*`."""
    trash = path.parent / f"{TRASH_PREFIX}{path.name}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    files = sorted(trash.rglob("*"), reverse=True)
    for item in files[:1]:
        if item.is_file():
            item.unlink()
    kill_point("checkpoint-prune")  # part of an old checkpoint deleted
    shutil.rmtree(trash, ignore_errors=True)


def clean_incomplete(run_dir: str | Path) -> list[str]:
    """Remove what killed writes and deletions left in `run_dir` (temporary, half-deleted and
    `ckpt-*` folders without `state.json`); bring back a checkpoint a killed replace moved aside.
    Returns the names removed. Call it only while holding the run lock."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for old in run_dir.glob(f"{OLD_PREFIX}{PREFIX}*"):
        recover_directory(run_dir / old.name[len(OLD_PREFIX):])
    for item in sorted(run_dir.iterdir()):
        stale = item.name.startswith((f"{TMP_PREFIX}{PREFIX}", f"{TRASH_PREFIX}{PREFIX}"))
        incomplete = item.name.startswith(PREFIX) and item.is_dir() and not (item / "state.json").is_file()
        if item.is_dir() and (stale or incomplete):
            shutil.rmtree(item, ignore_errors=True)
            removed.append(item.name)
    return removed


# --------------------------------------------------------------------------------------------
# One process: safetensors
# --------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, ema_state: dict | None,
                    optimizer_state: dict, state: dict, keep_last: int = 2) -> Path:
    """Write checkpoint `step` atomically (safetensors format) and prune all but the newest `keep_last`."""
    run_dir = Path(run_dir)
    final, tmp = _begin(run_dir, step)
    save_file(_plain_state(model_state), str(tmp / "model.safetensors"))
    kill_point("checkpoint-write")  # the temporary folder holds some of the files
    if ema_state is not None:
        save_file(_plain_state(ema_state), str(tmp / "ema.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    save_file(_rng_state(), str(tmp / "rng.safetensors"))
    return _publish(tmp, final, run_dir, step, {"format": "safetensors", **state}, keep_last)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    done = [p for p in run_dir.iterdir()
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
            and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(path: str | Path) -> dict:
    path = Path(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path} is not a complete training checkpoint (no state.json)")
    try:
        return json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}/state.json is not valid JSON: {err}") from None


def load_checkpoint(path: str | Path) -> dict:
    """{'model', 'ema' (or None), 'optimizer', 'state'} of one safetensors-format checkpoint folder."""
    path = Path(path)
    state = read_state(path)
    if state.get("format", "safetensors") != "safetensors":
        raise CheckpointError(f"{path} is a {state['format']} checkpoint; use restore_training_state")
    ema = path / "ema.safetensors"
    for name in ("model.safetensors", "optimizer.pt") + (("ema.safetensors",) if ema.is_file() else ()):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} has no {name}")
        if name.endswith(".safetensors"):
            check_safetensors(path / name)
    try:
        model, ema_state = load_file(str(path / "model.safetensors")), load_file(str(ema)) if ema.is_file() else None
    except Exception as err:  # SafetensorError, OSError: a damaged file the header check let through
        raise CheckpointError(f"checkpoint {path} is unreadable: {str(err).splitlines()[0]}") from None
    return {"model": model, "ema": ema_state, "optimizer": load_optimizer_state(path / "optimizer.pt"),
            "state": state}


def load_optimizer_state(path: Path) -> dict:
    """The optimizer state of `path`, through `torch.load(weights_only=True)` only: a damaged file
    or one that needs pickle to load is a CheckpointError (its advice to unpickle is not repeated)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (a cut-short zip), EOFError, ...
        raise CheckpointError(f"{path} is damaged or not a plain-tensor optimizer state "
                              f"({type(err).__name__}); it is never loaded with pickle") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an optimizer state (a {type(state).__name__})")
    return state


# --------------------------------------------------------------------------------------------
# Trainer state: model + optimizer + EMA, one process or FSDP2
# --------------------------------------------------------------------------------------------


def save_training_state(run_dir: str | Path, step: int, model, optimizer, ema: dict, state: dict,
                        keep_last: int = 2, ctx=None) -> Path:
    """Save model, optimizer (keyed by parameter names), EMA and RNG states at `step`.

    One process: the safetensors format. With a `DistributedContext` every rank must call this:
    each writes its shards through DCP into the temporary folder, then rank 0 publishes it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    run_dir = Path(run_dir)
    if ctx is None:
        return save_checkpoint(run_dir, step, get_model_state_dict(model), ema,
                               get_optimizer_state_dict(model, optimizer), state, keep_last)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = run_dir / f"{PREFIX}{step:08d}", temporary_name(run_dir / f"{PREFIX}{step:08d}")
    if ctx.is_main:
        _begin(run_dir, step)
    ctx.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state, "ema": ema}, checkpoint_id=str(tmp / "dcp"))
    save_file(_rng_state(), str(tmp / f"rng-{ctx.rank}.safetensors"))
    ctx.barrier()
    if ctx.is_main:
        _publish(tmp, final, run_dir, step, {"format": "dcp", "world_size": ctx.world_size, **state}, keep_last)
    ctx.barrier()
    return final


def _copy_into_ema(ema: dict, full: dict, source: Path) -> None:
    """Copy full tensors into the EMA dict, whose entries may be DTensor shards."""
    from .distributed import is_dtensor

    missing = sorted(set(ema) - set(full))
    if missing:
        raise CheckpointError(f"checkpoint {source} has no EMA for {missing[:3]}")
    for name, target in ema.items():
        value = full[name].to(target.dtype)
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements).to_local()
            target.to_local().copy_(value)
        else:
            target.copy_(value.to(target.device))


def restore_training_state(path: str | Path, model, optimizer, ema: dict, ctx=None) -> dict:
    """Load a checkpoint (either format, any world size) into model, optimizer and EMA in place;
    restore the RNG state; return its state.json."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict, set_state_dict)

    path = Path(path)
    state = read_state(path)
    fmt = state.get("format", "safetensors")
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = get_state_dict(model, optimizer)
        target = {"model": model_state, "optim": optim_state, "ema": ema}
        try:
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(target, checkpoint_id=str(path / "dcp"))
        except Exception as err:  # DCP raises CheckpointException and others, with long traces
            raise CheckpointError(f"cannot load the sharded checkpoint {path}: {str(err).splitlines()[0]}") from None
        set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optim"])
        rank = 0 if ctx is None else ctx.rank
        rng = path / f"rng-{rank}.safetensors"
    elif fmt == "safetensors":
        saved = load_checkpoint(path)
        full = StateDictOptions(full_state_dict=ctx is not None)
        set_model_state_dict(model, saved["model"], options=full)
        groups = saved["optimizer"].get("param_groups", [])
        if ctx is None and groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
            optimizer.load_state_dict(saved["optimizer"])  # older checkpoints: keyed by position
        else:
            set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=full)
        if saved["ema"] is not None:
            _copy_into_ema(ema, saved["ema"], path)
        rng = path / "rng.safetensors"
    else:
        raise CheckpointError(f"checkpoint {path} has an unknown format {fmt!r}")
    same_world = (ctx.world_size if ctx is not None else 1) == state.get("world_size", 1)
    if rng.is_file() and same_world:
        _set_rng_state(load_file(str(rng)))
    return state


def read_weights(path: str | Path, which: str = "model") -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model (`which="model"`) or EMA (`"ema"`) weights of a checkpoint of
    either format, in one process (e.g. to compare runs or convert a sharded checkpoint)."""
    if which not in ("model", "ema"):
        raise CheckpointError(f"which must be 'model' or 'ema', got {which!r}")
    path = Path(path)
    state = read_state(path)
    if state.get("format", "safetensors") == "safetensors":
        file = path / f"{which}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} has no {file.name}")
        return load_file(str(file))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path / "dcp"))
    prefix = f"{which}."
    target = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
              for key, meta in reader.read_metadata().state_dict_metadata.items()
              if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "loading in a single process" is what we want here
        warnings.simplefilter("ignore")
        dcp.load({which: target}, storage_reader=reader, no_dist=True)
    return target


# --------------------------------------------------------------------------------------------
# The manager a training run talks to
# --------------------------------------------------------------------------------------------


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


class CheckpointManager:
    """Cadence, keep-last-N, resume and the best model of one run folder (torchtitan's split).

    `OUT/checkpoints/ckpt-N` are training checkpoints; `OUT/best` is the model directory of the
    best validation value so far, with `best.json`. Both are written through `atomic.py`. Under
    torchrun every rank calls `save` and `resume`; `keep_best` runs on rank 0 only.
    """

    def __init__(self, out: Path, train, dist=None):
        self.run_dir, self.best_dir = Path(out) / "checkpoints", Path(out) / "best"
        self.train, self.dist = train, dist
        self.best: dict | None = None  # {"metric", "value", "step"}

    def _on_rank0(self, compute):
        value = compute() if self.dist is None or self.dist.is_main else None
        return value if self.dist is None else self.dist.broadcast_object(value)

    def due(self, step: int) -> bool:
        """A periodic checkpoint at `step` (the final one is `save_final`'s)."""
        every = self.train.save_every
        return bool(every) and step % every == 0 and step != self.train.steps

    def save(self, step: int, model, optimizer, ema: dict, state: dict) -> Path:
        state = {"stage": self.train.stage, "best": self.best, **state}
        return save_training_state(self.run_dir, step, model, optimizer, ema, state,
                                   keep_last=self.train.keep_last, ctx=self.dist)

    def save_final(self, step: int, model, optimizer, ema: dict, state: dict) -> None:
        """Save `step` unless the newest checkpoint already is that step."""
        latest = self._on_rank0(lambda: latest_checkpoint(self.run_dir))
        if latest is None or read_state(latest)["step"] != step:
            self.save(step, model, optimizer, ema, state)

    def resume(self, model, optimizer, ema: dict) -> int:
        """Restore the newest intact checkpoint in place; its step (0 when there is none).

        First the leftovers of killed writes and deletions are removed (rank 0). A checkpoint that
        fails to load is moved aside to `corrupt-ckpt-N` with a warning naming it, and the next
        newest is tried, as torchtitan and Lightning do."""
        def leftovers():
            removed = clean_incomplete(self.run_dir)
            if removed:
                warnings.warn(f"removed incomplete checkpoint folders in {self.run_dir}: {', '.join(removed)}",
                              stacklevel=3)
            return list_checkpoints(self.run_dir)

        candidates = self._on_rank0(leftovers)
        for path in reversed(candidates):
            try:
                stage = read_state(path).get("stage")
            except CheckpointError as err:
                self._set_aside(path, err)
                continue
            if stage != self.train.stage:
                raise TrainingError(f"{self.run_dir.parent} holds a checkpoint of stage {stage!r}, not "
                                    f"{self.train.stage!r}: give each stage its own train.output_dir")
            error = None
            try:
                state = restore_training_state(path, model, optimizer, ema, ctx=self.dist)
            except CheckpointError as err:
                error = err
            if self.dist is not None and self.dist.any(error is not None):
                error = error or CheckpointError(f"checkpoint {path} failed to load on another rank")
            if error is not None:
                self._set_aside(path, error)
                continue
            self.best = state.get("best")
            return state["step"]
        return 0

    def _set_aside(self, path: Path, error: Exception) -> None:
        aside = path.parent / f"{CORRUPT_PREFIX}{path.name}"
        if self.dist is None or self.dist.is_main:
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            warnings.warn(f"checkpoint {path.name} cannot be resumed from ({error}); moved it to {aside.name} "
                          "and fell back to the next newest", stacklevel=3)
        if self.dist is not None:
            self.dist.barrier()

    def keep_best(self, metrics: dict, step: int, write_model) -> bool:
        """Keep `OUT/best` if `metrics` beat the best so far; `write_model(folder)` writes the model
        directory. Returns whether it was replaced."""
        name = self.train.best_metric
        value = metrics.get(name)
        if not isinstance(value, (int, float)):
            warnings.warn(f"train.best_metric {name!r} is not among the validation metrics "
                          f"({', '.join(sorted(k for k in metrics if not k.endswith('_ci95')))})", stacklevel=2)
            return False
        if self.best is not None and self.best.get("metric") == name:
            old = self.best["value"]
            if (value >= old) if lower_is_better(name) else (value <= old):
                return False
        self.best = {"metric": name, "value": float(value), "step": step}
        with atomic_directory(self.best_dir) as tmp:
            write_model(tmp)
            (tmp / "best.json").write_text(json.dumps(self.best, indent=2))
        return True

    def share_best(self) -> None:
        """Give every rank rank 0's record of the best model."""
        if self.dist is not None:
            self.best = self.dist.broadcast_object(self.best)
