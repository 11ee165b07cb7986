"""The ShapesWorld oracle: attributes read back from pixels and from text, and scoring.

* `read_video_attributes` reads shape, colour, size and motion of every object from a video of
  this world (rendered, decoded from mp4, or generated). Each pixel is explained as
  `background + alpha * (palette colour - background)`, which separates objects by colour and
  gives a soft (anti-aliasing aware) mask; motion comes from the centroid trajectory, shape and size
  from matching the mask against templates rendered by ShapesWorld itself.
* `parse_text` extracts the same attributes from prompts and detailed captions.
* `match_objects` / `score_sample` / `score_many` compare two attribute lists with Hungarian
  matching and report per-attribute accuracy and all-correct.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from univigu.config import WorldConfig
from univigu.data import shapesworld as sw

ATTRIBUTES = ("shape", "colour", "size", "motion")

# A pixel belongs to an object when at least this much of it is explained by a palette colour;
# 0.3 sits far above noise (alpha noise std ~0.04 for 10/255 pixel noise) and below edge pixels
# worth counting.
ALPHA_THRESHOLD = 0.3
# A colour is an object when its median per-frame area reaches this share of the smallest template.
MIN_AREA_SHARE = 0.4
# Frames used for template matching (evenly spaced); more frames buy little.
TEMPLATE_FRAMES = 5


class OracleError(ValueError):
    """The input is not a video the oracle can read."""


# --------------------------------------------------------------------------------------------
# Pixels -> attributes
# --------------------------------------------------------------------------------------------


def _as_frames(frames: Any) -> np.ndarray:
    """uint8 [F, H, W, 3] (numpy or torch) or float [3, F, H, W] in [-1, 1] -> float [F, H, W, 3] 0..255."""
    if not isinstance(frames, np.ndarray):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            torch = None
        if torch is not None and isinstance(frames, torch.Tensor):
            frames = frames.detach().to("cpu")
            frames = frames.float().numpy() if frames.is_floating_point() else frames.numpy()
        else:
            raise OracleError(f"expected a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.ndim != 4:
        raise OracleError(f"expected a 4-D video (uint8 [F, H, W, 3] or float [3, F, H, W]), got shape {frames.shape}")
    if np.issubdtype(frames.dtype, np.floating):
        if frames.shape[0] != 3:
            raise OracleError(f"a float video must be [3, F, H, W] in [-1, 1], got shape {frames.shape}")
        return (np.clip(frames.astype(np.float64), -1.0, 1.0) + 1.0).transpose(1, 2, 3, 0) * 127.5
    if frames.shape[-1] != 3:
        raise OracleError(f"a uint8 video must be [F, H, W, 3], got shape {frames.shape}")
    return frames.astype(np.float64)


def _palette_alpha(video: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette colour that best explains it and its coverage alpha.

    Pixel offset o = video - background is modelled as alpha * d_k with d_k = colour_k - background;
    alpha is the clipped least-squares fit and the residual |o - alpha d_k|^2 picks k.
    Returns (colour index [F, H, W], alpha [F, H, W]).
    """
    palette = np.asarray(list(sw.COLOURS.values()), dtype=np.float64)  # [K, 3]
    direction = palette - background  # [K, 3]
    norm2 = (direction * direction).sum(axis=1)  # [K]
    offset = video - background  # [F, H, W, 3]
    dot = offset @ direction.T  # [F, H, W, K]
    alpha = np.clip(dot / norm2, 0.0, 1.0)
    # |o - a d|^2 = |o|^2 - 2 a <o, d> + a^2 |d|^2; |o|^2 is the same for every k.
    residual = alpha * (alpha * norm2 - 2.0 * dot)
    best = residual.argmin(axis=-1)
    return best, np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]


# Templates are rendered at centres rounded to 1/8 px and cached (the error is far below a pixel).
_SUBPIXEL = 8


@lru_cache(maxsize=4096)
def _template(shape: str, radius: float, fx: float, fy: float) -> tuple[int, np.ndarray]:
    """Coverage of a shape centred at (pad + fx, pad + fy) on a free canvas: (pad, patch, r0, c0)."""
    pad = int(math.ceil(2 * radius)) + 2
    r0, c0, patch = sw.coverage(shape, pad + fx, pad + fy, radius, 2 * pad + 2, 2 * pad + 2)
    return pad, patch, r0, c0


def _soft_iou(mask: np.ndarray, mask_area: float, shape: str, cx: float, cy: float, radius: float) -> float:
    """Soft IoU sum(min)/sum(max) between a soft mask [H, W] and a template centred at (cx, cy).

    Only the template's bounding box is touched: sum(max) = sum(mask) + sum(template) - sum(min).
    """
    h, w = mask.shape
    ix, iy = math.floor(cx), math.floor(cy)
    pad, patch, r0, c0 = _template(shape, radius, round((cx - ix) * _SUBPIXEL) / _SUBPIXEL,
                                   round((cy - iy) * _SUBPIXEL) / _SUBPIXEL)
    top, left = r0 + iy - pad, c0 + ix - pad  # where the patch lands in the frame
    rows = slice(max(top, 0), min(top + patch.shape[0], h))
    cols = slice(max(left, 0), min(left + patch.shape[1], w))
    inside = patch[rows.start - top:rows.stop - top, cols.start - left:cols.stop - left]
    inter = np.minimum(mask[rows, cols], inside).sum() if inside.size else 0.0
    union = mask_area + patch.sum() - inter
    return float(inter / union) if union > 0 else 0.0


def read_video_attributes(frames: Any, world: WorldConfig) -> list[dict[str, str]]:
    """The pixel oracle: [{"shape", "colour", "size", "motion"}] for every object in the video.

    Accepts uint8 [F, H, W, 3] (numpy or torch) or a float tensor/array [3, F, H, W] in [-1, 1]
    (what generators output). Geometry follows the video's own height and width; `world` gives the
    rest. Objects are told apart by colour, so two objects of one colour read as one.
    """
    video = _as_frames(frames)
    num_frames, height, width, _ = video.shape
    if num_frames < 2:
        raise OracleError(f"the oracle needs at least 2 frames to read motion, got {num_frames}")
    world = dataclasses.replace(world, width=width, height=height, frames=num_frames)
    background = np.median(video.reshape(-1, 3), axis=0)
    colour_index, alpha = _palette_alpha(video, background)
    alpha = np.where(alpha >= ALPHA_THRESHOLD, alpha, 0.0)

    smallest = min(
        sw.coverage(shape, width / 2, height / 2, sw.object_radius("small", world), height, width)[2].sum()
        for shape in sw.SHAPES
    )
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    tx, ty = sw.travel(world)
    t = np.linspace(0.0, 1.0, num_frames)
    template_frames = np.unique(np.linspace(0, num_frames - 1, min(TEMPLATE_FRAMES, num_frames)).round().astype(int))

    objects = []
    for k, colour in enumerate(sw.COLOURS):
        mask = np.where(colour_index == k, alpha, 0.0)  # [F, H, W]
        area = mask.sum(axis=(1, 2))
        if np.median(area) < MIN_AREA_SHARE * smallest:
            continue
        seen = area > 0.25 * np.median(area)  # frames where the object is really there
        cx = (mask * xs).sum(axis=(1, 2)) / np.maximum(area, 1e-9)
        cy = (mask * ys).sum(axis=(1, 2)) / np.maximum(area, 1e-9)
        # Least-squares line through the centroids; its slope is the displacement over the clip.
        dx = np.polyfit(t[seen], cx[seen], 1)[0] if seen.sum() >= 2 else 0.0
        dy = np.polyfit(t[seen], cy[seen], 1)[0] if seen.sum() >= 2 else 0.0
        motion = min(sw.MOTIONS, key=lambda m: (dx / tx - sw.MOTION_VECTORS[m][0]) ** 2
                     + (dy / ty - sw.MOTION_VECTORS[m][1]) ** 2)

        frames_used = [f for f in template_frames if seen[f]] or [int(np.argmax(area))]
        scores = {
            (shape, size): np.mean([
                _soft_iou(mask[f], area[f], shape, cx[f], cy[f], sw.object_radius(size, world)) for f in frames_used
            ])
            for shape in sw.SHAPES for size in sw.SIZES
        }
        shape, size = max(scores, key=scores.get)
        objects.append({"shape": shape, "colour": colour, "size": size, "motion": motion})
    return objects


# --------------------------------------------------------------------------------------------
# Text -> attributes
# --------------------------------------------------------------------------------------------

_SHAPE_WORDS = {s: s for s in sw.SHAPES} | {
    "circles": "circle", "disc": "circle", "disk": "circle", "squares": "square",
    "triangles": "triangle", "stars": "star", "object": None, "shape": None, "thing": None,
}
_SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "little": "small", "tiny": "small"}
_COLOUR_WORDS = {c: c for c in sw.COLOURS}
_REFERENCE_WORDS = {"the", "this", "that", "other"}
_STILL_WORDS = {"still", "stationary", "static", "motionless", "stays", "remains", "stopped"}
_DIRECTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left",
    "right": "right", "rightward": "right", "rightwards": "right",
    "up": "up", "upward": "up", "upwards": "up", "rises": "up",
    "down": "down", "downward": "down", "downwards": "down", "falls": "down",
}
# Start-position phrases ("starts at the top left") name places, not directions.
_POSITION = re.compile(
    r"\b(?:(?:starts?|starting|begins?|beginning|is|located|positioned|placed)\s+)?(?:at|in|on|from|near)\s+the\s+"
    r"(?:(?:top|bottom|upper|lower|centre|center|middle)\s+)?(?:top|bottom|left|right|centre|center|middle)\b"
)


# Spatial relations ("to the left of the blue square") name places too.
_RELATION = re.compile(r"\b(?:to\s+the\s+|on\s+the\s+)?(?:left|right)\s+of\b")


def _motion_from(words: list[str]) -> str | None:
    """Motion named by the words that follow an object mention (None when none is named)."""
    text = _RELATION.sub(" ", _POSITION.sub(" ", " ".join(words)))
    tokens = text.split()
    if any(w in _STILL_WORDS for w in tokens) or "not move" in text or "does not" in text:
        return "still"
    found = {_DIRECTION_WORDS[w] for w in tokens if w in _DIRECTION_WORDS}
    if not found:
        return None
    vertical = [d for d in ("up", "down") if d in found]
    horizontal = [d for d in ("left", "right") if d in found]
    if len(vertical) > 1 or len(horizontal) > 1:
        return None  # contradictory
    return "-".join(vertical + horizontal)


def parse_text(text: str) -> list[dict[str, str | None]]:
    """Objects' attributes named in a prompt or caption of ShapesWorld's grammar.

    A new object is a noun phrase like "a small red circle" (sizes and colours before a shape
    word); phrases starting with "the" refer back to an object already named and are skipped.
    Its motion is read from the words after it, up to the next object or the end of the sentence.
    Missing attributes are None.
    """
    if not isinstance(text, str):
        raise OracleError(f"parse_text expects a string, got {type(text).__name__}")
    objects: list[dict[str, str | None]] = []
    for sentence in re.split(r"[.;!?\n]+", text.lower()):
        words = re.findall(r"[a-z]+", sentence)  # hyphens split: "up-right" -> up, right
        mentions = []  # (start, end, is_new, attrs)
        for i, word in enumerate(words):
            if word not in _SHAPE_WORDS:
                continue
            start = i
            while start > 0 and (words[start - 1] in _SIZE_WORDS or words[start - 1] in _COLOUR_WORDS):
                start -= 1
            adjectives = words[start:i]
            is_new = not (start > 0 and words[start - 1] in _REFERENCE_WORDS)
            attrs = {
                "shape": _SHAPE_WORDS[word],
                "colour": next((_COLOUR_WORDS[w] for w in adjectives if w in _COLOUR_WORDS), None),
                "size": next((_SIZE_WORDS[w] for w in adjectives if w in _SIZE_WORDS), None),
            }
            if attrs["shape"] is None and not adjectives:
                continue  # a bare "object" / "shape" is not a mention
            mentions.append((start - (1 if start > 0 else 0), i + 1, is_new, attrs))
        for n, (_, end, is_new, attrs) in enumerate(mentions):
            stop = mentions[n + 1][0] if n + 1 < len(mentions) else len(words)
            motion = _motion_from(words[end:stop])
            earlier = None if is_new else _referent(objects, attrs)
            if earlier is None:  # a new object, or "the ..." naming one not seen before
                objects.append({**attrs, "motion": motion})
            elif earlier["motion"] is None:  # "A red circle ... The circle moves left."
                earlier["motion"] = motion
    return objects


def _referent(objects: list[dict], attrs: dict) -> dict | None:
    """The last object already named that a "the ..." phrase with these attributes refers to."""
    for obj in reversed(objects):
        if all(attrs[k] is None or obj[k] is None or attrs[k] == obj[k] for k in ("shape", "colour", "size")):
            return obj
    return None


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _agreement(a: dict, b: dict) -> int:
    return sum(a.get(k) is not None and a.get(k) == b.get(k) for k in ATTRIBUTES)


def match_objects(pred: list[dict], truth: list[dict]) -> list[tuple[int | None, int | None]]:
    """Hungarian matching of predicted to true objects maximising agreeing attributes.

    Returns (pred index, truth index) pairs: matched pairs in truth order, then unmatched truth
    objects as (None, j), then unmatched predictions as (i, None).
    """
    pairs: list[tuple[int | None, int | None]] = []
    matched_pred: set[int] = set()
    matched_truth: set[int] = set()
    if pred and truth:
        agreement = np.array([[_agreement(p, t) for t in truth] for p in pred], dtype=np.float64)
        rows, cols = linear_sum_assignment(agreement, maximize=True)
        for i, j in sorted(zip(rows.tolist(), cols.tolist()), key=lambda ij: ij[1]):
            pairs.append((i, j))
            matched_pred.add(i)
            matched_truth.add(j)
    pairs += [(None, j) for j in range(len(truth)) if j not in matched_truth]
    pairs += [(i, None) for i in range(len(pred)) if i not in matched_pred]
    return pairs


def _correct_counts(pred: list[dict], truth: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(ATTRIBUTES, 0)
    for i, j in match_objects(pred, truth):
        if i is None or j is None:
            continue
        for k in ATTRIBUTES:
            counts[k] += pred[i].get(k) is not None and pred[i].get(k) == truth[j].get(k)
    return counts


def score_sample(pred: list[dict], truth: list[dict]) -> dict:
    """Per-attribute fraction of true objects read correctly (unmatched = wrong), `count_correct`,
    and `all_correct`: same object count and every attribute of every object right."""
    counts = _correct_counts(pred, truth)
    n = len(truth)
    out: dict[str, Any] = {k: (counts[k] / n if n else float(not pred)) for k in ATTRIBUTES}
    out["count_correct"] = len(pred) == n
    out["all_correct"] = len(pred) == n and all(counts[k] == n for k in ATTRIBUTES)
    return out


def score_many(preds: list[list[dict]], truths: list[list[dict]]) -> dict:
    """Accuracy per attribute over all true objects, and rates of right counts and all-correct samples."""
    if len(preds) != len(truths):
        raise OracleError(f"score_many got {len(preds)} predictions for {len(truths)} ground truths")
    totals = dict.fromkeys(ATTRIBUTES, 0)
    num_objects = all_correct = count_correct = 0
    for pred, truth in zip(preds, truths):
        counts = _correct_counts(pred, truth)
        for k in ATTRIBUTES:
            totals[k] += counts[k]
        num_objects += len(truth)
        count_correct += len(pred) == len(truth)
        all_correct += len(pred) == len(truth) and all(counts[k] == len(truth) for k in ATTRIBUTES)
    num = max(len(truths), 1)
    out: dict[str, Any] = {k: totals[k] / max(num_objects, 1) for k in ATTRIBUTES}
    out["count_correct"] = count_correct / num
    out["all_correct"] = all_correct / num
    out["num_samples"] = len(truths)
    out["num_objects"] = num_objects
    return out
