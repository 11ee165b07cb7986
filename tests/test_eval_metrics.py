"""ShapesWorld metrics: perfect inputs score 100%, known corruptions score exactly their fraction,
object order does not matter, intervals match scipy's Wilson interval, bad input fails clearly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import binomtest

from univigu.config import WorldConfig
from univigu.data import shapesworld as sw
from univigu.evaluation.shapesworld_metrics import (
    ShapesWorldMetricError,
    generation_metrics,
    joint_metrics,
    understanding_metrics,
    wilson_interval,
)

WORLD = WorldConfig()  # 32x32, 9 frames, one object
WORLD3 = WorldConfig(min_objects=2, max_objects=3)


def _other(value: str, choices) -> str:
    return next(c for c in choices if c != value)


def _corrupt(scene: sw.Scene, attribute: str) -> sw.Scene:
    """The same scene with the first object's `attribute` changed to another valid value (colours
    avoid every colour already in the scene, so objects stay distinguishable)."""
    first = scene.objects[0]
    if attribute == "colour":
        used = {o.colour for o in scene.objects}
        new = next(c for c in sw.COLOURS if c not in used)
    else:
        new = _other(getattr(first, attribute), {"shape": sw.SHAPES, "size": sw.SIZES, "motion": sw.MOTIONS}[attribute])
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, **{attribute: new}),) + scene.objects[1:])


@pytest.fixture(scope="module")
def samples():
    return sw.make_samples(12, seed=3, world=WORLD, split="test")


@pytest.fixture(scope="module")
def multi_samples():
    return sw.make_samples(8, seed=5, world=WORLD3, split="test")


# --------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (3, 10), (81, 263), (1, 1), (150, 300)])
def test_wilson_interval_matches_scipy(k, n):
    reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(reference.low, abs=1e-6)
    assert hi == pytest.approx(reference.high, abs=1e-6)


def test_wilson_interval_edge_cases():
    assert wilson_interval(0, 0) == [0.0, 1.0]
    with pytest.raises(ShapesWorldMetricError):
        wilson_interval(5, 4)


# --------------------------------------------------------------------------------------------
# Understanding (v2t): parsed captions vs ground truth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text_of", [sw.caption_text, sw.prompt_text])
def test_understanding_perfect_captions_score_100(samples, multi_samples, text_of):
    for group in (samples, multi_samples):
        truths = [sw.attributes(s.scene) for s in group]
        result = understanding_metrics([text_of(s.scene) for s in group], truths)
        assert result["n"] == len(group)
        assert result["v2t.n_objects"] == sum(len(t) for t in truths)
        for key in ("colour", "shape", "size", "motion", "count_correct", "all_correct"):
            assert result[f"v2t.{key}"] == 1.0, key
        assert result["v2t.all_correct_ci95"] == pytest.approx(wilson_interval(len(group), len(group)))


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "motion"])
def test_understanding_known_fraction_of_corruptions(samples, attribute):
    corrupted = {1, 4, 7}  # 3 of 12 single-object samples
    captions = [sw.caption_text(_corrupt(s.scene, attribute) if i in corrupted else s.scene)
                for i, s in enumerate(samples)]
    result = understanding_metrics(captions, [sw.attributes(s.scene) for s in samples])
    expected = 1 - len(corrupted) / len(samples)
    assert result[f"v2t.{attribute}"] == pytest.approx(expected, abs=1e-12)
    assert result["v2t.all_correct"] == pytest.approx(expected, abs=1e-12)
    for other in {"colour", "shape", "size", "motion"} - {attribute}:
        assert result[f"v2t.{other}"] == 1.0
    assert result["v2t.all_correct_ci95"] == pytest.approx(wilson_interval(9, 12))


def test_understanding_multi_object_partial_corruption(multi_samples):
    """One object of a multi-object sample wrong: attribute rate over objects, all-correct over samples."""
    corrupted = {0, 3}
    captions = [sw.prompt_text(_corrupt(s.scene, "shape") if i in corrupted else s.scene)
                for i, s in enumerate(multi_samples)]
    truths = [sw.attributes(s.scene) for s in multi_samples]
    result = understanding_metrics(captions, truths)
    num_objects = sum(len(t) for t in truths)
    assert result["v2t.shape"] == pytest.approx(1 - len(corrupted) / num_objects, abs=1e-12)
    assert result["v2t.all_correct"] == pytest.approx(1 - len(corrupted) / len(multi_samples), abs=1e-12)
    assert result["v2t.colour"] == 1.0


def test_understanding_reordered_objects_match(multi_samples):
    captions = [sw.prompt_text(s.scene) for s in multi_samples]
    reversed_truths = [list(reversed(sw.attributes(s.scene))) for s in multi_samples]
    result = understanding_metrics(captions, reversed_truths)
    assert result["v2t.all_correct"] == 1.0


def test_understanding_missing_object_is_wrong(multi_samples):
    # A caption naming only the first object: count wrong, the other objects' attributes wrong.
    first_only = [sw.prompt_text(dataclasses.replace(s.scene, objects=s.scene.objects[:1])) for s in multi_samples]
    truths = [sw.attributes(s.scene) for s in multi_samples]
    result = understanding_metrics(first_only, truths)
    assert result["v2t.count_correct"] == 0.0 and result["v2t.all_correct"] == 0.0
    assert result["v2t.colour"] == pytest.approx(len(multi_samples) / sum(len(t) for t in truths))


# --------------------------------------------------------------------------------------------
# Generation (t2v): oracle reading of videos vs prompt attributes
# --------------------------------------------------------------------------------------------


def test_generation_perfect_videos_score_100(samples, multi_samples):
    for group, world in ((samples, WORLD), (multi_samples, WORLD3)):
        videos = [sw.render(s.scene, world) for s in group]
        result = generation_metrics(videos, [sw.attributes(s.scene) for s in group], world)
        for key in ("colour", "shape", "size", "motion", "all_correct"):
            assert result[f"t2v.{key}"] == 1.0, key


def test_generation_known_fraction_of_corruptions(samples):
    """Videos rendered with one attribute changed in a known set of samples."""
    plan = {0: "colour", 2: "shape", 5: "motion", 6: "motion", 9: "size"}
    videos = [sw.render(_corrupt(s.scene, plan[i]) if i in plan else s.scene, WORLD) for i, s in enumerate(samples)]
    result = generation_metrics(videos, [sw.attributes(s.scene) for s in samples], WORLD)
    n = len(samples)
    for attribute in ("colour", "shape", "size", "motion"):
        wrong = sum(a == attribute for a in plan.values())
        assert result[f"t2v.{attribute}"] == pytest.approx(1 - wrong / n, abs=1e-12), attribute
    assert result["t2v.all_correct"] == pytest.approx(1 - len(plan) / n, abs=1e-12)


def test_generation_reordered_objects_match(multi_samples):
    videos = [sw.render(s.scene, WORLD3) for s in multi_samples]
    shuffled = [list(np.random.default_rng(i).permutation(sw.attributes(s.scene))) for i, s in enumerate(multi_samples)]
    result = generation_metrics(videos, shuffled, WORLD3)
    assert result["t2v.all_correct"] == 1.0


# --------------------------------------------------------------------------------------------
# Joint: prompt, video reading and caption must all agree
# --------------------------------------------------------------------------------------------


def test_joint_counts_only_full_agreement(samples):
    truths = [sw.attributes(s.scene) for s in samples]
    bad_caption, bad_video, both_same = {0, 1}, {2, 3, 4}, {5}
    videos, captions = [], []
    for i, s in enumerate(samples):
        wrong = _corrupt(s.scene, "colour")
        videos.append(sw.render(wrong if i in bad_video | both_same else s.scene, WORLD))
        captions.append(sw.caption_text(wrong if i in bad_caption | both_same else s.scene))
    result = joint_metrics(truths, videos, captions, WORLD)
    n = len(samples)
    assert result["joint.all_correct"] == pytest.approx(1 - 6 / n, abs=1e-12)
    assert result["joint.colour"] == pytest.approx(1 - 6 / n, abs=1e-12)
    assert result["joint.shape"] == 1.0
    assert result["joint.video_all_correct"] == pytest.approx(1 - 4 / n, abs=1e-12)
    assert result["joint.caption_all_correct"] == pytest.approx(1 - 3 / n, abs=1e-12)
    # Caption and video agree with each other (though not with the prompt) in `both_same`.
    assert result["joint.caption_matches_video"] == pytest.approx(1 - 5 / n, abs=1e-12)


def test_joint_perfect(multi_samples):
    truths = [sw.attributes(s.scene) for s in multi_samples]
    videos = [sw.render(s.scene, WORLD3) for s in multi_samples]
    result = joint_metrics(truths, videos, [sw.caption_text(s.scene) for s in multi_samples], WORLD3)
    assert result["joint.all_correct"] == 1.0 and result["joint.caption_matches_video"] == 1.0


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_empty_prediction_list_fails_clearly():
    with pytest.raises(ShapesWorldMetricError, match="empty"):
        understanding_metrics([], [])
    with pytest.raises(ShapesWorldMetricError, match="empty"):
        generation_metrics([], [], WORLD)


def test_mismatched_lengths_fail_clearly(samples):
    with pytest.raises(ShapesWorldMetricError, match="different lengths"):
        understanding_metrics(["a small red circle moves up"], [sw.attributes(s.scene) for s in samples])
    with pytest.raises(ShapesWorldMetricError, match="must be a string"):
        understanding_metrics([None], [sw.attributes(samples[0].scene)])
