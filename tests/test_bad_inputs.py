"""Every bad input, through the CLI's entry point, as a new user would meet it: a table of
(argv, expected exit code, words the one `error:` line must hold). Each case runs in-process
through `univigu.cli.main`; a few run as real subprocesses to show that no traceback escapes the
top-level handler. None may exit 0, print a traceback, or leave an output file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from pipeline_helpers import tiny_model_dir
from training_helpers import tiny_overrides, training_cache  # noqa: F401 (fixture)

from univigu.cli import main
from univigu.data.video_io import write_video

PROMPT = "a small red circle moves to the left"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A model directory, its damaged copies, and the files the cases point at."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model_dir(root / "model")
    for name, damage in (("no_world", "world.json"), ("no_sampler", "sampler.json")):
        shutil.copytree(model, root / name)
        (root / name / damage).unlink()
    shutil.copytree(model, root / "broken_config")
    (root / "broken_config" / "transformer" / "config.json").write_text('{"num_layers": 2\n"x": 1}')
    write_video(root / "clip.mp4", np.full((5, 16, 16, 3), 90, np.uint8))
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "a_folder.mp4").mkdir()
    (root / "list.yaml").write_text("- train\n- model\n")
    (root / "broken.yaml").write_text("train: [1, 2\n")
    (root / "other_data").mkdir()
    (root / "other_data" / "mine.txt").write_text("keep me\n")
    (root / "manifest.jsonl").write_text(json.dumps({"video": "clip.mp4", "prompt": PROMPT, "caption": PROMPT,
                                                     "objects": []}) + "\n")
    (root / "out.jsonl").mkdir()
    (root / "captions.csv").write_text("file,prompt\nclip.mp4,hello\n")
    return root


def live_lock(out, host=None, pid=None):
    """The lock of a live run: this process's parent on this host (or any pid on another host)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps({"pid": pid or os.getppid(), "host": host or socket.gethostname(),
                                           "started": time.time() - 60}))
    return out


def cases(p, cache):
    """(argv, exit code, words); `p` is the fixture folder, `cache` the shared training cache."""
    gen = ["generate", "--prompt", PROMPT, "--ckpt_dir", p / "model", "--save_file", p / "o.mp4"]
    joint = ["joint", "--prompt", PROMPT, "--ckpt_dir", p / "model", "--save_file", p / "o.mp4"]
    cap = ["caption", p / "clip.mp4", "--ckpt_dir", p / "model"]

    def train(*overrides, out="run"):
        return ["train", "--no-progress", *tiny_overrides(p / out, cache, *overrides)]

    ev = ["eval", "--ckpt_dir", p / "model", "--manifest", p / "manifest.jsonl", "--no-progress"]
    synth = ["data", "synth", "--num", 2, "--no-progress"]
    index = ["data", "index", "--videos", p, "--captions", p / "captions.csv", "--no-progress"]
    return [
        # generate: sampler flags, sizes, outputs, the model folder
        (gen + ["--sample_guide_scale", "nan"], 2, ["--sample_guide_scale", "finite"]),
        (gen + ["--sample_guide_scale", "inf"], 2, ["--sample_guide_scale", "finite"]),
        (gen + ["--sample_steps", 0], 2, ["--sample_steps", "at least 1"]),
        (gen + ["--sample_shift", 0], 2, ["--sample_shift", "greater than 0"]),
        (gen + ["--sample_shift", "nan"], 2, ["--sample_shift", "finite"]),
        (gen + ["--frame_num", -1], 2, ["--frame_num", "at least 1"]),
        (gen + ["--size", "0*16"], 2, ["--size width", "at least 1"]),
        (gen + ["--fps", 0], 2, ["--fps"]),
        (gen[:-1] + ["/sys/univigu-out.mp4"], 2, ["cannot write --save_file", "/sys/univigu-out.mp4"]),
        (gen[:-1] + [p / "a_file.txt" / "o.mp4"], 2, ["cannot write --save_file", "a_file.txt"]),
        (gen[:-1] + [p / "a_folder.mp4"], 2, ["a_folder.mp4", "is a folder"]),
        (gen + ["--gif", "/sys/univigu-out.gif"], 2, ["cannot write --gif"]),
        (gen + ["--contact_sheet", p / "sheet.jpg"], 2, ["--contact_sheet must end in .png"]),
        (["generate", "--prompt", PROMPT, "--ckpt_dir", p / "no_world"], 2, ["world.json", "--size and --frame_num"]),
        (["generate", "--prompt", PROMPT, "--ckpt_dir", p / "broken_config", "--save_file", p / "o.mp4"], 2,
         ["transformer/config.json", "not valid JSON"]),
        (["generate", "--prompt", PROMPT, "--ckpt_dir", p / "a_file.txt"], 2, ["got a file"]),
        # joint: the text flags too
        (joint + ["--text_guide_scale", "nan"], 2, ["--text_guide_scale", "finite"]),
        (joint + ["--text_guide_scale=-inf"], 2, ["--text_guide_scale", "finite"]),
        (joint + ["--temperature", -1], 2, ["--temperature", "at least 0"]),
        (joint + ["--sample_guide_scale", "inf"], 2, ["--sample_guide_scale", "finite"]),
        # caption
        (cap + ["--sample_guide_scale", "nan"], 2, ["--sample_guide_scale", "finite"]),
        (cap + ["--temperature", "inf"], 2, ["--temperature", "finite"]),
        (cap + ["--sample_steps", 0], 2, ["--sample_steps"]),
        (cap + ["--batch_size", 0], 2, ["--batch_size"]),
        (cap + ["--candidates", 0], 2, ["--candidates"]),
        (cap + ["--base_seed", -1], 2, ["--base_seed"]),
        (["caption", p / "clip.mp4", "--ckpt_dir", p / "no_sampler"], 2, ["sampler.json", "--size and --frame_num"]),
        (["caption", p / "a_file.txt", "--ckpt_dir", p / "model"], 2, ["a_file.txt"]),
        # train: config values, config files, overrides, the run lock
        (train("train.steps=-3"), 2, ["train.steps", ">= 1", "-3"]),
        (train("train.batch_size=0"), 2, ["train.batch_size"]),
        (train("train.lr=nan"), 2, ["train.lr", "finite"]),
        (train("train.keep_last=0"), 2, ["train.keep_last"]),
        (train("train.log_every=0"), 2, ["train.log_every"]),
        (train("sampler.guidance_scale=inf"), 2, ["sampler.guidance_scale", "finite"]),
        (train("train.ema_decay=2"), 2, ["train.ema_decay", "[0, 1]"]),
        (train("train=5"), 2, ["override 'train=5'", "config section"]),
        (["train", "--config", p / "list.yaml"], 2, ["list.yaml", "must hold a mapping"]),
        (["train", "--config", p / "broken.yaml"], 2, ["broken.yaml", "not valid YAML"]),
        (["train", "--config", p / "absent.yaml"], 2, ["config file not found", "absent.yaml"]),
        (train(out="locked"), 2, ["in use by another training run", f"process {os.getppid()}"]),
        (train(out="locked_elsewhere"), 2, ["another host", "--force"]),
        # data synth / data index
        (synth + ["--out", p / "a_file.txt"], 2, ["a_file.txt", "is a file"]),
        (synth + ["--out", p / "other_data"], 2, ["other_data", "no world.json"]),
        (synth + ["--out", p / "s", "--frames", 1], 2, ["2 frames"]),
        (index + ["--out", p / "out.jsonl"], 2, ["out.jsonl", "is a folder"]),
        (index + ["--out", p / "m.csv"], 2, ["--out must end in .jsonl"]),
        (["data", "index", "--videos", p / "absent", "--captions", p / "captions.csv", "--out", p / "m.jsonl"], 2,
         ["videos folder not found"]),
        # eval
        (ev + ["--batch_size", 0], 2, ["--batch_size"]),
        (ev + ["--report_examples", -1], 2, ["--report_examples"]),
        (ev + ["--num", 0], 2, ["--num"]),
        (ev + ["--out", p / "a_file.txt" / "eval"], 2, ["cannot write --out", "a_file.txt"]),
        (["eval", "--ckpt_dir", p / "absent", "--manifest", p / "manifest.jsonl"], 2, ["model directory not found"]),
        (["eval", "--ckpt_dir", p / "model", "--manifest", p / "absent.jsonl"], 2, ["absent.jsonl"]),
        # convert / demo
        (["convert", "--wan_dir", p / "absent", "--out", p / "x"], 2, ["not found"]),
        (["convert", "--wan_dir", p / "model", "--out", p / "a_file.txt"], 2, ["a_file.txt", "is a file"]),
        (["convert", "--wan_dir", p / "model", "--out", p / "other_data"], 2, ["other_data", "not empty"]),
        (["demo", "--kr_steps", 0, "--out", p / "demo"], 2, ["--kr_steps"]),
        (["demo", "--num_test", 0, "--out", p / "demo"], 2, ["--num_test"]),
        (["demo", "--out", p / "demo", "train.steps=-1"], 2, ["train.steps"]),
    ]


def test_every_bad_input_exits_nonzero_with_one_clear_line(place, training_cache, capsys):
    live_lock(place / "locked")
    live_lock(place / "locked_elsewhere", host="another-host.example", pid=1)
    table = cases(place, training_cache)
    assert len(table) >= 40
    commands = {str(argv[0]) for argv, _, _ in table}
    assert commands >= {"generate", "joint", "caption", "train", "data", "eval", "convert", "demo"}
    before = sorted(str(p.relative_to(place)) for p in place.rglob("*"))
    for argv, code, words in table:
        got = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert got == code, (argv, got, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert "Traceback" not in err + out
        for word in words:
            assert word in lines[0], (argv, lines[0])
    # Nothing was written: no output file, no partial file, no lock left behind.
    after = sorted(str(p.relative_to(place)) for p in place.rglob("*"))
    new = sorted(set(after) - set(before))
    assert all(not name.endswith((".mp4", ".gif", ".png", ".tmp", ".lock")) for name in new), new
    assert (place / "locked" / ".lock").is_file()  # the other run's lock is untouched


@pytest.mark.parametrize("argv, words", [
    (["train", "--config", "{p}/list.yaml"], ["list.yaml", "must hold a mapping"]),
    (["data", "synth", "--out", "{p}/a_file.txt", "--num", "2"], ["a_file.txt", "is a file"]),
])
def test_no_traceback_escapes_the_installed_command(place, argv, words):
    argv = [a.format(p=place) for a in argv]
    result = subprocess.run([sys.executable, "-m", "univigu", *argv], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines


def test_caption_reports_a_bad_file_and_captions_the_others(place, capsys):
    bad = place / "bad.mp4"
    bad.write_text("not a video\n")
    second = place / "clip2.mp4"
    write_video(second, np.full((5, 16, 16, 3), 30, np.uint8))
    args = ["--ckpt_dir", place / "model", "--sample_steps", 2, "--text_sampler", "euler", "--base_seed", 4,
            "--no-progress"]
    assert main([str(a) for a in ["caption", place / "clip.mp4", second, *args]]) == 0
    both = capsys.readouterr().out.splitlines()
    code = main([str(a) for a in ["caption", place / "clip.mp4", bad, second, *args]])
    out, err = capsys.readouterr()
    assert code == 1
    # The good files get the captions they get alone with their seeds (video i uses seed K + i).
    assert out.splitlines()[0] == both[0]
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(place / "clip.mp4"), str(second)]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "bad.mp4" in lines[0]
    assert lines[1] == f"error: 1 of 3 videos could not be captioned: {bad}"


def test_a_model_folder_without_world_json_runs_with_the_sizes_given_and_warns(place, capsys):
    out = place / "sized.mp4"
    with pytest.warns(UserWarning, match="has no world.json: using --size / --frame_num"):
        code = main([str(a) for a in ["generate", "--prompt", PROMPT, "--ckpt_dir", place / "no_world", "--size",
                                      "16*16", "--frame_num", 5, "--sample_steps", 2, "--save_file", out,
                                      "--no-progress"]])
    assert code == 0 and out.is_file()


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_with_force(tmp_path, recwarn):
    from univigu.training.lock import RunLock, RunLockError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live_lock(tmp_path / "a", pid=int(dead.stdout))  # a process of this host that is gone
    lock = RunLock(tmp_path / "a").acquire()
    assert "from a run that is gone" in str(recwarn.pop(UserWarning).message)
    assert json.loads((tmp_path / "a" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "a" / ".lock").exists()

    live_lock(tmp_path / "b", host="another-host.example", pid=1)
    with pytest.raises(RunLockError, match="--force"):
        RunLock(tmp_path / "b").acquire()
    RunLock(tmp_path / "b", force=True).acquire().release()
    assert "--force" in str(recwarn.pop(UserWarning).message)


def test_data_synth_again_with_fewer_videos_replaces_the_set_whole(tmp_path, capsys):
    out = tmp_path / "shapes"
    for num in (6, 3):
        assert main(["data", "synth", "--out", str(out), "--num", str(num), "--no-progress"]) == 0
    capsys.readouterr()
    videos = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    listed = sorted(json.loads(line)["video"] for split in ("train", "val", "test")
                    for line in (out / f"{split}.jsonl").read_text().splitlines())
    assert videos == listed and len(videos) == 3  # no orphan of the larger set, no empty manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]
    (out / "notes.txt").write_text("mine\n")  # a file that is not part of the set: never deleted
    assert main(["data", "synth", "--out", str(out), "--num", "2", "--no-progress"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").is_file()


def test_eval_reports_an_unreadable_video_and_evaluates_the_rest(place, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video\n")
    manifest = tmp_path / "m.jsonl"
    rows = [{"video": str(place / "clip.mp4"), "prompt": PROMPT, "caption": PROMPT, "objects": []},
            {"video": str(bad), "prompt": PROMPT, "caption": PROMPT, "objects": []}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main([str(a) for a in ["eval", "--ckpt_dir", place / "model", "--manifest", manifest, "--tasks", "v2t",
                                  "--candidates", 1, "--out", tmp_path / "eval", "--no-progress",
                                  "--caption_backend", "python"]])
    _, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("bad: ") and "bad.mp4" in lines[0]
    assert lines[-1] == "error: 1 sample(s) left out: their videos cannot be read (listed above)"
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 1
