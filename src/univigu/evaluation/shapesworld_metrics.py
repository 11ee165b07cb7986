"""ShapesWorld metrics with exact ground truth, for both directions and for joint generation.

* understanding (V2T, `v2t.*`): attributes parsed from the generated caption vs the video's truth;
* generation (T2V, `t2v.*`): the pixel oracle's reading of the generated video vs the prompt's attributes;
* joint (T2VT, `joint.*`): a sample counts when the prompt, the oracle's reading of the generated
  video and the generated caption all agree.

Objects are matched with the oracle's Hungarian matching (`univigu.data.oracle.match_objects`), so
object order never matters. Per attribute the rate is over true objects (colour, shape, size,
motion); `all_correct` is over samples: the right number of objects and every attribute of every
object right. Every rate comes with a 95% Wilson score interval (`<name>_ci95` = [lo, hi]).
Results are flat dicts with plain names (`t2v.colour`, `t2v.all_correct_ci95`, `n`) so scripts can
read them; splits (iid test / held-out) are scored separately by calling these per split.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from univigu.config import WorldConfig
from univigu.data.oracle import ATTRIBUTES, match_objects, parse_text, read_video_attributes

__all__ = [
    "ATTRIBUTES",
    "ShapesWorldMetricError",
    "attribute_metrics",
    "generation_metrics",
    "joint_attribute_metrics",
    "joint_metrics",
    "understanding_metrics",
    "wilson_interval",
]

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


class ShapesWorldMetricError(ValueError):
    """Inputs to a ShapesWorld metric are empty or do not line up."""


def wilson_interval(successes: int, total: int, z: float = Z_95) -> list[float]:
    """Wilson score interval for a binomial proportion: [lo, hi] (well behaved near 0% and 100%,
    unlike the normal approximation). For total == 0 the whole range [0, 1]."""
    if total <= 0:
        return [0.0, 1.0]
    if not 0 <= successes <= total:
        raise ShapesWorldMetricError(f"successes must be in [0, {total}], got {successes}")
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _put_rate(out: dict, name: str, successes: int, total: int) -> None:
    out[name] = successes / total if total else None
    out[f"{name}_ci95"] = wilson_interval(successes, total)


def _check_lengths(what: str, *lists: Sequence) -> int:
    sizes = {len(x) for x in lists}
    if len(sizes) != 1:
        raise ShapesWorldMetricError(f"{what}: inputs have different lengths {[len(x) for x in lists]}")
    n = sizes.pop()
    if n == 0:
        raise ShapesWorldMetricError(f"{what}: nothing to score, the prediction list is empty")
    return n


def _object_correctness(pred: list[dict], truth: list[dict]) -> list[dict[str, bool]]:
    """Per true object (in truth order), which attributes the matched prediction gets right.

    Same rule as `oracle.score_sample`: an unmatched true object is wrong on every attribute, a
    prediction's None never counts as right."""
    correct = [dict.fromkeys(ATTRIBUTES, False) for _ in truth]
    for i, j in match_objects(pred, truth):
        if i is None or j is None:
            continue
        for key in ATTRIBUTES:
            value = pred[i].get(key)
            correct[j][key] = value is not None and value == truth[j].get(key)
    return correct


def _sample_all_correct(pred: list[dict], correct: list[dict[str, bool]]) -> bool:
    return len(pred) == len(correct) and all(all(obj.values()) for obj in correct)


def attribute_metrics(preds: Sequence[list[dict]], truths: Sequence[list[dict]], prefix: str) -> dict:
    """Per-attribute accuracy over true objects, count and all-correct rates over samples, with CIs.

    Returns {"n", f"{prefix}.n_objects", f"{prefix}.{attr}" (+ "_ci95") for colour/shape/size/motion,
    f"{prefix}.count_correct", f"{prefix}.all_correct"} (+ "_ci95" each)."""
    n = _check_lengths(f"{prefix} metrics", preds, truths)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    num_objects = count_ok = all_ok = 0
    for pred, truth in zip(preds, truths):
        correct = _object_correctness(pred, truth)
        for obj in correct:
            for key in ATTRIBUTES:
                hits[key] += obj[key]
        num_objects += len(truth)
        count_ok += len(pred) == len(truth)
        all_ok += _sample_all_correct(pred, correct)
    out: dict[str, Any] = {"n": n, f"{prefix}.n_objects": num_objects}
    for key in ("colour", "shape", "size", "motion"):
        _put_rate(out, f"{prefix}.{key}", hits[key], num_objects)
    _put_rate(out, f"{prefix}.count_correct", count_ok, n)
    _put_rate(out, f"{prefix}.all_correct", all_ok, n)
    return out


def joint_attribute_metrics(readings: Sequence[list[dict]], parsed: Sequence[list[dict]],
                            truths: Sequence[list[dict]], prefix: str = "joint") -> dict:
    """Joint agreement of prompt (`truths`), video reading and caption parse.

    An attribute of a prompt object counts when both the video and the caption get it right; a
    sample is all-correct when both are all-correct against the prompt. Also reported: the video
    alone (`video_all_correct`), the caption alone (`caption_all_correct`) and whether the caption
    describes the generated video, whatever the prompt (`caption_matches_video`).
    """
    n = _check_lengths(f"{prefix} metrics", readings, parsed, truths)
    hits = dict.fromkeys(ATTRIBUTES, 0)
    num_objects = all_ok = video_ok = caption_ok = consistent = 0
    for reading, caption_objs, truth in zip(readings, parsed, truths):
        by_video = _object_correctness(reading, truth)
        by_caption = _object_correctness(caption_objs, truth)
        for v, c in zip(by_video, by_caption):
            for key in ATTRIBUTES:
                hits[key] += v[key] and c[key]
        num_objects += len(truth)
        v_all = _sample_all_correct(reading, by_video)
        c_all = _sample_all_correct(caption_objs, by_caption)
        video_ok += v_all
        caption_ok += c_all
        all_ok += v_all and c_all
        consistent += _sample_all_correct(caption_objs, _object_correctness(caption_objs, reading))
    out: dict[str, Any] = {"n": n, f"{prefix}.n_objects": num_objects}
    for key in ("colour", "shape", "size", "motion"):
        _put_rate(out, f"{prefix}.{key}", hits[key], num_objects)
    _put_rate(out, f"{prefix}.all_correct", all_ok, n)
    _put_rate(out, f"{prefix}.video_all_correct", video_ok, n)
    _put_rate(out, f"{prefix}.caption_all_correct", caption_ok, n)
    _put_rate(out, f"{prefix}.caption_matches_video", consistent, n)
    return out


def _check_captions(captions: Sequence[str]) -> None:
    for i, text in enumerate(captions):
        if not isinstance(text, str):
            raise ShapesWorldMetricError(f"caption {i} must be a string, got {type(text).__name__}")


def understanding_metrics(captions: Sequence[str], truths: Sequence[list[dict]]) -> dict:
    """V2T: attributes parsed from each generated caption vs the video's ground-truth objects."""
    _check_lengths("v2t metrics", captions, truths)
    _check_captions(captions)
    return attribute_metrics([parse_text(c) for c in captions], truths, "v2t")


def generation_metrics(videos: Sequence[Any], prompts_truths: Sequence[list[dict]], world: WorldConfig) -> dict:
    """T2V: the oracle's reading of each generated video (uint8 [F, H, W, 3]) vs its prompt's objects."""
    _check_lengths("t2v metrics", videos, prompts_truths)
    return attribute_metrics([read_video_attributes(v, world) for v in videos], prompts_truths, "t2v")


def joint_metrics(prompts_truths: Sequence[list[dict]], videos: Sequence[Any], captions: Sequence[str],
                  world: WorldConfig) -> dict:
    """T2VT: prompt, oracle reading of the generated video and generated caption must all agree."""
    _check_lengths("joint metrics", prompts_truths, videos, captions)
    _check_captions(captions)
    readings = [read_video_attributes(v, world) for v in videos]
    return joint_attribute_metrics(readings, [parse_text(c) for c in captions], prompts_truths)
