"""`univigu eval` end to end on a small ShapesWorld set: metrics per split, metrics.json, the HTML
report (parsed, and screenshotted in headless Chromium when one is installed), and bad input."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from univigu.commands import eval as eval_cmd
from univigu.commands.eval import EvalError, evaluate, load_samples, load_world, register
from univigu.config import WorldConfig
from univigu.data import shapesworld as sw
from univigu.data.video_io import read_video

PER_SPLIT = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    world = WorldConfig(holdout_fraction=0.25)
    sw.synthesize(root, 2 * PER_SPLIT, seed=1, world=world, splits={"test": 0.5, "heldout": 0.5}, progress=False)
    return root


def _manifests(root: Path) -> list[Path]:
    return [root / "test.jsonl", root / "heldout.jsonl"]


class Perfect:
    """Returns each sample's own video and caption: every metric must be 100%."""

    def __init__(self, samples):
        self.by_prompt = {s["prompt"]: s for s in samples}
        self.calls = []

    def generate(self, prompts, seed):
        self.calls.append(("generate", seed))
        return [read_video(self.by_prompt[p]["video"]) for p in prompts]

    def caption(self, videos):
        by_video = {read_video(s["video"]).tobytes(): s["caption"] for s in self.by_prompt.values()}
        return [by_video[v.tobytes()] for v in videos]

    def joint(self, prompts, seed):
        return self.generate(prompts, seed), [self.by_prompt[p]["caption"] for p in prompts]


class Flawed(Perfect):
    """Black videos for the first test prompt, a wrong colour in the caption of the first heldout one."""

    def __init__(self, samples):
        super().__init__(samples)
        self.black = next(s["prompt"] for s in samples if s["split"] == "test")
        self.miscaptioned = next(s["caption"] for s in samples if s["split"] == "heldout")

    def generate(self, prompts, seed):
        videos = super().generate(prompts, seed)
        return [np.zeros_like(v) if p == self.black else v for p, v in zip(prompts, videos)]

    def caption(self, videos):
        out = super().caption(videos)
        colours = list(sw.COLOURS)
        def swap(text):
            used = [c for c in colours if f" {c} " in text]
            new = next(c for c in colours if c not in used)
            return text.replace(f" {used[0]} ", f" {new} ")
        return [swap(c) if c == self.miscaptioned else c for c in out]


@pytest.fixture(scope="module")
def perfect_run(dataset, tmp_path_factory):
    samples = load_samples(_manifests(dataset), ("t2v", "v2t", "joint"))
    world = load_world(_manifests(dataset), samples)
    out = tmp_path_factory.mktemp("report")
    metrics = evaluate(Perfect(samples), samples, world, out_dir=out, batch_size=3, caption_backend="python")
    return samples, world, out, metrics


# --------------------------------------------------------------------------------------------
# Metrics and JSON
# --------------------------------------------------------------------------------------------


def test_perfect_model_scores_100_per_split(perfect_run):
    _, _, out, metrics = perfect_run
    assert [k for k in metrics if k != "meta"] == ["test", "heldout"]  # iid first, reported apart
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("test", "heldout"):
        flat = saved[split]
        assert flat["n"] == PER_SPLIT
        for name in ("t2v.all_correct", "v2t.all_correct", "joint.all_correct", "t2v.colour", "v2t.motion",
                     "joint.caption_matches_video"):
            assert flat[name] == 1.0, name
        assert flat["t2v.all_correct_ci95"][1] == 1.0 and flat["t2v.all_correct_ci95"][0] < 1.0
        assert flat["v2t.CIDEr"] == pytest.approx(10.0) and flat["v2t.BLEU-4"] == pytest.approx(1.0)
        assert flat["v2t.SPICE"] is None
    assert saved["meta"]["caption_backend"] == "python"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * PER_SPLIT and all(r["t2v_ok"] and r["v2t_ok"] and r["joint_ok"] for r in rows)


def test_flawed_model_scores_known_fractions(dataset, tmp_path):
    samples = load_samples(_manifests(dataset), ("t2v", "v2t"))
    world = load_world(_manifests(dataset), samples)
    metrics = evaluate(Flawed(samples), samples, world, tasks=("t2v", "v2t"), caption_backend="python")
    # One black video among PER_SPLIT test samples: that sample has no object read.
    assert metrics["test"]["t2v.all_correct"] == pytest.approx(1 - 1 / PER_SPLIT)
    assert metrics["test"]["t2v.count_correct"] == pytest.approx(1 - 1 / PER_SPLIT)
    assert metrics["heldout"]["t2v.all_correct"] == 1.0
    # One wrong colour among PER_SPLIT heldout captions.
    assert metrics["heldout"]["v2t.colour"] == pytest.approx(1 - 1 / PER_SPLIT)
    assert metrics["heldout"]["v2t.shape"] == 1.0
    assert metrics["test"]["v2t.all_correct"] == 1.0
    assert "joint.all_correct" not in metrics["test"]


def test_seeds_follow_batches(dataset):
    samples = load_samples(_manifests(dataset), ("t2v",))
    model = Perfect(samples)
    evaluate(model, samples, load_world(_manifests(dataset), samples), tasks=("t2v",), seed=10, batch_size=3)
    assert [seed for _, seed in model.calls] == [10, 13, 16]


# --------------------------------------------------------------------------------------------
# HTML report
# --------------------------------------------------------------------------------------------


_VOID = {"img", "br", "meta", "link", "hr", "input"}  # elements without an end tag


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.headers, self.cells, self.links, self.stack = [], [], [], [], []
        self.cards, self.card_depth, self.current_card = [], None, None
        self._tag = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in _VOID:
            self.stack.append(tag)
        self._tag = tag
        if tag == "img":
            self.images.append(attrs)
            if self.current_card is not None:
                self.current_card["images"] += 1
        for key in ("src", "href"):
            if key in attrs:
                self.links.append(attrs[key])
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self.current_card, self.card_depth = {"images": 0, "text": ""}, len(self.stack)

    def handle_endtag(self, tag):
        if tag == "div" and self.card_depth == len(self.stack):
            self.cards.append(self.current_card)
            self.current_card, self.card_depth = None, None
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        if self._tag == "th":
            self.headers.append(data.strip())
        if self._tag in ("td", "code"):
            self.cells.append(data.strip())
        if self.current_card is not None:
            self.current_card["text"] += data


def _decode_gif(src: str) -> Image.Image:
    assert src.startswith("data:image/gif;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_report_html_renders_images_and_table(perfect_run):
    samples, _, out, _ = perfect_run
    page = _Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    page.close()

    # One card per task and sample (the report shows up to 12 per task and split), each with its GIF.
    assert len(page.cards) == 3 * len(samples)
    assert all(card["images"] == 1 for card in page.cards)
    assert len(page.images) == 3 * len(samples)
    first_frames = {read_video(s["video"])[0].tobytes() for s in samples}
    for image in page.images:
        gif = _decode_gif(image["src"])
        assert gif.format == "GIF" and gif.size == (32, 32)
        # The GIF's first frame is exactly the video's first frame (<= 256 colours: lossless).
        assert np.asarray(gif.convert("RGB")).tobytes() in first_frames
        assert int(image["width"]) >= 4 * 32  # enlarged by CSS, not resampled
    # Self-contained: nothing fetched from elsewhere.
    assert all(link.startswith("data:") or link.startswith("#") for link in page.links)

    # The metrics table: one column per split, the plain metric names as rows.
    assert page.headers[:3] == ["metric", "test", "heldout"]
    for name in ("t2v.all_correct", "v2t.all_correct", "joint.all_correct", "v2t.CIDEr"):
        assert name in page.cells
    assert "100.0%" in page.cells

    # Prompts beside generated videos, captions beside videos, joint caption beside joint video.
    texts = [card["text"] for card in page.cards]
    for s in samples:
        assert sum(s["prompt"] in t for t in texts) >= 2  # its t2v and joint cards
        assert sum(s["caption"] in t and "generated caption" in t for t in texts) >= 2  # v2t and joint


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "headless_shell"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium installed")
def test_report_renders_in_headless_chromium(perfect_run, tmp_path):
    _, _, out, _ = perfect_run
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,1600", (out / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1280)
    assert image.std() > 10  # not a blank page


# --------------------------------------------------------------------------------------------
# CLI and bad input
# --------------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="univigu")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_runs_with_a_loaded_model(dataset, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = Perfect(load_samples(_manifests(dataset), ["t2v"]))
    loaded = {}

    def load(ckpt, world, candidates):
        loaded["candidates"] = candidates
        return model

    monkeypatch.setattr(eval_cmd, "load_evaluatee", load)
    manifests = sum((["--manifest", str(m)] for m in _manifests(dataset)), [])
    args = _parse(["eval", "--ckpt_dir", str(model_dir), *manifests, "--num", "2", "--tasks", "t2v,v2t",
                   "--caption_backend", "python", "--no-progress", "--candidates", "3"])
    assert args.func(args) == 0
    assert loaded["candidates"] == 3
    metrics = json.loads((model_dir / "eval" / "metrics.json").read_text())
    assert metrics["meta"]["caption_candidates"] == 3
    assert metrics["test"]["n"] == 2 and metrics["heldout"]["n"] == 2
    assert metrics["test"]["v2t.all_correct"] == 1.0 and "joint.all_correct" not in metrics["test"]
    printed = capsys.readouterr().out
    assert "t2v.all_correct" in printed and "report.html" in printed


def test_pipeline_evaluatee_passes_the_candidate_count_to_the_pipeline():
    class Pipeline:
        def caption(self, video, candidates=None):
            self.candidates = candidates
            return ["a caption"] * len(video)

    pipeline = Pipeline()
    videos = [np.zeros((3, 8, 8, 3), dtype=np.uint8)] * 2
    assert eval_cmd.PipelineEvaluatee(pipeline, WorldConfig(), candidates=5).caption(videos) == ["a caption"] * 2
    assert pipeline.candidates == 5
    eval_cmd.PipelineEvaluatee(pipeline, WorldConfig()).caption(videos)
    assert pipeline.candidates is None  # the model's own sampler.json decides


def test_bad_candidate_count_is_one_clear_error(dataset, tmp_path):
    (tmp_path / "model").mkdir()
    args = _parse(["eval", "--ckpt_dir", str(tmp_path / "model"), "--manifest", str(dataset / "test.jsonl"),
                   "--candidates", "0"])
    with pytest.raises(EvalError, match="--candidates must be at least 1, got 0"):
        args.func(args)


def test_missing_model_directory(dataset, tmp_path):
    args = _parse(["eval", "--ckpt_dir", str(tmp_path / "nope"), "--manifest", str(dataset / "test.jsonl")])
    with pytest.raises(EvalError, match="model directory not found"):
        args.func(args)


def test_manifest_with_missing_fields(tmp_path):
    (tmp_path / "model").mkdir()
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text(json.dumps({"video": "a.mp4", "prompt": "a small red circle moves up"}) + "\n")
    args = _parse(["eval", "--ckpt_dir", str(tmp_path / "model"), "--manifest", str(manifest)])
    with pytest.raises(EvalError, match=r"line 1: missing field 'objects'"):
        args.func(args)


def test_empty_prediction_list(perfect_run):
    samples, world, _, _ = perfect_run
    with pytest.raises(EvalError, match="empty"):
        evaluate(Perfect(samples), [], world)

    class NoVideos(Perfect):
        def generate(self, prompts, seed):
            return []

    with pytest.raises(EvalError, match=r"returned 0 videos for \d+ inputs"):
        evaluate(NoVideos(samples), samples, world, tasks=("t2v",))


def test_unknown_task_and_wrong_video_type(perfect_run):
    samples, world, _, _ = perfect_run
    with pytest.raises(EvalError, match="unknown task 't2i'"):
        evaluate(Perfect(samples), samples, world, tasks="t2v,t2i")

    class FloatVideos(Perfect):
        def generate(self, prompts, seed):
            return [v.astype(np.float32) for v in super().generate(prompts, seed)]

    with pytest.raises(EvalError, match=r"uint8 videos \[F, H, W, 3\]"):
        evaluate(FloatVideos(samples), samples, world, tasks=("t2v",))
