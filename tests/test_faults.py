"""Faults that reproduce: a training process killed (SIGKILL) at named points, a damaged newest
checkpoint, a second run into a live folder, a full disk.

The kill points are `atomic.kill_point` calls that fire when `UNIVIGU_KILL_AT=name@N` says so, so
each interrupted write happens at exactly the same place every time. The process that dies is a
fork of the test process (one torch thread, conftest), so it needs no second start-up; the resume
runs here. Every resume must end exactly where an uninterrupted run ends (parameters, optimizer
state, EMA, every logged loss, the exported model) with nothing partial left in the folder.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_config, training_cache  # noqa: F401 (fixture)

from univigu.atomic import KILL_ENV, OutputError, atomic_directory, atomic_write_text, recover_directory
from univigu.models.bundle import load_bundle
from univigu.training import checkpoint as ckpt
from univigu.training.lock import RunLock, RunLockError
from univigu.training.logging import read_metrics
from univigu.training.trainer import Trainer

COMMON = ("train.steps=6", "train.save_every=2", "train.keep_last=2", "train.warmup_steps=2", "train.lr=0.003",
          "train.ema_warmup_steps=20", "train.eval_samples=0")
LEFTOVER_PREFIXES = (".tmp-", ".old-", ".trash-", "corrupt-")


def config(out, cache, *extra):
    return tiny_config(out, cache, *COMMON, *extra)


def in_child(fn) -> int:
    """Run `fn` in a fork of this process; its wait status."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            fn()
            code = 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def killed_at(point: str, cfg) -> None:
    """Train with `cfg` in a child that kills itself at `point`; it must die by SIGKILL there."""
    def train():
        os.environ[KILL_ENV] = point
        Trainer(cfg, progress=False).run()

    status = in_child(train)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)


def leftovers(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.startswith(LEFTOVER_PREFIXES) or p.name.endswith(".tmp") or p.name == ".lock"
                  or (p.is_dir() and p.name.startswith(ckpt.PREFIX) and not (p / "state.json").is_file()))


def train_logs(out):
    keys = ("loss", "video_loss", "text_loss", "grad_norm", "lr")
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def assert_same_run(out, reference):
    """Checkpoint 6 (model, EMA, optimizer), the logged losses and model/ equal the reference's."""
    a, b = (d / "checkpoints" / "ckpt-00000006" for d in (out, reference))
    for which in ("model", "ema"):
        wa, wb = ckpt.read_weights(a, which), ckpt.read_weights(b, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True)["state"] for p in (a, b))
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[n][k], ob[n][k]) for n in oa for k in ("step", "exp_avg", "exp_avg_sq"))
    assert train_logs(out) == train_logs(reference) and [r[0] for r in train_logs(out)] == [1, 2, 3, 4, 5, 6]
    ma, mb = (load_file(str(d / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
              for d in (out, reference))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, training_cache):
    out = tmp_path_factory.mktemp("reference") / "run"
    Trainer(config(out, training_cache), progress=False).run()
    return out


# What each point leaves before the resume: the newest complete checkpoint, and what is half done.
KILL_POINTS = {
    "train-step@5": ("ckpt-00000004", None),  # step 5 trained and logged, not checkpointed
    "checkpoint-write@2": ("ckpt-00000002", ".tmp-ckpt-00000004"),  # mid-write of checkpoint 4's files
    "checkpoint-publish@2": ("ckpt-00000002", ".tmp-ckpt-00000004"),  # complete, not yet renamed
    "checkpoint-prune@1": ("ckpt-00000006", ".trash-ckpt-00000002"),  # while deleting checkpoint 2
    "export@1": ("ckpt-00000006", "../.tmp-model"),  # model/ half written
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_at_each_named_point_resumes_exactly_and_leaves_nothing_partial(point, tmp_path, training_cache,
                                                                               reference):
    out = tmp_path / "run"
    killed_at(point, config(out, training_cache))
    newest, partial = KILL_POINTS[point]
    assert ckpt.latest_checkpoint(out / "checkpoints").name == newest
    if partial is not None:
        assert (out / "checkpoints" / partial).exists()
    assert (out / ".lock").is_file()  # the dead run's lock: taken over below with a warning
    with pytest.warns(UserWarning, match="from a run that is gone"):
        Trainer(config(out, training_cache), progress=False).run()
    assert_same_run(out, reference)
    assert leftovers(out) == []


def test_a_kill_between_the_renames_of_an_export_keeps_the_old_model(tmp_path, training_cache, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    # A longer run over the finished one: checkpoint 8 is published (1st), then model/ (2nd) dies
    # after the old model/ was moved aside and before the new one got its name.
    killed_at("publish@2", config(out, training_cache, "train.steps=8"))
    assert not (out / "model").exists() and (out / ".old-model").is_dir()
    old = load_bundle(out / "model")  # the next reader brings the old folder back whole
    assert not (out / ".old-model").exists()
    mine = load_file(str(reference / "model" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(old.transformer.state_dict()[k], v) for k, v in mine.items())
    with pytest.warns(UserWarning, match="from a run that is gone"):
        Trainer(config(out, training_cache, "train.steps=8"), progress=False).run()
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "ckpt-00000008" and leftovers(out) == []


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_falls_back(tmp_path, training_cache, reference):
    out = tmp_path / "run"
    killed_at("train-step@5", config(out, training_cache))
    newest = out / "checkpoints" / "ckpt-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short, as by a full disk
    with pytest.warns(UserWarning) as record:
        trainer = Trainer(config(out, training_cache), progress=False)
    messages = [str(w.message) for w in record]
    assert any("ckpt-00000004 cannot be resumed from" in m and "truncated" in m for m in messages), messages
    assert trainer.step == 2 and (out / "checkpoints" / "corrupt-ckpt-00000004").is_dir()
    trainer.run()
    shutil.rmtree(out / "checkpoints" / "corrupt-ckpt-00000004")  # kept for the user to look at
    assert_same_run(out, reference)


def test_a_garbage_optimizer_state_is_a_clear_error_never_unpickled(tmp_path):
    run_dir = tmp_path / "checkpoints"
    state = {"w": torch.arange(6.0)}
    path = ckpt.save_checkpoint(run_dir, 1, state, state, {"state": {}, "param_groups": []}, {"stage": "generator"})
    torch.save({"state": np.float64(1.0).__class__}, path / "optimizer.pt")  # needs pickle to load
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    assert "optimizer.pt" in str(err.value) and "never loaded with pickle" in str(err.value)
    assert "weights_only=False" not in str(err.value)
    (path / "optimizer.pt").write_bytes(os.urandom(64))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt is damaged"):
        ckpt.load_checkpoint(path)


def test_a_second_run_into_a_live_folder_refuses(tmp_path, training_cache):
    out = tmp_path / "run"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first run: holds the folder until it is killed
        try:
            RunLock(out).acquire()
            os.write(write, b"1")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        assert os.read(read, 1) == b"1"
        with pytest.raises(RunLockError, match=f"in use by another training run \\(process {pid} "):
            Trainer(config(out, training_cache), progress=False)
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with pytest.warns(UserWarning, match="from a run that is gone"):
        Trainer(config(out, training_cache, "train.steps=1"), progress=False).run()
    assert not (out / ".lock").exists()


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


def test_a_full_disk_leaves_the_previous_outputs_intact(tmp_path, capfd):
    """RLIMIT_FSIZE makes every write past 1 KiB fail with EFBIG, as a full disk fails with ENOSPC
    (no mount needed, so it never skips): the previous video, GIF and report survive whole."""
    from univigu.data.video_io import read_video, write_gif, write_video
    from univigu.evaluation.report import write_report

    rng = np.random.default_rng(0)
    old, new = (rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    write_video(tmp_path / "out.mp4", old)
    write_gif(tmp_path / "out.gif", old)
    write_report(tmp_path / "eval", {"t2v.all_correct": 0.5})
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
        failures = 0
        for write in (lambda: write_video(tmp_path / "out.mp4", np.concatenate([new] * 8)),
                      lambda: write_gif(tmp_path / "out.gif", np.concatenate([new] * 8)),
                      lambda: write_report(tmp_path / "eval", {"t2v.all_correct": 0.7, "pad": "x" * 4096}),
                      lambda: atomic_write_text(tmp_path / "eval" / "metrics.json", "y" * 4096)):
            try:
                write()
            except OutputError as err:
                failures += 1
                print(f"error: {err}")
        sys.stdout.flush()
        os._exit(10 + failures)

    status = in_child(full_disk)
    out = capfd.readouterr().out
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 14, (status, out)
    assert out.count("error: cannot write ") == 4 and "too large" in out.lower()
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # the old files, byte for byte, and no partial or temporary file
    assert read_video(tmp_path / "out.mp4").shape == old.shape


def test_recover_directory_brings_back_the_old_folder_and_drops_a_half_written_one(tmp_path):
    final = tmp_path / "best"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("old")
    final.rename(tmp_path / ".old-best")  # killed between the two renames
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / ".tmp-best" / "a").write_text("ne")
    recover_directory(final)
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_the_next_start(tmp_path):
    from univigu.training.logging import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(2, {"loss": 0.25})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 0.5), (2, 0.25)]


def test_a_kill_mid_file_write_keeps_the_old_file_and_the_next_write_drops_the_temporary(tmp_path):
    from univigu.data.video_io import read_video, write_video

    rng = np.random.default_rng(1)
    old, new = (rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    path = tmp_path / "out.mp4"
    write_video(path, old)
    before = path.read_bytes()

    def write():
        os.environ[KILL_ENV] = "file-write@1"
        write_video(path, new)

    status = in_child(write)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == before
    stale = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".out.mp4.")  # the dead process's temporary file
    write_video(path, new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"] and path.read_bytes() != before
    assert read_video(path).shape == new.shape


def test_clean_incomplete_removes_what_killed_writes_and_deletions_left(tmp_path):
    run_dir = tmp_path / "checkpoints"
    state = {"w": torch.zeros(2)}
    ckpt.save_checkpoint(run_dir, 1, state, None, {"state": {}, "param_groups": []}, {"stage": "generator"})
    (run_dir / "ckpt-00000001").rename(run_dir / ".old-ckpt-00000001")  # a replace killed between renames
    (run_dir / "ckpt-00000003").mkdir()  # half deleted by an older version: no state.json
    (run_dir / "ckpt-00000003" / "ema.safetensors").write_bytes(b"x")
    for name in (".tmp-ckpt-00000004", ".trash-ckpt-00000002"):
        (run_dir / name).mkdir()
    assert ckpt.clean_incomplete(run_dir) == [".tmp-ckpt-00000004", ".trash-ckpt-00000002", "ckpt-00000003"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["ckpt-00000001"]
    assert torch.equal(ckpt.load_checkpoint(run_dir / "ckpt-00000001")["model"]["w"], state["w"])
