"""Scale-out: a 2-process torchrun (gloo, fp32, FSDP2 + DCP) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from univigu.training import checkpoint as ckpt
from univigu.training.logging import read_metrics
from univigu.training.trainer import Trainer
from training_helpers import tiny_config, tiny_generator, tiny_overrides, training_cache  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TRAIN_KEYS = ("loss", "video_loss", "text_loss", "grad_norm", "lr")


def torchrun_train(overrides: list[str], nproc: int = 2) -> None:
    """`torchrun --nproc_per_node=N -m univigu train ...` (torch.distributed.run is torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "univigu", "train", "--device", "cpu", "--no-progress", *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_same_run(single, multi, steps: int) -> None:
    """Same per-step losses (1e-5 relative), validation loss and final weights."""
    a = [r for r in read_metrics(single / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(multi / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    for ra, rb in zip(a, b):
        for key in TRAIN_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    va = next(r for r in read_metrics(single / "metrics.jsonl") if "val.loss" in r)
    vb = next(r for r in read_metrics(multi / "metrics.jsonl") if "val.loss" in r)
    assert vb["val.loss"] == pytest.approx(va["val.loss"], rel=1e-5)

    final = f"ckpt-{steps:08d}"
    state = json.loads((multi / "checkpoints" / final / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == 2
    # Adam turns gradient rounding differences (summation order) into tiny weight differences; one
    # step moves a weight by up to lr = 3e-4, so 1e-5 is ~1% of a single step.
    for which in ("model", "ema"):
        wa = ckpt.read_weights(single / "checkpoints" / final, which)
        wb = ckpt.read_weights(multi / "checkpoints" / final, which)
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-5, msg=f"{which} {name}")
    ea = load_file(str(single / "model/transformer/diffusion_pytorch_model.safetensors"))
    eb = load_file(str(multi / "model/transformer/diffusion_pytorch_model.safetensors"))
    assert ea.keys() == eb.keys()
    for name in ea:
        torch.testing.assert_close(eb[name], ea[name], rtol=0, atol=1e-5, msg=name)


COMMON = ("train.eval_samples=4",)


def test_generator_two_processes_equal_one(tmp_path, training_cache):
    """Generator stage: every parameter trains, video loss only."""
    Trainer(tiny_config(tmp_path / "one", training_cache, *COMMON), progress=False).run()
    torchrun_train(tiny_overrides(tmp_path / "two", training_cache, *COMMON))
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=4)


def test_knowledge_recall_two_processes_equal_one(tmp_path, training_cache, tiny_generator):
    """Knowledge Recall: text losses, the video-dropout forward (which every rank must make), frozen
    video weights inside FSDP units, and gradient accumulation: 2 processes x 2 micro-batches of
    2 samples == 1 process x 1 batch of 8."""
    text = ("train.trainable=text_and_shared",) + COMMON
    Trainer(tiny_config(tmp_path / "one", training_cache, *text, stage="knowledge_recall", init_from=tiny_generator),
            progress=False).run()
    torchrun_train(tiny_overrides(tmp_path / "two", training_cache, *text, "train.batch_size=4", "train.grad_accum=2",
                                  stage="knowledge_recall", init_from=tiny_generator))
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=4)
    assert all(r["text_loss"] > 0 for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in r)

    # The sharded checkpoint resumes in one process (DCP reshards on load): weights, EMA and
    # optimizer state are those of the run, which match the single-process run's.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    resumed = Trainer(tiny_config(tmp_path / "two", training_cache, *text, "train.batch_size=4", "train.grad_accum=2",
                                  stage="knowledge_recall", init_from=tiny_generator), progress=False)
    assert resumed.step == 4
    final = tmp_path / "two" / "checkpoints" / "ckpt-00000004"
    for which, state in (("model", resumed.model.state_dict()), ("ema", resumed.ema.state)):
        saved = ckpt.read_weights(final, which)
        assert all(torch.equal(state[k], saved[k]) for k in saved), which
    optim = get_optimizer_state_dict(resumed.model, resumed.optimizer)["state"]
    single = torch.load(tmp_path / "one" / "checkpoints" / "ckpt-00000004" / "optimizer.pt", weights_only=True)["state"]
    assert optim.keys() == single.keys()
    for name in single:
        assert torch.equal(optim[name]["step"], single[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(optim[name][key], single[name][key], rtol=1e-3, atol=1e-9, msg=f"{name} {key}")


def test_every_torchrun_rank_honours_the_lock_of_a_live_run(tmp_path, training_cache):
    """A live run (this test's parent process, on this host) holds the folder: both ranks stop at
    once with the same one line, and nothing is written there."""
    import socket
    import time

    out = tmp_path / "locked"
    out.mkdir()
    lock = {"pid": os.getppid(), "host": socket.gethostname(), "started": time.time()}
    (out / ".lock").write_text(json.dumps(lock))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "univigu",
           "train", "--device", "cpu", "--no-progress", *tiny_overrides(out, training_cache)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    refusals = [line for line in done.stderr.splitlines() if "in use by another training run" in line]
    assert len(refusals) == 2 and all(f"process {os.getppid()} " in line for line in refusals), done.stderr[-2000:]
    # torchrun's own agent reports the failed workers with a traceback of its own; none is ours.
    assert not any("univigu" in line for line in done.stderr.splitlines() if line.strip().startswith("File "))
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_lora_two_processes_equal_one(tmp_path, training_cache, tiny_generator):
    """LoRA on the shared attention (peft's layers inside the FSDP2 blocks, sharded with them) beside
    the fully trained text stream: the same run on 2 processes as on 1, and the same adapter file."""
    lora = ("train.trainable=text", "train.lora.rank=4", "train.lora.alpha=8", "train.lr=0.003",
            "train.lora.targets=['shared:attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0']") + COMMON
    Trainer(tiny_config(tmp_path / "one", training_cache, *lora, stage="knowledge_recall", init_from=tiny_generator),
            progress=False).run()
    torchrun_train(tiny_overrides(tmp_path / "two", training_cache, *lora, stage="knowledge_recall",
                                  init_from=tiny_generator))
    assert_same_run(tmp_path / "one", tmp_path / "two", steps=4)
    names = ckpt.read_weights(tmp_path / "two" / "checkpoints" / "ckpt-00000004", "model")
    assert any(".lora_B." in k for k in names)
    ea, eb = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("one", "two"))
    assert ea.keys() == eb.keys() and ea
    for name in ea:
        torch.testing.assert_close(eb[name], ea[name], rtol=0, atol=1e-5, msg=name)
