"""ShapesWorld: geometry against analytic values, sampling constraints, text, determinism, synthesis."""

import itertools
import json
import math

import numpy as np
import pytest

from univigu.config import WorldConfig
from univigu.data import shapesworld as sw
from univigu.data.shapesworld import ObjectSpec, Scene
from univigu.data.video_io import read_video

WORLD = WorldConfig()  # 32x32, 9 frames, 1 object
MULTI = WorldConfig(min_objects=1, max_objects=3)


def still(shape, size="large", colour="white", x=16.0, y=16.0, motion="still"):
    return Scene(objects=(ObjectSpec(shape, colour, size, motion, x, y),))


# --------------------------------------------------------------------------------------------
# Vocabulary and geometry
# --------------------------------------------------------------------------------------------


def test_vocabulary_meets_the_brief():
    assert set(sw.SHAPES) >= {"circle", "square", "triangle", "star"}
    assert len(sw.COLOURS) >= 6 and sw.SIZES == ("small", "large")
    assert len(sw.MOTIONS) >= 6 and "still" in sw.MOTIONS
    assert any(all(sw.MOTION_VECTORS[m]) for m in sw.MOTIONS), "needs a diagonal motion"
    # Well separated colours: every pair at least 100 apart in RGB.
    for a, b in itertools.combinations(sw.COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) >= 100


def test_render_shape_and_dtype_scale_with_the_world():
    world = WorldConfig(width=64, height=48, frames=17)
    scene = sw.sample_scene(np.random.default_rng(0), world)
    video = sw.render(scene, world)
    assert video.shape == (17, 48, 64, 3) and video.dtype == np.uint8


def test_square_is_pixel_exact():
    # Large R = 0.25 * 32 = 8, half side 0.75 R = 6: a 12x12 block from 10 to 22, aligned to pixels.
    frame = sw.render(still("square"), WORLD)[0]
    expected = np.zeros((32, 32, 3), np.uint8)
    expected[10:22, 10:22] = 255
    np.testing.assert_array_equal(frame, expected)


@pytest.mark.parametrize("shape, area_over_r2, perimeter_over_r", [
    ("circle", math.pi * 0.85**2, 2 * math.pi * 0.85),
    ("triangle", 3 * math.sqrt(3) / 4, 3 * math.sqrt(3)),  # equilateral, circumradius 1
    # Star: 10 triangles (centre, tip, inner vertex), sides from the law of cosines.
    ("star", 5 * sw.STAR_INNER_RATIO * math.sin(math.radians(36)),
     10 * math.sqrt(1 + sw.STAR_INNER_RATIO**2 - 2 * sw.STAR_INNER_RATIO * math.cos(math.radians(36)))),
])
@pytest.mark.parametrize("size", ["small", "large"])
def test_anti_aliased_area_matches_the_analytic_area(shape, area_over_r2, perimeter_over_r, size):
    radius = sw.SIZE_FRACTION[size] * 32
    rng = np.random.default_rng(0)
    areas = []
    for dx, dy in rng.uniform(-0.5, 0.5, size=(40, 2)):
        frame = sw.render(still(shape, size=size, x=16 + dx, y=16 + dy), WORLD)[0].astype(float)
        areas.append(frame.sum() / (3 * 255))
    # 4x4 point sampling misplaces an edge by at most 1/8 px, and is unbiased over random offsets.
    bound = perimeter_over_r * radius / (2 * sw.SUPERSAMPLING)
    assert np.abs(np.subtract(areas, area_over_r2 * radius**2)).max() <= bound
    assert np.mean(areas) == pytest.approx(area_over_r2 * radius**2, rel=0.01)


def test_sizes_are_clearly_separated():
    for shape in sw.SHAPES:
        small = sw.render(still(shape, size="small"), WORLD)[0].sum()
        large = sw.render(still(shape, size="large"), WORLD)[0].sum()
        assert large / small > 2.0


@pytest.mark.parametrize("motion", sw.MOTIONS)
def test_motion_moves_the_centroid_by_the_travel_distance(motion):
    world = WorldConfig(width=48, height=40, frames=13)
    ux, uy = sw.MOTION_VECTORS[motion]
    scene = still("circle", size="small", motion=motion, x=24 - 0.18 * 48 * ux, y=20 - 0.18 * 40 * uy)
    video = sw.render(scene, world).astype(float).sum(axis=-1)
    ys, xs = np.mgrid[0:40, 0:48] + 0.5
    cx = (video * xs).sum(axis=(1, 2)) / video.sum(axis=(1, 2))
    cy = (video * ys).sum(axis=(1, 2)) / video.sum(axis=(1, 2))
    np.testing.assert_allclose(cx - cx[0], np.linspace(0, 0.36 * 48 * ux, 13), atol=0.05)
    np.testing.assert_allclose(cy - cy[0], np.linspace(0, 0.36 * 40 * uy, 13), atol=0.05)


def test_sampled_objects_stay_inside_apart_and_distinct():
    rng = np.random.default_rng(3)
    for _ in range(60):
        scene = sw.sample_scene(rng, MULTI)
        assert 1 <= len(scene.objects) <= 3
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        masks = [sw.render(Scene((o,)), MULTI).any(axis=-1) for o in scene.objects]
        for mask in masks:
            edges = np.concatenate([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], axis=1)
            assert not edges.any(), "object touches the frame edge"
            assert mask.any(axis=(1, 2)).all(), "object left the frame"
        for a, b in itertools.combinations(masks, 2):
            assert not (a & b).any(), "objects overlap"


def test_object_counts_cover_the_configured_range():
    rng = np.random.default_rng(0)
    counts = {len(sw.sample_scene(rng, MULTI).objects) for _ in range(60)}
    assert counts == {1, 2, 3}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def test_prompt_grammar():
    scene = Scene((ObjectSpec("circle", "red", "small", "left", 20, 16),
                   ObjectSpec("square", "blue", "large", "still", 10, 10)))
    assert sw.prompt_text(scene) == "a small red circle moves to the left and a large blue square stays still"
    assert sw.prompt_text(still("triangle", "small", "green", motion="up-right")) == (
        "a small green triangle moves up and to the right")


def test_caption_names_positions_relations_and_background():
    scene = Scene((ObjectSpec("star", "yellow", "small", "down", 5.0, 4.0),
                   ObjectSpec("circle", "cyan", "large", "up", 16.0, 27.0)))
    caption = sw.caption_text(scene)
    assert caption == (
        "A small yellow star starts at the top left and moves down. "
        "A large cyan circle starts at the bottom centre and moves up. "
        "The yellow star starts above the cyan circle. "
        "The background is black."
    )
    assert "starts at the centre and" in sw.caption_text(still("square"))


def test_attributes():
    scene = still("star", "small", "magenta", motion="down")
    assert sw.attributes(scene) == [{"shape": "star", "colour": "magenta", "size": "small", "motion": "down"}]


# --------------------------------------------------------------------------------------------
# Determinism, ids, splits
# --------------------------------------------------------------------------------------------


def test_make_samples_is_deterministic_and_stable():
    a = sw.make_samples(20, 7, MULTI)
    b = sw.make_samples(20, 7, MULTI)
    assert a == b
    assert sw.make_samples(8, 7, MULTI) == a[:8]  # sample i does not depend on num
    for x, y in zip(a, b):
        np.testing.assert_array_equal(sw.render(x.scene, MULTI), sw.render(y.scene, MULTI))
    other = sw.make_samples(20, 8, MULTI)
    assert [s.scene for s in other] != [s.scene for s in a]
    ids = [s.id for split in ("train", "val", "test") for s in sw.make_samples(20, 7, MULTI, split)]
    assert len(set(ids)) == len(ids)


def test_heldout_combinations_never_reach_training():
    world = WorldConfig(max_objects=3, holdout_fraction=0.2)
    held = sw.heldout_combinations(world)
    assert len(held) == round(0.2 * len(sw.SHAPES) * len(sw.COLOURS))
    seen: set[tuple[str, str]] = set()
    for split in ("train", "val", "test"):
        for sample in sw.make_samples(70, 1, world, split):
            seen |= {(o.shape, o.colour) for o in sample.scene.objects}
    assert not seen & held
    # Every shape and colour still appears in training, only the pairs are new.
    assert {s for s, _ in seen} == set(sw.SHAPES) and {c for _, c in seen} == set(sw.COLOURS)
    for sample in sw.make_samples(30, 1, world, "heldout"):
        first = sample.scene.objects[0]
        assert (first.shape, first.colour) in held
    assert sw.heldout_combinations(world) == held  # fixed, not seeded
    assert sw.heldout_combinations(WORLD) == frozenset()


def test_split_counts_sum_to_num():
    assert sw.split_counts(10, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 8, "val": 1, "test": 1}
    counts = sw.split_counts(7, {"train": 0.5, "val": 0.25, "test": 0.25})
    assert sum(counts.values()) == 7


@pytest.mark.parametrize("make, message", [
    (lambda: sw.render(still("hexagon"), WORLD), "unknown shape 'hexagon'"),
    (lambda: sw.render(still("circle", colour="pink"), WORLD), "unknown colour 'pink'"),
    (lambda: sw.sample_scene(np.random.default_rng(0), WorldConfig(frames=1)), "at least 2 frames"),
    (lambda: sw.sample_scene(np.random.default_rng(0), WORLD, "dev"), "unknown split 'dev'"),
    (lambda: sw.sample_scene(np.random.default_rng(0), WORLD, "heldout"), "holdout_fraction"),
    (lambda: sw.make_samples(2, 0, WorldConfig(max_objects=9)), "max_objects"),
    (lambda: sw.split_counts(10, {"train": 0.5}), "sum to 1"),
])
def test_bad_input_gives_one_clear_error(make, message):
    with pytest.raises(sw.ShapesWorldError, match=message):
        make()


# --------------------------------------------------------------------------------------------
# Synthesis to disk
# --------------------------------------------------------------------------------------------


def test_synthesize_writes_videos_and_manifests(tmp_path):
    world = WorldConfig(max_objects=2, holdout_fraction=0.1)
    out = sw.synthesize(tmp_path / "a", 20, 3, world, progress=False)
    assert out == tmp_path / "a"
    assert json.loads((out / "world.json").read_text())["max_objects"] == 2
    lines = {split: [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
             for split in ("train", "val", "test", "heldout")}
    assert {k: len(v) for k, v in lines.items()} == {"train": 14, "val": 2, "test": 2, "heldout": 2}
    expected = {s.id: s for s in sw.make_samples(14, 3, world, "train")}
    for rec in lines["train"]:
        assert set(rec) == {"id", "video", "prompt", "caption", "objects", "split", "num_frames", "width", "height"}
        sample = expected[rec["id"]]
        assert (rec["prompt"], rec["caption"], rec["objects"]) == (
            sample.prompt, sample.caption, sw.attributes(sample.scene))
        assert (rec["num_frames"], rec["width"], rec["height"], rec["split"]) == (9, 32, 32, "train")
        frames = read_video(out / rec["video"])
        # H.264 yuv444 crf 0: the colour conversion may move a channel by 1.
        assert np.abs(frames.astype(int) - sw.render(sample.scene, world)).max() <= 2

    # Same seed -> byte-identical manifests and identical frames; another seed differs.
    again = sw.synthesize(tmp_path / "b", 20, 3, world, progress=False)
    other = sw.synthesize(tmp_path / "c", 20, 4, world, progress=False)
    for split in lines:
        assert (out / f"{split}.jsonl").read_bytes() == (again / f"{split}.jsonl").read_bytes()
        assert (out / f"{split}.jsonl").read_bytes() != (other / f"{split}.jsonl").read_bytes()
    rec = lines["val"][0]
    np.testing.assert_array_equal(read_video(out / rec["video"]), read_video(again / rec["video"]))


def test_synthesize_rejects_heldout_without_holdout(tmp_path):
    with pytest.raises(sw.ShapesWorldError, match="holdout_fraction"):
        sw.synthesize(tmp_path, 4, 0, WORLD, splits={"train": 0.5, "heldout": 0.5}, progress=False)
