"""`univigu demo` end to end on a tiny video-only generator made here: both unified stages, then
T2V / V2T / joint evaluation with the oracle and the report."""

from __future__ import annotations

import json

import torch
import yaml
from backbone_helpers import randomize_
from pipeline_helpers import ENCODER_CONFIG, SAMPLER, WORLD, prompt_encoder

from univigu.cli import main
from univigu.config import FlowConfig, TransformerConfig
from univigu.models.bundle import save_bundle
from univigu.models.transformer import UniViGUTransformer
from univigu.models.vae import PixelShuffleCodec


def tiny_generator_dir(directory):
    """A random video-only model directory (no text stream), like the shipped generator but tiny."""
    config = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
                               text_dim=384, freq_dim=32, ffn_dim=64, num_layers=2, patch_size=(1, 2, 2))
    with torch.random.fork_rng(devices=[]):
        model = randomize_(UniViGUTransformer(config), 0).eval()
    null = prompt_encoder().null_condition()[0]
    return save_bundle(directory, model, PixelShuffleCodec(4, 1), ENCODER_CONFIG, null, None, WORLD, SAMPLER,
                       FlowConfig())


def test_demo_grows_a_generator_into_a_unified_model_and_scores_it(tmp_path, capsys):
    generator = tiny_generator_dir(tmp_path / "generator")
    out = tmp_path / "demo"
    code = main(["demo", "--generator", str(generator), "--out", str(out), "--kr_steps", "2", "--cr_steps", "2",
                 "--num_test", "3", "--no-progress", "train.num_train_videos=8", "train.batch_size=4",
                 f"prompt_encoder.condition_length={ENCODER_CONFIG.condition_length}", "model.text_length=12",
                 "sampler.video_steps=2", "sampler.text_steps=2"])
    stdout = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    metrics = summary["metrics"]
    assert metrics["meta"]["samples"] == 3 and metrics["meta"]["world"] == "16x16x5"
    for task in ("t2v", "v2t", "joint"):
        assert 0.0 <= metrics["test"][f"{task}.all_correct"] <= 1.0
    assert set(summary["phase_seconds"]) == {"generator", "knowledge_recall", "capability_refinement", "evaluation"}
    assert (out / "eval" / "report.html").is_file()
    assert str(out / "eval" / "report.html") in stdout
    # Both stages trained on the generator's world, not the preset's 32x32 one.
    for stage in ("knowledge_recall", "capability_refinement"):
        world = yaml.safe_load((out / stage / "config.yaml").read_text())["world"]
        assert (world["width"], world["height"], world["frames"]) == (WORLD.width, WORLD.height, WORLD.frames)
    # The second stage started from the first one's model directory.
    cr = yaml.safe_load((out / "capability_refinement" / "config.yaml").read_text())["train"]
    assert cr["init_from"] == str(out / "knowledge_recall" / "model")


def test_from_scratch_repeats_both_runs_of_the_shipped_generator(tmp_path, monkeypatch):
    from univigu.commands import demo
    from univigu.training import trainer

    runs = []

    class RecordingTrainer:  # stands in for hours of training: records each run's config
        def __init__(self, cfg, device, progress):
            self.cfg = cfg

        def run(self):
            runs.append(self.cfg.train)
            return tmp_path / f"run{len(runs)}" / "model"

    monkeypatch.setattr(trainer, "Trainer", RecordingTrainer)
    assert demo._generator(tmp_path, True, False, "cpu", None) == tmp_path / "run2" / "model"
    first, second = runs
    assert (first.stage, first.init_from, first.steps) == ("generator", None, 4000)
    assert (second.stage, second.init_from, second.steps) == ("generator", str(tmp_path / "run1" / "model"), 3000)
    assert (second.lr, second.warmup_steps, second.seed) == (3e-4, 50, 1)
    assert first.output_dir != second.output_dir
