"""JSONL manifests: reading, atomic writing, and indexing a folder of videos.

A manifest holds one sample per line: ``{"video": path, "prompt": str, "caption": str, ...}``.
Relative video paths resolve against the manifest's own folder, so a data set folder can move as
a whole. `index_videos` builds a manifest from a folder of user videos plus a caption table,
probing every file and recording its resolution and length so training can bucket by shape.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from univigu.atomic import atomic_write_text
from univigu.data.video_io import VideoError, probe_video


class ManifestError(ValueError):
    """A manifest or caption table is missing, malformed or lacks a required field."""


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
