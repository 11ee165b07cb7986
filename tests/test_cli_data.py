"""`univigu data synth` and `univigu data index`, driven through argparse like the real CLI."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from univigu.commands import data as data_command
from univigu.data.manifest import read_manifest
from univigu.data.video_io import read_video, write_video


def run_cli(argv, capsys):
    """Parse and run like `univigu.cli.main`: ValueError -> 'error: <message>' and exit code 2."""
    parser = argparse.ArgumentParser(prog="univigu")
    subparsers = parser.add_subparsers(dest="command", required=True)
    data_command.register(subparsers)
    try:
        args = parser.parse_args([str(a) for a in argv])
        code = args.func(args)
    except SystemExit as exit_:
        code = exit_.code
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["data", "--help"], ["data", "synth", "--help"],
                                  ["data", "index", "--help"]])
def test_help_has_examples(argv, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0
    assert "examples:" in out and "univigu data" in out


def test_missing_subcommand_fails(capsys):
    code, _, err = run_cli(["data"], capsys)
    assert code == 2 and "required" in err


def test_synth_writes_split_manifests_and_videos(tmp_path, capsys):
    out = tmp_path / "shapes"
    code, stdout, _ = run_cli(["data", "synth", "--out", out, "--num", 10, "--seed", 3, "--size", "32x24",
                               "--frames", 5, "--splits", "train=0.6,val=0.2,test=0.2",
                               "--no-progress"], capsys)
    assert code == 0 and "wrote 10 videos" in stdout
    counts = {}
    for split in ("train", "val", "test"):
        records = read_manifest(out / f"{split}.jsonl")
        counts[split] = len(records)
        for record in records:
            assert record["split"] == split and record["prompt"]
            assert read_video(record["video"]).shape == (5, 24, 32, 3)
    assert counts == {"train": 6, "val": 2, "test": 2}
    world = json.loads((out / "world.json").read_text())
    assert (world["width"], world["height"], world["frames"]) == (32, 24, 5)

    # Same arguments, same data set.
    again = tmp_path / "again"
    run_cli(["data", "synth", "--out", again, "--num", 10, "--seed", 3, "--size", "32*24",
             "--frames", 5, "--splits", "train=0.6,val=0.2,test=0.2", "--no-progress"], capsys)
    for split in ("train", "val", "test"):
        assert (out / f"{split}.jsonl").read_text() == (again / f"{split}.jsonl").read_text()


def test_synth_objects_and_holdout(tmp_path, capsys):
    out = tmp_path / "held"
    code, _, _ = run_cli(["data", "synth", "--out", out, "--num", 8, "--objects", 2, "--min-objects", 2,
                          "--holdout", 0.3, "--no-progress"], capsys)
    assert code == 0
    assert (out / "heldout.jsonl").exists()
    records = [r for s in ("train", "val", "test", "heldout") for r in read_manifest(out / f"{s}.jsonl")]
    assert len(records) == 8
    assert all(len(r["objects"]) == 2 for r in records)


@pytest.mark.parametrize("argv, needle", [
    (["--size", "big"], "--size must look like W*H"),
    (["--splits", "train:0.8"], "--splits must look like"),
    (["--splits", "train=0.5,val=0.1"], "sum to 1"),
    (["--num", "0"], "--num must be at least 1"),
    (["--objects", "2", "--min-objects", "3"], "min_objects"),
])
def test_synth_bad_arguments_give_one_line(tmp_path, capsys, argv, needle):
    code, _, err = run_cli(["data", "synth", "--out", tmp_path / "x", "--num", 4, "--no-progress", *argv],
                           capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]


def test_index_reports_bad_files(tmp_path, capsys):
    videos = tmp_path / "clips"
    videos.mkdir()
    write_video(videos / "one.mp4", np.full((9, 16, 32, 3), 60, np.uint8), fps=8)
    write_video(videos / "two.mp4", np.full((5, 16, 16, 3), 160, np.uint8), fps=5)
    (videos / "broken.mp4").write_text("not a video")
    (videos / "zero.mp4").write_bytes(b"")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(row) + "\n" for row in [
        {"video": "one.mp4", "text": "one", "detailed_caption": "The first clip."},
        {"video": "two.mp4", "text": "two", "detailed_caption": "The second clip."},
        {"video": "broken.mp4", "text": "broken", "detailed_caption": "x"},
        {"video": "zero.mp4", "text": "zero", "detailed_caption": "x"},
    ]))
    out = tmp_path / "manifest.jsonl"
    code, stdout, err = run_cli(["data", "index", "--videos", videos, "--captions", captions, "--out", out,
                                 "--no-progress"], capsys)
    assert code == 1  # a batch that left files out says so in its exit status
    assert err.strip() == f"error: 2 bad file(s) left out of {out} (listed above)"
    assert "2 samples from 2 videos; 2 bad" in stdout
    bad_lines = [line for line in stdout.splitlines() if line.strip().startswith("bad:")]
    assert len(bad_lines) == 2
    assert any("broken.mp4" in line for line in bad_lines) and any("zero.mp4" in line for line in bad_lines)
    records = read_manifest(out)
    assert [(r["prompt"], r["caption"], r["num_frames"], r["width"], r["height"]) for r in records] == [
        ("one", "The first clip.", 9, 32, 16), ("two", "The second clip.", 5, 16, 16)]


def test_index_bad_input_gives_one_line(tmp_path, capsys):
    videos = tmp_path / "clips"
    videos.mkdir()
    code, _, err = run_cli(["data", "index", "--videos", videos, "--captions", tmp_path / "none.csv",
                            "--out", tmp_path / "m.jsonl"], capsys)
    assert code == 2 and err.strip() == f"error: caption file not found: {tmp_path / 'none.csv'}"
    (videos / "a.mp4").write_bytes(b"")
    (tmp_path / "c.csv").write_text("file,prompt\na.mp4,hello\n")
    code, _, err = run_cli(["data", "index", "--videos", videos, "--captions", tmp_path / "c.csv",
                            "--out", tmp_path / "m.jsonl", "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no usable videos" in err
