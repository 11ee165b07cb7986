"""The ShapesWorld oracle: pixel reading accuracy, caption parsing and scoring."""

import numpy as np
import pytest
import torch

from univigu.config import WorldConfig
from univigu.data import shapesworld as sw
from univigu.data.oracle import (
    ATTRIBUTES,
    OracleError,
    match_objects,
    parse_text,
    read_video_attributes,
    score_many,
    score_sample,
)
from univigu.data.video_io import read_video, write_video


def _world(objects: int) -> WorldConfig:
    return WorldConfig(min_objects=objects, max_objects=objects)


@pytest.fixture(scope="module")
def rendered():
    """510 rendered videos: 1, 2 and 3 objects, several seeds -> [(world, sample, frames)]."""
    items = []
    for objects, seeds in ((1, (0, 1)), (2, (2, 3)), (3, (4, 5))):
        world = _world(objects)
        for seed in seeds:
            for sample in sw.make_samples(85, seed, world):
                items.append((world, sample, sw.render(sample.scene, world)))
    return items


def _assert_accuracy(result: dict, floor: float):
    for key in (*ATTRIBUTES, "count_correct"):
        assert result[key] >= floor, f"{key}: {result[key]:.4f} < {floor} ({result})"


def test_oracle_reads_rendered_videos(rendered):
    preds = [read_video_attributes(frames, world) for world, _, frames in rendered]
    result = score_many(preds, [sw.attributes(s.scene) for _, s, _ in rendered])
    assert result["num_samples"] >= 500
    _assert_accuracy(result, 0.99)


def test_oracle_reads_mp4_round_trip(rendered, tmp_path):
    subset = rendered[::3]  # 170 videos, all object counts
    preds = []
    for n, (world, _, frames) in enumerate(subset):
        path = tmp_path / f"{n}.mp4"
        write_video(path, frames, fps=world.fps)
        preds.append(read_video_attributes(read_video(path), world))
    _assert_accuracy(score_many(preds, [sw.attributes(s.scene) for _, s, _ in subset]), 0.99)


def test_oracle_is_robust_to_mild_noise(rendered):
    rng = np.random.default_rng(0)
    subset = rendered[1::3]
    preds = []
    for world, _, frames in subset:
        noisy = np.clip(frames + rng.normal(0.0, 10.0, frames.shape), 0, 255).round().astype(np.uint8)
        preds.append(read_video_attributes(noisy, world))
    _assert_accuracy(score_many(preds, [sw.attributes(s.scene) for _, s, _ in subset]), 0.97)


def test_oracle_reads_generator_tensors(rendered):
    # Generators output float [3, F, H, W] in [-1, 1].
    for world, sample, frames in rendered[:: 51]:
        tensor = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0
        assert read_video_attributes(tensor, world) == read_video_attributes(frames, world)


def test_oracle_follows_the_video_resolution():
    world = WorldConfig(width=64, height=48, frames=17, max_objects=3)
    samples = sw.make_samples(30, 9, world)
    preds = [read_video_attributes(sw.render(s.scene, world), WorldConfig()) for s in samples]
    assert score_many(preds, [sw.attributes(s.scene) for s in samples])["all_correct"] == 1.0


def test_oracle_sees_nothing_in_an_empty_video():
    assert read_video_attributes(np.zeros((9, 32, 32, 3), np.uint8), WorldConfig()) == []


@pytest.mark.parametrize("bad, message", [
    (np.zeros((32, 32, 3), np.uint8), "4-D"),
    (np.zeros((9, 32, 32, 4), np.uint8), r"\[F, H, W, 3\]"),
    (torch.zeros(4, 9, 32, 32), r"\[3, F, H, W\]"),
    (np.zeros((1, 32, 32, 3), np.uint8), "at least 2 frames"),
    ([[1, 2]], "numpy array or torch tensor"),
])
def test_oracle_rejects_bad_input(bad, message):
    with pytest.raises(OracleError, match=message):
        read_video_attributes(bad, WorldConfig())


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def test_parser_recovers_every_attribute_from_prompts_and_captions(rendered):
    heldout = sw.make_samples(60, 5, WorldConfig(max_objects=3, holdout_fraction=0.1), "heldout")
    for sample in [s for _, s, _ in rendered] + heldout:
        truth = sw.attributes(sample.scene)
        assert parse_text(sample.prompt) == truth, sample.prompt
        assert parse_text(sample.caption) == truth, sample.caption


def test_parser_is_tolerant_and_marks_missing_attributes():
    assert parse_text("A big blue star is moving upward and to the right!") == [
        {"shape": "star", "colour": "blue", "size": "large", "motion": "up-right"}]
    assert parse_text("we see a red circle. it is small") == [
        {"shape": "circle", "colour": "red", "size": None, "motion": None}]
    assert parse_text("The small green square starts in the center and does not move.") == [
        {"shape": "square", "colour": "green", "size": "small", "motion": "still"}]
    assert parse_text("A small red circle starts at the top left. The circle moves down.") == [
        {"shape": "circle", "colour": "red", "size": "small", "motion": "down"}]
    assert parse_text("nothing to see") == []
    with pytest.raises(OracleError):
        parse_text(None)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

TRUTH = [
    {"shape": "circle", "colour": "red", "size": "small", "motion": "left"},
    {"shape": "star", "colour": "blue", "size": "large", "motion": "still"},
    {"shape": "square", "colour": "green", "size": "small", "motion": "up"},
]


def test_perfect_prediction_scores_one():
    score = score_sample(TRUTH, TRUTH)
    assert all(score[k] == 1.0 for k in ATTRIBUTES) and score["all_correct"]


def test_reordered_objects_still_match():
    pred = [TRUTH[2], TRUTH[0], TRUTH[1]]
    assert match_objects(pred, TRUTH) == [(1, 0), (2, 1), (0, 2)]
    assert score_sample(pred, TRUTH)["all_correct"]


def test_corrupted_attributes_score_exactly_their_fraction():
    rng = np.random.default_rng(0)
    samples = sw.make_samples(200, 1, WorldConfig(max_objects=3))
    truths = [sw.attributes(s.scene) for s in samples]
    preds = [[dict(o) for o in t] for t in truths]
    objects = [(i, j) for i, t in enumerate(truths) for j in range(len(t))]
    corrupt = rng.choice(len(objects), size=len(objects) // 4, replace=False)
    for n in corrupt:  # one wrong size per corrupted object: the other three still pin the match
        i, j = objects[n]
        preds[i][j]["size"] = "large" if preds[i][j]["size"] == "small" else "small"
    result = score_many(preds, truths)
    assert result["size"] == pytest.approx(1 - len(corrupt) / len(objects))
    assert result["shape"] == result["colour"] == result["motion"] == 1.0
    wrong_samples = len({objects[n][0] for n in corrupt})
    assert result["all_correct"] == pytest.approx(1 - wrong_samples / len(truths))


def test_missing_and_extra_objects_count_as_wrong():
    missing = score_sample(TRUTH[:2], TRUTH)
    assert missing["shape"] == pytest.approx(2 / 3) and not missing["all_correct"]
    assert match_objects(TRUTH[:2], TRUTH)[-1] == (None, 2)
    extra = score_sample(TRUTH + [TRUTH[0]], TRUTH)
    assert extra["shape"] == 1.0 and not extra["count_correct"] and not extra["all_correct"]
    assert match_objects(TRUTH + [TRUTH[0]], TRUTH)[-1] == (3, None)
    none = score_sample([{"shape": None, "colour": "red", "size": None, "motion": None}], TRUTH[:1])
    assert none["shape"] == 0.0 and none["colour"] == 1.0
    with pytest.raises(OracleError):
        score_many([TRUTH], [])
