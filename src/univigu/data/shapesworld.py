"""ShapesWorld: procedural captioned videos whose ground truth is known exactly.

A scene holds 1..K objects on a plain background. Every object has a shape, a colour, a size and a
motion, and moves in a straight line at constant speed over the clip. Rendering is deterministic
and anti-aliased (4x4 supersampling), so the same scene always gives the same pixels.

Geometry scales with the frame: with S = min(width, height) a small object has nominal radius
0.16 S and a large one 0.25 S (5.1 and 8 px at 32x32, area ratio ~0.4), and a moving object travels
36% of the frame width (or height) over the clip. Start positions are drawn so the object stays
fully inside the frame for the whole clip, and objects of one scene never overlap in any frame.

`sample_scene` / `render` / `prompt_text` / `caption_text` are the core; `make_samples` and
`synthesize` turn them into a data set on disk (mp4 files plus one JSONL manifest per split).
The pixel oracle that reads attributes back lives in `univigu.data.oracle`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from univigu.atomic import atomic_directory, atomic_write_text
from univigu.config import WorldConfig

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40),
    "green": (40, 220, 40),
    "blue": (50, 90, 255),
    "yellow": (255, 230, 40),
    "magenta": (240, 50, 240),
    "cyan": (40, 230, 230),
    "white": (255, 255, 255),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "up-right", "still")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0)}
SPLITS = ("train", "val", "test", "heldout")

# Unit displacement of each motion over the whole clip, in (x, y) image axes (y points down).
MOTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-right": (1.0, -1.0),
    "still": (0.0, 0.0),
}
MOTION_PHRASES: dict[str, str] = {
    "left": "moves to the left",
    "right": "moves to the right",
    "up": "moves up",
    "down": "moves down",
    "up-right": "moves up and to the right",
    "still": "stays still",
}

SIZE_FRACTION = {"small": 0.16, "large": 0.25}  # nominal radius / min(width, height)
TRAVEL_FRACTION = 0.36  # distance travelled over the clip / frame width (or height)
STAR_INNER_RATIO = 0.5  # a fat star keeps its points visible at 5 px
SUPERSAMPLING = 4  # anti-aliasing: 4x4 samples per pixel


class ShapesWorldError(ValueError):
    """A ShapesWorld setting or scene is invalid."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object; (x, y) is its centre in pixels at the first frame."""

    shape: str
    colour: str
    size: str
    motion: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """Objects on a plain background; width/height give the frame the positions refer to."""

    objects: tuple[ObjectSpec, ...]
    background: str = "black"
    width: int = 32
    height: int = 32


@dataclass
class Sample:
    id: str
    scene: Scene
    prompt: str
    caption: str
    split: str


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def check_world(world: WorldConfig) -> None:
    """Raise ShapesWorldError naming the first setting this world cannot be rendered with."""
    if world.width < 16 or world.height < 16:
        raise ShapesWorldError(f"ShapesWorld needs at least 16x16 pixels, got {world.width}x{world.height}")
    if world.frames < 2:
        raise ShapesWorldError(f"ShapesWorld needs at least 2 frames to show motion, got {world.frames}")
    if world.fps < 1:
        raise ShapesWorldError(f"world.fps must be positive, got {world.fps}")
    if not 1 <= world.min_objects <= world.max_objects:
        raise ShapesWorldError(
            f"need 1 <= world.min_objects <= world.max_objects, got {world.min_objects}, {world.max_objects}"
        )
    if world.max_objects > len(COLOURS):
        raise ShapesWorldError(
            f"world.max_objects={world.max_objects} exceeds the {len(COLOURS)} colours (objects get distinct colours)"
        )
    if world.max_objects > 3 and min(world.width, world.height) < 48:
        raise ShapesWorldError(
            f"world.max_objects={world.max_objects} objects do not fit apart in {world.width}x{world.height}; "
            "use at most 3 objects below 48 pixels"
        )
    if not 0.0 <= world.holdout_fraction < 1.0:
        raise ShapesWorldError(f"world.holdout_fraction must be in [0, 1), got {world.holdout_fraction}")


def object_radius(size: str, world: WorldConfig) -> float:
    """Nominal radius R of an object of this size (pixels)."""
    return SIZE_FRACTION[size] * min(world.width, world.height)


def travel(world: WorldConfig) -> tuple[float, float]:
    """(dx, dy) pixels travelled over the clip along each axis by a moving object."""
    return TRAVEL_FRACTION * world.width, TRAVEL_FRACTION * world.height


def margin(world: WorldConfig) -> float:
    """Gap kept between an object and the frame edge (and between objects)."""
    return max(1.0, min(world.width, world.height) / 32)


@lru_cache(maxsize=None)
def _unit_polygon(shape: str) -> np.ndarray | None:
    """Polygon vertices [N, 2] for a shape of radius 1 centred at 0 (None for the circle).

    The triangle is equilateral and the star regular, so each shape's centroid is its centre:
    the oracle relies on this to place templates at measured centroids.
    """
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.75  # same area as the circle below (0.85^2 pi ~ 1.5^2)
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if shape == "triangle":
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ShapesWorldError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


CIRCLE_RADIUS = 0.85  # circle radius / R


@lru_cache(maxsize=None)
def shape_extent(shape: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) extent of a unit-radius shape relative to its centre."""
    poly = _unit_polygon(shape)
    if poly is None:
        return (-CIRCLE_RADIUS, -CIRCLE_RADIUS, CIRCLE_RADIUS, CIRCLE_RADIUS)
    return (float(poly[:, 0].min()), float(poly[:, 1].min()), float(poly[:, 0].max()), float(poly[:, 1].max()))


@lru_cache(maxsize=None)
def shape_circumradius(shape: str) -> float:
    """Distance from the centre to the farthest point of a unit-radius shape."""
    poly = _unit_polygon(shape)
    return CIRCLE_RADIUS if poly is None else float(np.hypot(poly[:, 0], poly[:, 1]).max())


def coverage(shape: str, cx: float, cy: float, radius: float, height: int, width: int,
             supersampling: int = SUPERSAMPLING) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of a shape: (row0, col0, alpha patch in [0, 1]).

    Only the bounding box is evaluated, so the cost does not grow with the frame size.
    """
    left, top, right, bottom = shape_extent(shape)
    r0 = max(0, int(math.floor(cy + top * radius)))
    r1 = min(height, int(math.ceil(cy + bottom * radius)) + 1)
    c0 = max(0, int(math.floor(cx + left * radius)))
    c1 = min(width, int(math.ceil(cx + right * radius)) + 1)
    if r1 <= r0 or c1 <= c0:
        return r0, c0, np.zeros((0, 0))
    offsets = (np.arange(supersampling) + 0.5) / supersampling
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)  # sample rows
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).reshape(-1)
    px = (xs[None, :] - cx) / radius
    py = (ys[:, None] - cy) / radius
    poly = _unit_polygon(shape)
    if poly is None:
        inside = px * px + py * py <= CIRCLE_RADIUS**2
    else:
        inside = _inside_polygon(px, py, poly)
    patch = inside.reshape(r1 - r0, supersampling, c1 - c0, supersampling).mean(axis=(1, 3))
    return r0, c0, patch


def _inside_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon, broadcast over px [1, N] and py [M, 1]."""
    inside = np.zeros(np.broadcast_shapes(px.shape, py.shape), dtype=bool)
    for (xi, yi), (xj, yj) in zip(poly, np.roll(poly, -1, axis=0)):
        if yi == yj:
            continue
        crosses = (yi > py) != (yj > py)
        x_cross = xi + (xj - xi) * (py - yi) / (yj - yi)
        inside ^= crosses & (px < x_cross)
    return inside


def trajectory(obj: ObjectSpec, world: WorldConfig) -> np.ndarray:
    """Centre positions [F, 2] (x, y) over the clip: constant speed, straight line."""
    ux, uy = MOTION_VECTORS[obj.motion]
    tx, ty = travel(world)
    t = np.linspace(0.0, 1.0, world.frames)
    return np.stack([obj.x + ux * tx * t, obj.y + uy * ty * t], axis=1)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render(scene: Scene, world: WorldConfig) -> np.ndarray:
    """Render a scene to uint8 frames [F, H, W, 3]; objects later in the scene are drawn on top."""
    check_world(world)
    if scene.background not in BACKGROUNDS:
        raise ShapesWorldError(f"unknown background {scene.background!r} (known: {', '.join(BACKGROUNDS)})")
    h, w = world.height, world.width
    video = np.empty((world.frames, h, w, 3), dtype=np.float64)
    video[...] = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    for obj in scene.objects:
        _check_object(obj)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float64)
        radius = object_radius(obj.size, world)
        for f, (cx, cy) in enumerate(trajectory(obj, world)):
            r0, c0, alpha = coverage(obj.shape, cx, cy, radius, h, w)
            region = video[f, r0:r0 + alpha.shape[0], c0:c0 + alpha.shape[1]]
            region += alpha[..., None] * (colour - region)
    return np.rint(video).astype(np.uint8)


def _check_object(obj: ObjectSpec) -> None:
    for value, known, name in ((obj.shape, SHAPES, "shape"), (obj.colour, COLOURS, "colour"),
                               (obj.size, SIZES, "size"), (obj.motion, MOTIONS, "motion")):
        if value not in known:
            raise ShapesWorldError(f"unknown {name} {value!r} (known: {', '.join(known)})")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def heldout_combinations(world: WorldConfig) -> frozenset[tuple[str, str]]:
    """The (shape, colour) pairs reserved for the held-out split.

    Fixed for a given fraction (independent of any seed), and chosen so that every shape and every
    colour still appears in training in some other combination (which caps the count at 21 of the 28 pairs).
    Any fraction > 0 holds out at least one pair.
    """
    if world.holdout_fraction <= 0:
        return frozenset()
    count = max(1, int(round(world.holdout_fraction * len(SHAPES) * len(COLOURS))))
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    order = np.random.default_rng(20240601).permutation(len(pairs))
    chosen: set[tuple[str, str]] = set()
    for idx in order:
        if len(chosen) == count:
            break
        shape, colour = pairs[idx]
        # Keep at least one training colour per shape and one training shape per colour.
        if sum(p[0] == shape for p in chosen) + 1 >= len(COLOURS):
            continue
        if sum(p[1] == colour for p in chosen) + 1 >= len(SHAPES):
            continue
        chosen.add((shape, colour))
    return frozenset(chosen)


def _start_range(shape: str, size: str, motion: str, world: WorldConfig) -> tuple[tuple[float, float], tuple[float, float]]:
    """Ranges for the start centre (x, y) that keep the object inside the frame all clip long."""
    radius = object_radius(size, world)
    left, top, right, bottom = (v * radius for v in shape_extent(shape))
    ux, uy = MOTION_VECTORS[motion]
    tx, ty = travel(world)
    m = margin(world)
    x_lo, x_hi = m - left - min(0.0, ux * tx), world.width - m - right - max(0.0, ux * tx)
    y_lo, y_hi = m - top - min(0.0, uy * ty), world.height - m - bottom - max(0.0, uy * ty)
    if x_lo > x_hi or y_lo > y_hi:
        raise ShapesWorldError(f"a {size} {shape} moving {motion} does not fit in {world.width}x{world.height}")
    return (x_lo, x_hi), (y_lo, y_hi)


@lru_cache(maxsize=64)
def _frame_times(frames: int) -> tuple[float, ...]:
    return tuple(np.linspace(0.0, 1.0, frames).tolist())


def _separated(a: ObjectSpec, b: ObjectSpec, world: WorldConfig) -> bool:
    """True when the circumscribed circles of a and b stay apart (plus a margin) in every frame.

    Plain floats, same arithmetic as `trajectory`: this runs thousands of times per scene.
    """
    gap = (shape_circumradius(a.shape) * object_radius(a.size, world)
           + shape_circumradius(b.shape) * object_radius(b.size, world) + margin(world))
    tx, ty = travel(world)
    (aux, auy), (bux, buy) = MOTION_VECTORS[a.motion], MOTION_VECTORS[b.motion]
    avx, avy, bvx, bvy = aux * tx, auy * ty, bux * tx, buy * ty
    for t in _frame_times(world.frames):
        if math.hypot((a.x + avx * t) - (b.x + bvx * t), (a.y + avy * t) - (b.y + bvy * t)) < gap:
            return False
    return True


def sample_scene(rng: np.random.Generator, world: WorldConfig, split: str = "train") -> Scene:
    """Draw a scene: 1..K objects with distinct colours, fully inside the frame, never overlapping.

    With `world.holdout_fraction > 0` the (shape, colour) pairs of `heldout_combinations` never
    appear in train/val/test scenes; every "heldout" scene's first object has one of them.
    """
    check_world(world)
    if split not in SPLITS:
        raise ShapesWorldError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    held = heldout_combinations(world)
    if split == "heldout" and not held:
        raise ShapesWorldError("the heldout split needs world.holdout_fraction > 0")
    count = int(rng.integers(world.min_objects, world.max_objects + 1))
    for _ in range(1000):
        objects: list[ObjectSpec] = []
        for slot in range(count):
            obj = _place_object(rng, world, split, held, objects, first=slot == 0)
            if obj is None:
                break
            objects.append(obj)
        else:
            return Scene(objects=tuple(objects), width=world.width, height=world.height)
    raise ShapesWorldError(f"could not place {count} objects apart in {world.width}x{world.height}")


def _place_object(rng: np.random.Generator, world: WorldConfig, split: str, held: frozenset,
                  placed: list[ObjectSpec], first: bool) -> ObjectSpec | None:
    used = {o.colour for o in placed}
    colours = [c for c in COLOURS if c not in used]
    for _ in range(100):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        size = SIZES[rng.integers(len(SIZES))]
        motion = MOTIONS[rng.integers(len(MOTIONS))]
        is_held = (shape, colour) in held
        if split == "heldout" and first and not is_held:
            continue
        if split != "heldout" and is_held:
            continue
        (x_lo, x_hi), (y_lo, y_hi) = _start_range(shape, size, motion, world)
        x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
        obj = ObjectSpec(shape, colour, size, motion, round(float(x), 3), round(float(y), 3))
        if all(_separated(obj, other, world) for other in placed):
            return obj
    return None


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_text(scene: Scene) -> str:
    """Short prompt naming every object: 'a small red circle moves to the left and a ...'."""
    parts = [f"{_article(o.size)} {o.size} {o.colour} {o.shape} {MOTION_PHRASES[o.motion]}" for o in scene.objects]
    return " and ".join(parts)


def position_name(x: float, y: float, width: int, height: int) -> str:
    """Coarse 3x3 grid name of a position: 'top left', 'centre', 'bottom centre', ..."""
    col = "left" if x < width / 3 else "right" if x > 2 * width / 3 else "centre"
    row = "top" if y < height / 3 else "bottom" if y > 2 * height / 3 else "centre"
    return "centre" if row == col == "centre" else f"{row} {col}"


def _relation(a: ObjectSpec, b: ObjectSpec) -> str:
    """Where a starts relative to b, along the axis where they are farther apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def caption_text(scene: Scene) -> str:
    """Detailed caption: each object's size, colour, shape, start position (3x3 grid of the
    scene's frame) and motion, the spatial relation between consecutive objects, the background."""
    sentences = []
    for o in scene.objects:
        where = position_name(o.x, o.y, scene.width, scene.height)
        sentences.append(
            f"{_article(o.size).capitalize()} {o.size} {o.colour} {o.shape} starts at the {where} "
            f"and {MOTION_PHRASES[o.motion]}."
        )
    for a, b in zip(scene.objects, scene.objects[1:]):
        sentences.append(f"The {a.colour} {a.shape} starts {_relation(a, b)} the {b.colour} {b.shape}.")
    sentences.append(f"The background is {scene.background}.")
    return " ".join(sentences)


def attributes(scene: Scene) -> list[dict[str, str]]:
    """Per-object ground-truth attributes: [{"shape", "colour", "size", "motion"}]."""
    return [{"shape": o.shape, "colour": o.colour, "size": o.size, "motion": o.motion} for o in scene.objects]


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def make_samples(num: int, seed: int, world: WorldConfig, split: str = "train") -> list[Sample]:
    """`num` samples of one split. Sample i depends only on (seed, split, i), so ids and content
    are stable: the first k samples are the same whatever `num` is."""
    check_world(world)
    if split not in SPLITS:
        raise ShapesWorldError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if num < 0:
        raise ShapesWorldError(f"number of samples must be >= 0, got {num}")
    split_index = SPLITS.index(split)
    samples = []
    for i in range(num):
        rng = np.random.default_rng([seed, split_index, i])
        scene = sample_scene(rng, world, split)
        samples.append(Sample(id=f"{split}-s{seed}-{i:06d}", scene=scene, prompt=prompt_text(scene),
                              caption=caption_text(scene), split=split))
    return samples


def split_counts(num: int, splits: dict[str, float]) -> dict[str, int]:
    """Turn split fractions into counts that sum to `num` (largest remainders get the extras)."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ShapesWorldError(f"unknown split {unknown[0]!r} (known: {', '.join(SPLITS)})")
    if any(f < 0 for f in splits.values()) or not math.isclose(sum(splits.values()), 1.0, abs_tol=1e-6):
        raise ShapesWorldError(f"split fractions must be >= 0 and sum to 1, got {splits}")
    raw = {s: num * f for s, f in splits.items()}
    counts = {s: int(math.floor(v)) for s, v in raw.items()}
    for s in sorted(raw, key=lambda s: raw[s] - counts[s], reverse=True)[: num - sum(counts.values())]:
        counts[s] += 1
    return counts


def default_splits(world: WorldConfig) -> dict[str, float]:
    if world.holdout_fraction > 0:
        return {"train": 0.7, "val": 0.1, "test": 0.1, "heldout": 0.1}
    return {"train": 0.8, "val": 0.1, "test": 0.1}


def manifest_record(sample: Sample, video: str, world: WorldConfig) -> dict:
    """One JSONL manifest line for a sample whose video lives at the relative path `video`."""
    return {
        "id": sample.id,
        "video": video,
        "prompt": sample.prompt,
        "caption": sample.caption,
        "objects": attributes(sample.scene),
        "split": sample.split,
        "num_frames": world.frames,
        "width": world.width,
        "height": world.height,
    }


def synthesize(out_dir, num: int, seed: int, world: WorldConfig, splits: dict[str, float] | None = None,
               progress: bool = True) -> Path:
    """Write a ShapesWorld data set: `videos/<split>/<id>.mp4`, `<split>.jsonl` manifests and
    `world.json` (the world config). `splits` maps split names to fractions of `num`
    (default 80/10/10 train/val/test, or 70/10/10/10 with a heldout split when holdout_fraction > 0).
    """
    from univigu.data.video_io import write_video  # PyAV only when writing

    check_world(world)
    splits = default_splits(world) if splits is None else dict(splits)
    if splits.get("heldout", 0) > 0 and world.holdout_fraction <= 0:
        raise ShapesWorldError("a heldout split needs world.holdout_fraction > 0")
    counts = split_counts(num, splits)
    given, out_dir = Path(out_dir), Path(out_dir).resolve()
    check_output_folder(out_dir)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(counts.values()), desc="ShapesWorld", unit="video")
    # The whole set is written into a temporary folder and renamed into place: a re-run replaces
    # the previous set entirely (no orphan videos of a larger one), and a failed one leaves it.
    try:
        with atomic_directory(out_dir) as tmp:
            atomic_write_text(tmp / "world.json", json.dumps(dataclasses.asdict(world), indent=2) + "\n")
            for split, count in counts.items():
                (tmp / "videos" / split).mkdir(parents=True, exist_ok=True)
                lines = []
                for sample in make_samples(count, seed, world, split):
                    rel = f"videos/{split}/{sample.id}.mp4"
                    write_video(tmp / rel, render(sample.scene, world), fps=world.fps)
                    lines.append(json.dumps(manifest_record(sample, rel, world)) + "\n")
                    if bar is not None:
                        bar.update(1)
                atomic_write_text(tmp / f"{split}.jsonl", "".join(lines))
    finally:
        if bar is not None:
            bar.close()
    return given


def check_output_folder(out_dir: Path) -> None:
    """`data synth` writes a new folder or replaces an earlier ShapesWorld set (one with
    world.json); it never replaces a file or a folder of other data."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ShapesWorldError(f"--out {out_dir} is a file; give a folder to write the data set into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "world.json").is_file():
        raise ShapesWorldError(f"--out {out_dir} is a folder of other files (no world.json from an earlier "
                               "`univigu data synth`); give a new or empty folder")
    others = sorted(p.name for p in out_dir.iterdir() if not (p.name in ("world.json", "videos")
                                                             or p.suffix == ".jsonl")) if out_dir.is_dir() else []
    if others:
        raise ShapesWorldError(f"--out {out_dir} holds files that are not part of a ShapesWorld set "
                               f"({', '.join(others[:3])}); replacing the set would delete them: give another folder")
