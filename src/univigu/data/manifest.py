"""JSONL manifests: reading, atomic writing, indexing a folder of videos, and a dataset over them.

A manifest holds one sample per line: ``{"video": path, "prompt": str, "caption": str, ...}``.
Relative video paths resolve against the manifest's own folder, so a data set folder can move as
a whole. `index_videos` builds a manifest from a folder of user videos plus a caption table,
probing every file and recording its resolution and length so training can bucket by shape.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from univigu.atomic import atomic_write_text
from univigu.data.video_io import VideoError, load_video_tensor, probe_video


class ManifestError(ValueError):
    """A manifest or caption table is missing, malformed or lacks a required field."""


class SkippedVideosWarning(UserWarning):
    """Some videos of a dataset could not be read and were skipped."""


VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg",
                              ".mpeg", ".wmv", ".flv", ".ts"})

# Caption-table column names we recognise, in order of preference (matched case-insensitively).
FILE_COLUMNS = ("file", "video", "path", "filename", "file_name", "video_path", "videoid",
                "video_id", "name", "clip")
PROMPT_COLUMNS = ("prompt", "text", "short_caption", "title")
CAPTION_COLUMNS = ("caption", "detailed_caption", "long_caption", "dense_caption", "description")


# --------------------------------------------------------------------------------------------
# Reading and writing
# --------------------------------------------------------------------------------------------


def read_manifest(path: str | Path, required: Sequence[str] = ("video", "prompt"),
                  resolve: bool = True) -> list[dict]:
    """Read a JSONL manifest into a list of dicts.

    Blank lines are skipped. Every other line must be a JSON object holding the `required` fields,
    else ManifestError names the file, the line number and the problem. With `resolve`, a relative
    ``video`` path is made absolute against the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    root = path.resolve().parent
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path} line {number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ManifestError(f"{path} line {number}: expected a JSON object, "
                                    f"got {type(record).__name__}")
            for name in required:
                if name not in record:
                    raise ManifestError(f"{path} line {number}: missing field '{name}'")
            if "video" in record:
                if not isinstance(record["video"], str) or not record["video"]:
                    raise ManifestError(f"{path} line {number}: field 'video' must be a "
                                        f"non-empty string, got {record['video']!r}")
                if resolve:
                    record["video"] = str(root / record["video"])  # absolute paths stay as they are
            records.append(record)
    return records


def _json_default(value: Any) -> Any:
    """Make numpy scalars/arrays and paths JSON-serialisable."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_manifest(path: str | Path, records: Iterable[dict]) -> Path:
    """Write records as JSONL, atomically: a temporary file in the same folder is written,
    fsynced and renamed over `path`, so readers never see a half-written manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ManifestError(f"record {index} is a {type(record).__name__}, not a dict")
        try:
            lines.append(json.dumps(record, ensure_ascii=False, default=_json_default))
        except (TypeError, ValueError) as err:
            raise ManifestError(f"record {index} cannot be written as JSON: {err}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path




# --------------------------------------------------------------------------------------------
# Caption tables
# --------------------------------------------------------------------------------------------


def _pick_column(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def read_caption_table(path: str | Path) -> list[dict]:
    """Read a caption table (.csv with a header row, or .jsonl) into rows with the keys
    ``file``, ``prompt``, ``caption``, ``line`` and ``extra`` (the other columns).

    The file column may be called file/video/path/filename/...; the short text prompt/text/...;
    the detailed caption caption/detailed_caption/description/... At least one of prompt and caption
    is needed; a missing one is filled from the other.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"caption file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            # DictReader numbers data rows from line 2 (after the header).
            raw = [(number, row) for number, row in enumerate(reader, start=2)]
    elif suffix in (".jsonl", ".json"):
        raw, seen = [], {}
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{path} line {number}: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path} line {number}: expected a JSON object")
                seen.update(dict.fromkeys(row))
                raw.append((number, row))
        columns = list(seen)
    else:
        raise ManifestError(f"caption file {path} must be .csv or .jsonl, got '{path.suffix}'")

    file_col = _pick_column(columns, FILE_COLUMNS)
    prompt_col = _pick_column(columns, PROMPT_COLUMNS)
    caption_col = _pick_column(columns, CAPTION_COLUMNS)
    if file_col is None:
        raise ManifestError(f"{path}: no file column (expected one of {', '.join(FILE_COLUMNS)}; "
                            f"found {', '.join(columns) or 'none'})")
    if prompt_col is None and caption_col is None:
        raise ManifestError(f"{path}: no prompt or caption column (expected one of "
                            f"{', '.join(PROMPT_COLUMNS + CAPTION_COLUMNS)}; "
                            f"found {', '.join(columns)})")
    used = {file_col, prompt_col, caption_col}
    rows = []
    for number, row in raw:
        def text(column):
            value = row.get(column) if column else None
            return "" if value is None else str(value).strip()

        prompt, caption = text(prompt_col), text(caption_col)
        rows.append({
            "file": text(file_col),
            "prompt": prompt or caption,
            "caption": caption or prompt,
            "line": number,
            "extra": {k: v for k, v in row.items() if k not in used and k is not None},
        })
    return rows


# --------------------------------------------------------------------------------------------
# Indexing a folder of videos
# --------------------------------------------------------------------------------------------


def _find_videos(videos_dir: Path) -> list[Path]:
    return sorted(p for p in videos_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
                  and not p.name.startswith("."))


def _match_file(name: str, videos_dir: Path, by_rel: dict, by_name: dict, by_stem: dict):
    """Find the video a caption row names: a path relative to the folder (or absolute), else a
    unique file name, else a unique file name without extension (a video id)."""
    candidate = Path(name)
    if candidate.is_absolute() and candidate.is_file():
        return candidate
    if not candidate.is_absolute():
        key = candidate.as_posix()
        while key.startswith("./"):
            key = key[2:]
        if key in by_rel:
            return by_rel[key]
    if (videos_dir / candidate).is_file():
        return videos_dir / candidate
    for table, k in ((by_name, candidate.name), (by_stem, candidate.name)):
        matches = table.get(k, [])
        if len(matches) == 1:
            return matches[0]
    return None


def index_videos(videos_dir: str | Path, captions_file: str | Path, out_path: str | Path,
                 progress: bool = True, decode: bool = True) -> tuple[list[dict], list[dict]]:
    """Build a manifest from a folder of videos and a caption table.

    Every video file under `videos_dir` and every file the table names is probed (`probe_video`;
    with `decode` every frame is decoded, the only sure check for damage inside the data). Good
    samples become manifest records with the probed ``width``, ``height``, ``num_frames``, ``fps``,
    ``duration`` and ``bytes``; video paths are written relative to the manifest's folder. Bad
    files (unreadable, missing, or without a caption) are collected, not raised.

    Returns ``(records, bad)``: the records as written to `out_path`, and one
    ``{"video": path, "reason": str}`` per problem. Raises ManifestError if nothing is usable.
    """
    videos_dir, out_path = Path(videos_dir), Path(out_path)
    if not videos_dir.is_dir():
        raise ManifestError(f"videos folder not found: {videos_dir}")
    rows = read_caption_table(captions_file)
    files = _find_videos(videos_dir)
    by_rel = {p.relative_to(videos_dir).as_posix(): p for p in files}
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in files:
        by_name.setdefault(p.name, []).append(p)
        by_stem.setdefault(p.stem, []).append(p)

    bad: list[dict] = []
    matches: list[tuple[dict, Path]] = []  # (caption row, video) in table order
    for row in rows:
        where = f"line {row['line']} of {captions_file}"
        if not row["file"]:
            bad.append({"video": f"{captions_file} line {row['line']}",
                        "reason": "empty file name"})
            continue
        video = _match_file(row["file"], videos_dir, by_rel, by_name, by_stem)
        if video is None:
            bad.append({"video": str(videos_dir / row["file"]),
                        "reason": f"file not found ({where})"})
        elif not row["prompt"]:
            bad.append({"video": str(video), "reason": f"empty prompt and caption ({where})"})
        else:
            matches.append((row, video))
    captioned = {video for _, video in matches}
    reported = {b["video"] for b in bad}
    for video in files:
        if video not in captioned and str(video) not in reported:
            bad.append({"video": str(video), "reason": f"no caption in {captions_file}"})

    # Probe each captioned video once (a video may have several caption rows).
    to_probe = sorted(captioned)
    probed: dict[Path, dict] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(to_probe), desc="probing videos", unit="video")
    for video in to_probe:
        try:
            probed[video] = probe_video(video, decode=decode)
        except VideoError as err:
            bad.append({"video": str(video), "reason": str(err)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    out_root = out_path.resolve().parent
    records = []
    for row, video in matches:
        if video not in probed:
            continue
        info = probed[video]
        records.append({
            **row["extra"],
            "video": os.path.relpath(video.resolve(), out_root),
            "prompt": row["prompt"],
            "caption": row["caption"],
            "width": info["width"],
            "height": info["height"],
            "num_frames": info["num_frames"],
            "fps": round(info["fps"], 6),
            "duration": round(info["duration"], 6),
            "bytes": video.stat().st_size,
        })
    bad.sort(key=lambda b: b["video"])
    if not records:
        raise ManifestError(f"no usable videos: {len(bad)} problems in {videos_dir} "
                            f"(first: {bad[0]['video']}: {bad[0]['reason']})" if bad else
                            f"no videos found in {videos_dir}")
    write_manifest(out_path, records)
    return records, bad


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class VideoDataset(torch.utils.data.Dataset):
    """Samples of a manifest: ``{"video": FloatTensor [3, F, H, W] in [-1, 1], "prompt", "caption",
    "path", "index", ...other manifest fields}``.

    Frames are sampled and resized as in `load_video_tensor` (`num_frames`, `size` = (W, H),
    `stride` or `fps`). An unreadable video raises VideoError naming the file, unless `skip_bad`:
    then the next readable sample takes its place, the bad one is remembered in `skipped`
    (path -> reason), and iterating over the dataset ends with one warning that counts them.
    """

    def __init__(self, manifest: str | Path | Sequence[dict], num_frames: int | None = None,
                 size: tuple[int, int] | None = None, stride: int | None = None,
                 fps: float | None = None, skip_bad: bool = False,
                 required: Sequence[str] = ("video", "prompt")):
        if isinstance(manifest, (str, Path)):
            self.records = read_manifest(manifest, required=required)
            self.source = str(manifest)
        else:
            self.records = [dict(r) for r in manifest]
            self.source = "records"
        if not self.records:
            raise ManifestError(f"manifest {self.source} holds no samples")
        self.num_frames, self.size, self.stride, self.fps = num_frames, size, stride, fps
        self.skip_bad = skip_bad
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict:
        record = self.records[index]
        video = load_video_tensor(record["video"], num_frames=self.num_frames, size=self.size,
                                  stride=self.stride, fps=self.fps)
        sample = dict(record)
        sample.update(video=video, path=record["video"], index=index)
        sample.setdefault("caption", record.get("prompt", ""))
        return sample

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if not self.skip_bad:
            return self._load(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            path = self.records[candidate]["video"]
            if path in self.skipped:
                continue
            try:
                return self._load(candidate)
            except VideoError as err:
                self.skipped[path] = str(err)
        raise VideoError(f"none of the {len(self)} videos in {self.source} can be read "
                         f"(first: {next(iter(self.skipped.values()))})")

    def __iter__(self) -> Iterator[dict]:
        """Every readable sample once; with `skip_bad`, one counted warning at the end."""
        for index in range(len(self)):
            if self.skip_bad:
                path = self.records[index]["video"]
                if path in self.skipped:
                    continue
                try:
                    yield self._load(index)
                except VideoError as err:
                    self.skipped[path] = str(err)
            else:
                yield self._load(index)
        if self.skip_bad:
            self.warn_skipped(stacklevel=3)  # point at the loop that iterated

    def warn_skipped(self, stacklevel: int = 2) -> int:
        """Emit one warning counting the skipped videos (if any); return the count."""
        if self.skipped:
            first = next(iter(self.skipped.values()))
            warnings.warn(f"skipped {len(self.skipped)} of {len(self)} videos in {self.source} "
                          f"that could not be read (first: {first})", SkippedVideosWarning,
                          stacklevel=stacklevel)
        return len(self.skipped)
