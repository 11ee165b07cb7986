"""Weight files: reading and writing state dicts without pickle, and checking them against a model.

* safetensors directories, one file or diffusers-style shards with a `*.safetensors.index.json`
  (`find_weight_files`, `load_state_dict_from_dir`, `save_state_dict_to_dir`);
* `.pth` files through `torch.load(weights_only=True)` only (`torch_load_weights_only`);
* `check_state_dict`: one error naming missing and unexpected keys and shape mismatches.

`CheckpointError` is the project's one error type for a checkpoint that is missing, unreadable or
does not fit; the Wan conversion and the training checkpoints raise it too.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_file, atomic_write_text

DIFFUSERS_WEIGHTS_PREFIX = "diffusion_pytorch_model"
# Weight-file stems we look for, in order of preference (diffusers first, transformers-style next).
_WEIGHT_STEMS = (DIFFUSERS_WEIGHTS_PREFIX, "model")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, of an unsupported kind or does not match its config."""


def key_list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def find_weight_files(directory: str | Path) -> tuple[list[Path], Path | None]:
    """The safetensors file(s) holding a directory's weights and the shard index, if any.

    Looks for `diffusion_pytorch_model[.safetensors | .safetensors.index.json]`, then the same with
    `model`, then a complete `NAME-0000i-of-0000N.safetensors` set without index, then a lone
    `*.safetensors`. An index wins over a single file, as in diffusers.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    for stem in _WEIGHT_STEMS:
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            return _files_from_index(index), index
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return [single], None
    candidates = sorted(directory.glob("*.safetensors"))
    shards = [(p, m) for p in candidates if (m := _SHARD_RE.match(p.name))]
    if shards:
        sets = {(m["stem"], int(m["n"])) for _, m in shards}
        if len(sets) > 1:
            raise CheckpointError(f"{directory} holds several sharded checkpoints ({key_list(s for s, _ in sets)}); "
                                  "keep one or add an index.json")
        (stem, total), = sets
        missing = sorted(set(range(1, total + 1)) - {int(m["i"]) for _, m in shards})
        if missing:
            raise CheckpointError(f"{directory}: shard(s) {missing} of {total} of '{stem}' are missing")
        return [p for p, m in sorted(shards, key=lambda pm: int(pm[1]["i"]))], None
    if len(candidates) == 1:
        return candidates, None
    if len(candidates) > 1:
        raise CheckpointError(f"{directory} holds several unrelated safetensors files "
                              f"({key_list(p.name for p in candidates)}); cannot tell which are the weights")
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{directory} has no safetensors weights, only {key_list(pickled)}; directories are read from "
            "safetensors only (pass an original-format .pth file to load_original_wan, which uses "
            "torch.load(weights_only=True))")
    raise CheckpointError(f"no weights in {directory}: expected {DIFFUSERS_WEIGHTS_PREFIX}.safetensors, "
                          f"a sharded set with {DIFFUSERS_WEIGHTS_PREFIX}.safetensors.index.json, or model.safetensors")


def check_safetensors(path: str | Path) -> Path:
    """Check a safetensors file without loading it: a readable header whose tensors end exactly
    where the file does (a file cut short by a kill or a full disk fails here, by name)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 2 or 8 + length > size:
                raise CheckpointError(f"cannot read {path}: not a complete safetensors file ({size} bytes, "
                                      "no whole header)")
            header = json.loads(f.read(length))
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"cannot read {path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: not a safetensors file (its header is not a mapping)")
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        raise CheckpointError(f"cannot read {path}: truncated or damaged ({size} bytes, its header describes "
                              f"{expected})")
    return path


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index} is not a safetensors index (needs a 'weight_map'): {err}") from None
    return weight_map


def _files_from_index(index: Path) -> list[Path]:
    files = sorted(set(_read_weight_map(index).values()))
    missing = [name for name in files if not (index.parent / name).is_file()]
    if missing:
        raise CheckpointError(f"{index.parent}: shard file(s) named in {index.name} are missing: {key_list(missing)}")
    return [index.parent / name for name in files]


def load_state_dict_from_dir(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or every shard), keys as stored."""
    files, index = find_weight_files(directory)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        check_safetensors(path)
        try:
            part = load_file(str(path), device=str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from None
        repeated = state.keys() & part.keys()
        if repeated:
            raise CheckpointError(f"{path.name} repeats key(s) from another shard: {key_list(repeated)}")
        state.update(part)
    if index is not None:
        absent = _read_weight_map(index).keys() - state.keys()
        if absent:
            raise CheckpointError(f"{index.name} lists key(s) that no shard holds: {key_list(absent)}")
    return state


def parse_byte_size(size: int | str) -> int:
    """'10GB' / '500MB' / '20KB' (powers of 10), '1GiB' etc. (powers of 2) or an int -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read size {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match[1]) * units.get((match[2] or "").lower(), 1))


def save_state_dict_to_dir(state: Mapping[str, torch.Tensor], directory: str | Path,
                           max_shard_size: int | str | None = None,
                           prefix: str = DIFFUSERS_WEIGHTS_PREFIX) -> list[Path]:
    """Write `state` as `{prefix}.safetensors`, or as diffusers-style shards plus an index when it is
    larger than `max_shard_size`. Earlier weight files with this prefix are removed first, so a
    directory never holds two disagreeing copies."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for old in list(directory.glob(f"{prefix}*.safetensors")) + list(directory.glob(f"{prefix}*.index.json")):
        old.unlink()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    limit = parse_byte_size(max_shard_size) if max_shard_size is not None else math.inf
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = directory / f"{prefix}.safetensors"
        with atomic_file(path) as tmp:
            save_file(shards[0], str(tmp), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file(shard, str(tmp), metadata=metadata)
        paths.append(path)
        weight_map.update({key: path.name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    atomic_write_text(directory / f"{prefix}.safetensors.index.json",
                      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError naming missing / unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {key_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {key_list(unexpected)}")
    shapes = [f"{k} {list(state[k].shape)} (model: {list(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {', '.join(sorted(shapes)[:5])}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model config: " + "; ".join(problems))


def torch_load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load {path} with torch.load(weights_only=True) (only tensors and plain "
                              f"containers are accepted, never arbitrary pickled objects): {first}") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "module"):  # training checkpoints nest the weights
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj
