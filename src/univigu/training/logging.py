"""Run logging: JSONL metrics, optional TensorBoard scalars, sample GIFs with captions.

Only rank 0 logs (the trainer builds a disabled logger elsewhere). TensorBoard is optional: when
the `tensorboard` package is missing, scalars still go to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write_text
from ..data.video_io import write_gif


def _scalar(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class RunLogger:
    """Appends `{"step": ..., **metrics}` lines to OUT/metrics.jsonl and TensorBoard scalars to OUT/tb."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        _drop_partial_line(path)
        self._file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.out_dir / "tb"))

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics, "time": time.time()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                value = _scalar(value)
                if value is not None:
                    self._tb.add_scalar(name.replace(".", "/"), value, step)
            self._tb.flush()

    def close(self) -> None:
        self.enabled = False
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a kill left unfinished (lines are appended whole, then flushed), so
    the log holds whole records only."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (the last record wins when a resumed run repeats a step)."""
    by_key: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            kind = "val" if any(k.startswith(("val.", "t2v.", "v2t.")) for k in record) else "train"
            by_key[(record["step"], kind)] = record
    return [by_key[k] for k in sorted(by_key)]


def write_samples(directory: str | Path, fps: float, generated: Sequence[np.ndarray] = (),
                  prompts: Sequence[str] = (), videos: Sequence[np.ndarray] = (),
                  captions: Sequence[str] = (), references: Sequence[str] = ()) -> Path:
    """One sample dump: `t2v-XX.gif` for each prompt's generated video, `v2t-XX.gif` for each
    captioned video, and `samples.json` listing prompts, generated captions and reference captions."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {"t2v": [], "v2t": []}
    for i, (video, prompt) in enumerate(zip(generated, prompts)):
        name = f"t2v-{i:02d}.gif"
        write_gif(directory / name, video, fps=fps)
        index["t2v"].append({"prompt": prompt, "video": name})
    for i, video in enumerate(videos):
        name = f"v2t-{i:02d}.gif"
        write_gif(directory / name, video, fps=fps)
        index["v2t"].append({"video": name, "caption": captions[i] if i < len(captions) else None,
                             "reference": references[i] if i < len(references) else None})
    atomic_write_text(directory / "samples.json", json.dumps(index, indent=2))
    return directory
