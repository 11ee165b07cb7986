"""JSONL manifests, caption tables and indexing a folder of real videos."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from univigu.data.manifest import (
    ManifestError,
    index_videos,
    read_caption_table,
    read_manifest,
    write_manifest,
)
from univigu.data.video_io import write_video


def flat_video(num, height, width, level):
    return np.full((num, height, width, 3), level, dtype=np.uint8)


# ------------------------------------------------------------------------------------------
# read / write
# ------------------------------------------------------------------------------------------


def test_round_trip_resolves_relative_paths_against_the_manifest(tmp_path, monkeypatch):
    records = [
        {"video": "clips/a.mp4", "prompt": "a red circle", "caption": "A red circle.", "n": 3},
        {"video": "/abs/b.mp4", "prompt": "ünïcode ✓", "caption": "x", "objects": [{"k": 1}]},
    ]
    path = write_manifest(tmp_path / "data" / "m.jsonl", records)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records  # written as given
    monkeypatch.chdir(tmp_path)  # resolution must not depend on the working directory
    back = read_manifest(path)
    assert back[0]["video"] == str((tmp_path / "data" / "clips" / "a.mp4").resolve())
    assert back[1]["video"] == "/abs/b.mp4"
    assert back[0]["n"] == 3 and back[1]["prompt"] == "ünïcode ✓" and back[1]["objects"] == [{"k": 1}]
    assert read_manifest(path, resolve=False) == records


def test_write_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [{"video": "a.mp4", "prompt": "one"}])
    write_manifest(path, [{"video": "b.mp4", "prompt": "two", "n": np.int64(4), "x": np.float32(0.5)}])
    assert read_manifest(path, resolve=False) == [{"video": "b.mp4", "prompt": "two", "n": 4, "x": 0.5}]
    with pytest.raises(ManifestError, match="record 1"):
        write_manifest(path, [{"video": "c.mp4", "prompt": "ok"}, {"video": "d.mp4", "prompt": object()}])
    assert read_manifest(path, resolve=False)[0]["video"] == "b.mp4"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]  # no temporary files left behind


def test_read_errors_name_file_line_and_field(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found: .*nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
    path = tmp_path / "m.jsonl"
    path.write_text('{"video": "a.mp4", "prompt": "p"}\n\n{"video": "b.mp4", "prompt": "p"\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl line 3: invalid JSON"):
        read_manifest(path)
    path.write_text('{"video": "a.mp4", "prompt": "p"}\n{"video": "b.mp4"}\n')
    with pytest.raises(ManifestError, match=r"line 2: missing field 'prompt'"):
        read_manifest(path)
    assert len(read_manifest(path, required=("video",))) == 2
    path.write_text('["video", "prompt"]\n')
    with pytest.raises(ManifestError, match="line 1: expected a JSON object"):
        read_manifest(path)
    path.write_text('{"video": 3, "prompt": "p"}\n')
    with pytest.raises(ManifestError, match="line 1: field 'video' must be a non-empty string"):
        read_manifest(path)


# ------------------------------------------------------------------------------------------
# Caption tables
# ------------------------------------------------------------------------------------------


def test_caption_table_accepts_common_column_names(tmp_path):
    csv_path = tmp_path / "c.csv"
    # Excel-style BOM, capitalised names, a quoted comma, an extra column.
    csv_path.write_text('\ufeffVideo,Text,Detailed_Caption,split\n'
                        'a.mp4,a dog,"A brown dog, running.",train\n', encoding="utf-8")
    [row] = read_caption_table(csv_path)
    assert (row["file"], row["prompt"], row["caption"]) == ("a.mp4", "a dog", "A brown dog, running.")
    assert row["extra"] == {"split": "train"} and row["line"] == 2

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"path": "x/b", "caption": "only a caption"}\n')
    [row] = read_caption_table(jsonl)
    assert (row["file"], row["prompt"], row["caption"]) == ("x/b", "only a caption", "only a caption")


def test_caption_table_errors(tmp_path):
    with pytest.raises(ManifestError, match="caption file not found"):
        read_caption_table(tmp_path / "none.csv")
    bad = tmp_path / "c.csv"
    bad.write_text("name_of_thing,prompt\nx,y\n")
    with pytest.raises(ManifestError, match="no file column .*found name_of_thing, prompt"):
        read_caption_table(bad)
    bad.write_text("file,score\nx,1\n")
    with pytest.raises(ManifestError, match="no prompt or caption column"):
        read_caption_table(bad)
    other = tmp_path / "c.txt"
    other.write_text("x")
    with pytest.raises(ManifestError, match="must be .csv or .jsonl"):
        read_caption_table(other)


# ------------------------------------------------------------------------------------------
# index_videos on a folder mixing good and bad files
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    videos = root / "videos"
    (videos / "sub").mkdir(parents=True)
    write_video(videos / "good_a.mp4", flat_video(9, 32, 48, 40), fps=8)
    write_video(videos / "sub" / "good_b.mp4", flat_video(13, 24, 24, 200), fps=4)
    write_video(videos / "uncaptioned.mp4", flat_video(5, 16, 16, 90), fps=8)
    data = (videos / "good_a.mp4").read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "text.mp4").write_text("not a video at all\n" * 10)
    (videos / "readme.txt").write_text("ignored: not a video extension")
    captions = root / "captions.csv"
    captions.write_text(
        "file,prompt,caption,source\n"
        "good_a.mp4,a dark frame,A dark grey frame that never changes.,cam1\n"
        "good_b,a bright frame,A bright frame.,cam2\n"  # matched by video id (no extension)
        "truncated.mp4,cut,Cut short.,cam1\n"
        "empty.mp4,empty,Zero bytes.,cam1\n"
        "text.mp4,text,A text file.,cam1\n"
        "vanished.mp4,gone,Not on disk.,cam1\n"
        "good_a.mp4,a second caption,Another caption for the same clip.,cam1\n"
    )
    return root, videos, captions


def test_index_folder_reports_bad_files_and_keeps_good_ones(user_folder, capsys):
    root, videos, captions = user_folder
    out = root / "out" / "manifest.jsonl"
    records, bad = index_videos(videos, captions, out, progress=False)

    bad_names = {os.path.basename(b["video"]) for b in bad}
    assert bad_names == {"truncated.mp4", "empty.mp4", "text.mp4", "vanished.mp4", "uncaptioned.mp4"}
    reasons = {os.path.basename(b["video"]): b["reason"] for b in bad}
    assert "empty" in reasons["empty.mp4"] and "not found" in reasons["vanished.mp4"]
    assert "no caption" in reasons["uncaptioned.mp4"]

    # The manifest holds the good samples in table order, with probed metadata.
    assert [r["prompt"] for r in records] == ["a dark frame", "a bright frame", "a second caption"]
    written = read_manifest(out)
    assert [r["prompt"] for r in written] == [r["prompt"] for r in records]
    a, b = written[0], written[1]
    assert os.path.samefile(a["video"], videos / "good_a.mp4")
    assert os.path.samefile(b["video"], videos / "sub" / "good_b.mp4")
    assert (a["width"], a["height"], a["num_frames"], a["fps"]) == (48, 32, 9, 8.0)
    assert (b["width"], b["height"], b["num_frames"], b["fps"]) == (24, 24, 13, 4.0)
    assert a["duration"] == pytest.approx(9 / 8, abs=1e-3) and b["duration"] == pytest.approx(13 / 4, abs=1e-3)
    assert a["bytes"] == (videos / "good_a.mp4").stat().st_size
    assert a["caption"] == "A dark grey frame that never changes." and a["source"] == "cam1"
    # Paths are stored relative to the manifest, so the folder can move as a whole.
    assert not os.path.isabs(records[0]["video"])


def test_index_fails_clearly_when_nothing_is_usable(tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    (videos / "x.mp4").write_text("text")
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"file": "x.mp4", "prompt": "p"}\n')
    with pytest.raises(ManifestError, match="no usable videos"):
        index_videos(videos, captions, tmp_path / "m.jsonl", progress=False)
    assert not (tmp_path / "m.jsonl").exists()
    with pytest.raises(ManifestError, match="videos folder not found"):
        index_videos(tmp_path / "missing", captions, tmp_path / "m.jsonl", progress=False)
