"""The trainer on tiny ShapesWorld configs: learning in all three stages, freezing policies, exact
resume, interrupted checkpoint writes, gradient accumulation, validation, best model, samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tolerances import network_terms, ordered_tolerance
from univigu.models.bundle import load_bundle
from univigu.training import checkpoint as ckpt
from univigu.training.logging import read_metrics
from univigu.training.batches import loss_counts
from univigu.training.trainer import Trainer, TrainingError, ema_decay, lr_factor
from univigu.training.validation import validation_generator
from training_helpers import tiny_config, tiny_generator, training_cache  # noqa: F401 (fixtures)


def _train_records(path):
    return [r for r in read_metrics(path) if "loss" in r]


def _val_record(path, step):
    return next(r for r in read_metrics(path) if "val.loss" in r and r["step"] == step)


# --------------------------------------------------------------------------------------------
# Learning: the loss falls in every stage
# --------------------------------------------------------------------------------------------


def test_loss_falls_in_all_three_stages(tmp_path, training_cache):
    """generator -> knowledge_recall -> capability_refinement, 20 steps each: the fixed-noise
    validation losses (same noise before and after) and the training loss fall."""
    fast = ("train.steps=20", "train.lr=0.003", "train.warmup_steps=2", "train.ema_warmup_steps=10",
            "train.eval_samples=16")
    init = None
    for stage, modality, factor in [("generator", "video", 0.8), ("knowledge_recall", "text", 0.8),
                                    ("capability_refinement", "text", 0.95)]:
        trainer = Trainer(tiny_config(tmp_path / stage, training_cache, *fast, stage=stage, init_from=init),
                          progress=False)
        before = trainer.evaluate()
        init = trainer.run()
        after = _val_record(tmp_path / stage / "metrics.jsonl", 20)
        assert after[f"val.{modality}_loss"] < factor * before[f"val.{modality}_loss"], (stage, before, after)
        # Learning text must not wreck the video prior.
        assert after["val.video_loss"] < 1.05 * before["val.video_loss"], (stage, before, after)
        losses = [r["loss"] for r in _train_records(tmp_path / stage / "metrics.jsonl")]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), (stage, losses)
        assert load_bundle(init).transformer.has_text_stream == (stage != "generator")


# --------------------------------------------------------------------------------------------
# Freezing policies
# --------------------------------------------------------------------------------------------


def expected_group(name: str) -> str:
    """DESIGN.md section 1: text-only parts, parts both streams use, and the video prior's own."""
    if name.startswith("text_stream.") or ".text_ffn." in name:
        return "text"
    if name.startswith("blocks.") and name.split(".", 2)[2].startswith(("attn1.", "attn2.", "norm2.",
                                                                         "scale_shift_table")):
        return "shared"
    if name.startswith("condition_embedder.text_embedder."):
        return "shared"
    return "video"


@pytest.mark.parametrize("policy, groups", [("all", {"video", "text", "shared"}), ("text", {"text"}),
                                            ("text_and_shared", {"text", "shared"})])
def test_freezing_policy_freezes_exactly_its_groups(policy, groups, tmp_path, training_cache, tiny_generator):
    trainer = Trainer(tiny_config(tmp_path, training_cache, f"train.trainable={policy}", "train.lr=0.01",
                                  stage="knowledge_recall", init_from=tiny_generator), progress=False)
    names = dict(trainer.model.named_parameters())
    assert {expected_group(n) for n in names} == {"video", "text", "shared"}
    before = {n: p.detach().clone() for n, p in names.items()}

    # One backward: gradients exist exactly for the trained groups.
    nb = trainer.noise(trainer.make_batch(0))
    loss, _ = trainer.loss_step(nb, loss_counts(nb), alone_forward=bool(nb.drop_video.any()))
    loss.backward()
    for name, p in names.items():
        trained = expected_group(name) in groups
        assert p.requires_grad == trained, name
        assert (p.grad is not None) == trained, name
    trainer.optimizer.zero_grad(set_to_none=True)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for n, p in names.items() if expected_group(n) in groups}

    for _ in range(2):
        trainer.train_step()
    for name, p in names.items():
        if expected_group(name) in groups:
            assert not torch.equal(p.detach(), before[name]), f"{name} should train"
        else:
            assert torch.equal(p.detach(), before[name]), f"{name} should be frozen"
    # The exported EMA keeps frozen weights exactly.
    ema = trainer.ema_model().state_dict()
    for name in names:
        if expected_group(name) not in groups:
            assert torch.equal(ema[name], before[name]), name


def test_lr_scales_per_group(tmp_path, training_cache, tiny_generator):
    trainer = Trainer(tiny_config(tmp_path, training_cache, "train.lr=0.01", "train.lr_scale_video=0",
                                  "train.lr_scale_shared=0.25", stage="knowledge_recall",
                                  init_from=tiny_generator), progress=False)
    names = dict(trainer.model.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    trainer.train_step()
    factor = lr_factor(0, trainer.cfg.train.warmup_steps, trainer.cfg.train.steps, trainer.cfg.train.min_lr_ratio)
    by_param = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    scale = {"video": 0.0, "shared": 0.25, "text": 1.0}
    for name, p in names.items():
        group = expected_group(name)
        assert by_param[id(p)] == pytest.approx(0.01 * factor * scale[group]), name
        # lr 0: AdamW's update and its decoupled weight decay both vanish.
        assert torch.equal(p.detach(), before[name]) == (group == "video"), name
    with pytest.raises(TrainingError, match="lr_scale_video"):
        Trainer(tiny_config(tmp_path / "bad", training_cache, "train.lr_scale_video=-1", stage="knowledge_recall",
                            init_from=tiny_generator), progress=False)


def test_generator_cannot_freeze_its_only_group(tmp_path, training_cache):
    with pytest.raises(TrainingError, match="nothing to train"):
        Trainer(tiny_config(tmp_path, training_cache, "train.trainable=text"), progress=False)


# --------------------------------------------------------------------------------------------
# Exact resume, interrupted checkpoint writes
# --------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_resume_is_exact_and_ignores_a_half_written_checkpoint(tmp_path, training_cache, tiny_generator):
    common = ("train.steps=6", "train.save_every=2", "train.keep_last=2", "train.warmup_steps=2",
              "train.lr=0.003", "train.ema_warmup_steps=20", "train.eval_samples=0")

    def cfg(name):
        return tiny_config(tmp_path / name, training_cache, *common, stage="knowledge_recall",
                           init_from=tiny_generator)

    Trainer(cfg("full"), progress=False).run()

    def stop_at_5(trainer, logs):
        if trainer.step == 5:
            raise Stop  # killed after step 5: its work is lost, checkpoint 4 is the newest

    with pytest.raises(Stop):
        Trainer(cfg("part"), progress=False).run(on_step=stop_at_5)
    run_dir = tmp_path / "part" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-00000002", "ckpt-00000004"]
    # A save of step 6 killed half-way: a temporary folder with a truncated file.
    broken = run_dir / ".tmp-ckpt-00000006"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x80\x00\x00")

    resumed = Trainer(cfg("part"), progress=False)
    assert resumed.step == 4
    resumed.run()
    assert not broken.exists()

    full_logs = _train_records(tmp_path / "full" / "metrics.jsonl")
    part_logs = _train_records(tmp_path / "part" / "metrics.jsonl")
    keys = ("loss", "video_loss", "text_loss", "grad_norm", "lr")
    assert [r["step"] for r in part_logs] == [1, 2, 3, 4, 5, 6]
    assert [[r[k] for k in keys] for r in part_logs] == [[r[k] for k in keys] for r in full_logs]
    a, b = (tmp_path / name / "checkpoints" / "ckpt-00000006" for name in ("full", "part"))
    for which in ("model", "ema"):
        wa, wb = ckpt.read_weights(a, which), ckpt.read_weights(b, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
    assert oa["state"].keys() == ob["state"].keys()
    for name in oa["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][name][key], ob["state"][name][key]), (name, key)


def test_logged_rate_counts_the_training_steps_since_the_last_line_only(tmp_path, training_cache, monkeypatch):
    """steps_per_s is over the steps since the previous log line, timed alone: on a clock where a
    training step takes 1 s and an evaluation 100 s, every line reads exactly 1 step/s."""
    import types

    from univigu.training import trainer as trainer_module

    clock = {"now": 0.0}

    def perf_counter():
        clock["now"] += 1.0  # read before and after each step: 1 s per step
        return clock["now"]

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    trainer = Trainer(tiny_config(tmp_path / "run", training_cache, "train.steps=6", "train.log_every=2",
                                  "train.eval_every=3"), progress=False)
    evaluate = trainer.evaluate

    def slow_evaluate():
        clock["now"] += 100.0
        return evaluate()

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    trainer.run()
    rates = [(r["step"], r["steps_per_s"]) for r in _train_records(tmp_path / "run" / "metrics.jsonl")]
    assert rates == [(2, 1.0), (4, 1.0), (6, 1.0)]
    assert clock["now"] >= 200  # the evaluations (at step 3 and the final one) did advance the clock


def test_checkpoint_write_killed_half_way_keeps_the_previous_one(tmp_path, monkeypatch):
    run_dir = tmp_path / "checkpoints"
    first = {"w": torch.arange(6.0).view(2, 3)}
    ckpt.save_checkpoint(run_dir, 1, first, first, {"state": {}, "param_groups": []}, {"stage": "generator"})

    def killed(obj, path, *args, **kwargs):  # torch.save dies after writing a few bytes
        with open(path, "wb") as f:
            f.write(b"PK\x03")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run_dir, 2, {"w": torch.zeros(2, 3)}, None, {"state": {}}, {"stage": "generator"})
    monkeypatch.undo()
    assert (run_dir / ".tmp-ckpt-00000002" / "model.safetensors").is_file()  # the half-written save
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest.name == "ckpt-00000001"
    assert torch.equal(ckpt.load_checkpoint(latest)["model"]["w"], first["w"])
    ckpt.save_checkpoint(run_dir, 2, {"w": torch.ones(2, 3)}, None, {"state": {}}, {"stage": "generator"})
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt-00000001", "ckpt-00000002"]
    assert not list(run_dir.glob(".tmp-*"))


def test_stage_mismatch_in_output_dir_is_refused(tmp_path, training_cache, tiny_generator):
    Trainer(tiny_config(tmp_path, training_cache, "train.steps=1", "train.eval_samples=0"), progress=False).run()
    with pytest.raises(TrainingError, match="stage 'generator'"):
        Trainer(tiny_config(tmp_path, training_cache, stage="knowledge_recall", init_from=tiny_generator),
                progress=False)


# --------------------------------------------------------------------------------------------
# Schedules and batch splitting
# --------------------------------------------------------------------------------------------


def test_lr_and_ema_schedules_match_their_formulas():
    assert [lr_factor(s, 4, 20, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert lr_factor(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert ema_decay(0, 0.999, 100) == pytest.approx(1 / 11)
    assert ema_decay(10**6, 0.999, 100) == 0.999


def test_gradient_accumulation_equals_the_whole_batch(tmp_path, training_cache, tiny_generator):
    """batch 8 x 1 micro-batch == batch 4 x 2 micro-batches: same samples, same noise (keyed by the
    optimizer step), loss normalised by the counts of the whole step."""
    runs = {}
    for name, split in [("whole", ("train.batch_size=8", "train.grad_accum=1")),
                        ("accum", ("train.batch_size=4", "train.grad_accum=2"))]:
        trainer = Trainer(tiny_config(tmp_path / name, training_cache, *split, "train.steps=3",
                                      "train.eval_samples=0", stage="knowledge_recall",
                                      init_from=tiny_generator), progress=False)
        runs[name] = ([trainer.train_step() for _ in range(3)], trainer.model.state_dict())
    (logs_a, weights_a), (logs_b, weights_b) = runs["whole"], runs["accum"]
    for a, b in zip(logs_a, logs_b):
        for key in ("loss", "video_loss", "text_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-5)


def test_compiled_blocks_train_like_eager_ones(tmp_path, training_cache, tiny_generator):
    """train.compile=true: the same losses and weights as eager (up to fused rounding), the same
    parameter names in the checkpoint, and every block compiled."""
    runs = {}
    for name in ("eager", "compiled"):
        trainer = Trainer(tiny_config(tmp_path / name, training_cache, "train.steps=2", "train.eval_samples=0",
                                      f"train.compile={name == 'compiled'}", stage="knowledge_recall",
                                      init_from=tiny_generator), progress=False)
        runs[name] = ([trainer.train_step() for _ in range(2)], trainer.model.state_dict(), trainer.model)
    (logs_a, weights_a, eager), (logs_b, weights_b, compiled) = runs["eager"], runs["compiled"]
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert all(block._compiled_call_impl is None for block in eager.blocks)
    assert list(weights_b) == list(weights_a)
    for a, b in zip(logs_a, logs_b):
        for key in ("loss", "video_loss", "text_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=0, atol=1e-4)


def test_every_text_option_of_the_config_reaches_the_unified_model(tmp_path, training_cache, tiny_generator):
    from univigu.models.unify import TEXT_OPTIONS

    overrides = {"text_rope_theta": 500.0, "text_norm_eps": 1e-3, "text_rope": "rotate_half",
                 "text_position_embedding": False, "text_key_bias": -3.0, "text_query_projection": True,
                 "attention_policy": "full", "text_ffn_dim": 64}
    assert set(overrides) == set(TEXT_OPTIONS)
    trainer = Trainer(tiny_config(tmp_path, training_cache, *(f"model.{k}={v}" for k, v in overrides.items()),
                                  "train.eval_samples=0", stage="knowledge_recall", init_from=tiny_generator),
                      progress=False)
    assert {k: getattr(trainer.model.config, k) for k in overrides} == overrides


def test_clean_video_pass_without_autograd_trains_the_same(tmp_path, training_cache, tiny_generator):
    """Text-only training: V2T samples' clean video goes through prefill (no autograd) and the text
    through step_text; losses and weights match the one joint forward of the same samples (V2T
    samples that drop the video keep their own text-only forward)."""
    runs = {}
    for reuse in (True, False):
        trainer = Trainer(tiny_config(tmp_path / str(reuse), training_cache, "train.trainable=text",
                                      "train.steps=3", "train.eval_samples=0", "train.mixture.video_dropout=0.3",
                                      stage="capability_refinement", init_from=tiny_generator), progress=False)
        assert trainer.reuse_clean_video  # text-only under clean_isolated
        trainer.reuse_clean_video = reuse
        batches = [trainer.noise(trainer.make_batch(step)) for step in range(3)]
        readers = [(nb.s_video == 0) & (nb.s_text > 0) for nb in batches]
        assert any(bool((r & ~nb.drop_video).any()) for r, nb in zip(readers, batches))  # read the video
        assert any(bool(nb.drop_video.any()) for nb in batches)  # and samples without it
        runs[reuse] = ([trainer.train_step() for _ in range(3)], trainer.model.state_dict())
    (logs_a, weights_a), (logs_b, weights_b) = runs[True], runs[False]
    for a, b in zip(logs_a, logs_b):
        for key in ("loss", "video_loss", "text_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=1e-5)


def test_clean_video_pass_keeps_autograd_when_the_video_trains(tmp_path, training_cache, tiny_generator):
    for trainable in ("all", "text_and_shared"):
        trainer = Trainer(tiny_config(tmp_path / trainable, training_cache, f"train.trainable={trainable}",
                                      "train.eval_samples=0", stage="capability_refinement",
                                      init_from=tiny_generator), progress=False)
        assert not trainer.reuse_clean_video, trainable


# --------------------------------------------------------------------------------------------
# Validation, best model, samples
# --------------------------------------------------------------------------------------------


def test_fixed_noise_validation_loss(tmp_path, training_cache, tiny_generator):
    trainer = Trainer(tiny_config(tmp_path, training_cache, "train.eval_samples=5", stage="knowledge_recall",
                                  init_from=tiny_generator), progress=False)
    validator, model = trainer.validator, trainer.ema_model()
    first = validator.losses(model)
    assert validator.losses(model) == first  # fixed noise: the same value every time
    validator.batch_size = 2  # chunking does not change it
    chunked = validator.losses(model)
    for key, value in first.items():  # other batches: the network's rounding, then the mean's
        terms = network_terms(model.config) + validator.data.latents[0].numel()
        assert chunked[key] == pytest.approx(value, abs=ordered_tolerance(value, terms=terms)), key

    # A model predicting zero velocity and uniform logits: the video loss is E|eps - x|^2 over the
    # held-out samples with their fixed noise, the text loss at most log V.
    vocab = trainer.tokenizer.vocab_size

    def zero_model(video, text, vt, tt, condition):
        logits = torch.zeros(*text.shape, vocab) if text is not None else None
        return (None if video is None else torch.zeros_like(video)), logits

    clean = validator.data.latents
    expected = np.mean([((torch.randn(clean.shape[1:], generator=validation_generator(trainer.cfg.train.seed, i))
                          - clean[i]) ** 2).mean().item() for i in range(len(clean))])
    zero = validator.losses(zero_model)
    terms = clean[0].numel() + len(clean)  # a mean per sample, then over the samples
    assert zero["val.video_loss"] == pytest.approx(expected, abs=ordered_tolerance(expected, terms=terms))
    assert 0 < zero["val.text_loss"] <= np.log(vocab) + 1e-6
    assert zero["val.loss"] == pytest.approx(zero["val.video_loss"] + zero["val.text_loss"])


def test_v2t_validation_samples_with_the_null_condition(tmp_path, training_cache, tiny_generator):
    """Knowledge Recall cannot pass V2T validation by copying the prompt from the condition."""
    trainer = Trainer(tiny_config(tmp_path, training_cache, "train.eval_samples=4", stage="knowledge_recall",
                                  init_from=tiny_generator), progress=False)
    model = trainer.ema_model()
    seen = []

    def spy(video, text, vt, tt, condition):
        seen.append(condition.clone())
        return model(video, text, vt, tt, condition)

    captions = trainer.validator.caption(spy, np.arange(4))
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    null = trainer.null_condition
    assert seen and all(torch.equal(c, null.expand_as(c)) for c in seen)
    prompts = trainer.validator.data.condition
    assert all(not torch.equal(p, null) for p in prompts)


def test_best_model_samples_and_oracle_metrics(tmp_path, training_cache, tiny_generator):
    out = tmp_path / "kr"
    trainer = Trainer(tiny_config(out, training_cache, "train.steps=4", "train.eval_every=2", "train.sample_every=2",
                                  "train.num_samples=2", "train.eval_samples=3", "train.oracle_eval=true",
                                  "train.lr=0.003", "train.tensorboard=true", stage="knowledge_recall",
                                  init_from=tiny_generator), progress=False)
    trainer.run()
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val.loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        for key in ("t2v.all_correct", "v2t.all_correct", "t2v.colour", "v2t.shape"):
            assert 0.0 <= r[key] <= 1.0, key
        assert r["oracle.n"] == 3
    best = json.loads((out / "best" / "best.json").read_text())
    winner = min(evals, key=lambda r: r["val.loss"])
    assert best == {"metric": "val.loss", "value": winner["val.loss"], "step": winner["step"]}
    assert load_bundle(out / "best").tokenizer is not None
    if winner["step"] == 4:  # the final EMA is the exported model
        a = load_file(str(out / "best/transformer/diffusion_pytorch_model.safetensors"))
        b = load_file(str(out / "model/transformer/diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)

    from PIL import Image

    for step in (2, 4):
        folder = out / "samples" / f"step-{step:08d}"
        index = json.loads((folder / "samples.json").read_text())
        assert len(index["t2v"]) == 2 and len(index["v2t"]) == 2
        assert all(isinstance(item["caption"], str) and item["reference"] for item in index["v2t"])
        for item in index["t2v"] + index["v2t"]:
            with Image.open(folder / item["video"]) as gif:
                assert gif.size == (16, 16) and gif.n_frames <= 5
    if trainer.logger.tensorboard or (out / "tb").exists():
        assert list((out / "tb").glob("events.out.tfevents.*"))


def test_bad_init_from_is_one_clear_error(tmp_path, training_cache):
    with pytest.raises(TrainingError, match="init_from"):
        Trainer(tiny_config(tmp_path, training_cache, stage="knowledge_recall"), progress=False)
    with pytest.raises(TrainingError, match="not found"):
        Trainer(tiny_config(tmp_path, training_cache, stage="knowledge_recall", init_from=tmp_path / "nope"),
                progress=False)


def test_knowledge_recall_starts_from_a_wan_checkpoint(tmp_path, training_cache, tiny_generator):
    """A diffusers-format Wan directory goes through the conversion; its video weights are kept."""
    from univigu.models.convert import export_diffusers

    generator = load_bundle(tiny_generator).transformer
    wan_dir = export_diffusers(generator, tmp_path / "wan")
    trainer = Trainer(tiny_config(tmp_path / "kr", training_cache, stage="knowledge_recall", init_from=wan_dir),
                      progress=False)
    state = trainer.model.state_dict()
    for name, value in generator.state_dict().items():
        assert torch.equal(state[name], value), name
    assert trainer.model.has_text_stream and trainer.train_step()["text_loss"] > 0
