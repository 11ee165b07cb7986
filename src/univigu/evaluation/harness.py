"""The evaluation harness: run T2V, V2T and joint generation on manifest samples, score them and
write a report.

The model is reached through a small callable interface, `Evaluatee` (generate / caption / joint),
so anything from the full pipeline (`PipelineEvaluatee`) to a plain function can be evaluated.
`evaluate` runs the tasks in batches, scores every split of the samples separately (iid `test`
and `heldout` combinations are never mixed), and writes `metrics.json`, `samples.jsonl`
(per-sample outputs and verdicts) and a static `report.html` into the output folder. `univigu
eval` and `univigu demo` only parse their arguments and call it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from univigu.atomic import atomic_write_text, read_json
from univigu.config import TASKS, ConfigError, WorldConfig, from_dict

# Manifest fields each task needs; "objects" is the ground truth ShapesWorld writes.
REQUIRED_FIELDS = {"t2v": ("prompt", "objects"), "v2t": ("video", "objects"), "joint": ("prompt", "objects")}


class EvalError(ValueError):
    """Bad input to an evaluation: missing model directory, malformed samples, bad model outputs."""


@runtime_checkable
class Evaluatee(Protocol):
    """What `evaluate` needs from a model. Videos are uint8 numpy arrays [F, H, W, 3]."""

    def generate(self, prompts: list[str], seed: int) -> list[np.ndarray]:
        """Text -> video, one video per prompt."""

    def caption(self, videos: list[np.ndarray]) -> list[str]:
        """Video -> text, one caption per video."""

    def joint(self, prompts: list[str], seed: int) -> tuple[list[np.ndarray], list[str]]:
        """Prompt -> (videos, captions) generated together."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def parse_tasks(text: str | Sequence[str]) -> tuple[str, ...]:
    """'t2v,joint' (or a list) -> ('t2v', 'joint'), in canonical order; unknown names fail."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown task '{unknown[0]}' (known tasks: {', '.join(TASKS)})")
    if not names:
        raise EvalError(f"no tasks given (known tasks: {', '.join(TASKS)})")
    return tuple(t for t in TASKS if t in names)


def required_fields(tasks: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f for t in tasks for f in REQUIRED_FIELDS[t]))


def check_samples(samples: Sequence[dict], tasks: Sequence[str]) -> None:
    """Every sample must hold the fields its tasks need, with ground-truth objects as a list."""
    if not samples:
        raise EvalError("no samples to evaluate: the sample list is empty")
    for index, sample in enumerate(samples):
        where = f"sample {index}" + (f" ({sample['id']})" if isinstance(sample, dict) and "id" in sample else "")
        if not isinstance(sample, dict):
            raise EvalError(f"{where} must be a dict (a manifest record), got {type(sample).__name__}")
        for name in required_fields(tasks):
            if name not in sample:
                raise EvalError(f"{where} is missing field '{name}' (tasks {','.join(tasks)} need "
                                f"{', '.join(required_fields(tasks))})")
        if not isinstance(sample["objects"], list) or not all(isinstance(o, dict) for o in sample["objects"]):
            raise EvalError(f"{where}: field 'objects' must be a list of attribute dicts")
        if "prompt" in sample and (not isinstance(sample["prompt"], str) or not sample["prompt"].strip()):
            raise EvalError(f"{where}: field 'prompt' must be a non-empty string")


def load_samples(manifests: Sequence[str | Path], tasks: Sequence[str], num: int | None = None) -> list[dict]:
    """Read manifests (relative video paths resolved), check the fields `tasks` need, keep `num`
    per manifest. A record without a `split` field gets its manifest's file stem as split."""
    from univigu.data.manifest import ManifestError, read_manifest

    samples = []
    for manifest in manifests:
        try:
            records = read_manifest(manifest, required=required_fields(tasks))
        except ManifestError as err:
            raise EvalError(str(err)) from None
        if not records:
            raise EvalError(f"manifest {manifest} holds no samples")
        for record in records[:num] if num else records:
            record.setdefault("split", Path(manifest).stem)
            samples.append(record)
    check_samples(samples, tasks)
    return samples


def readable_samples(samples: Sequence[dict], tasks: Sequence[str]) -> tuple[list[dict], list[str]]:
    """The samples whose video V2T can read, and one line per sample left out (no video is read
    when V2T is not among the tasks)."""
    if "v2t" not in tasks:
        return list(samples), []
    from univigu.data.video_io import read_video

    kept, bad = [], []
    for sample in samples:
        if isinstance(sample["video"], np.ndarray):
            kept.append(sample)
            continue
        try:
            read_video(sample["video"])
        except (ValueError, OSError) as err:
            text = str(err)
            bad.append(text if str(sample["video"]) in text else f"{sample['video']}: {text}")
            continue
        kept.append(sample)
    return kept, bad


def load_world(manifests: Sequence[str | Path], samples: Sequence[dict]) -> WorldConfig:
    """The ShapesWorld config: `world.json` beside the first manifest (written by `data synth`),
    else defaults with the samples' own width/height/num_frames."""
    for manifest in manifests:
        path = Path(manifest).resolve().parent / "world.json"
        if path.is_file():
            try:
                return from_dict(WorldConfig, read_json(path, EvalError), prefix="world")
            except ConfigError as err:
                raise EvalError(f"{path} is not a valid world config: {err}") from None
    first = samples[0] if samples else {}
    world = WorldConfig()
    return WorldConfig(width=int(first.get("width", world.width)), height=int(first.get("height", world.height)),
                       frames=int(first.get("num_frames", world.frames)))


# --------------------------------------------------------------------------------------------
# Running the model
# --------------------------------------------------------------------------------------------


def _check_videos(videos: Any, expected: int, where: str) -> list[np.ndarray]:
    if not isinstance(videos, (list, tuple)) and not (hasattr(videos, "shape") and len(videos.shape) == 5):
        raise EvalError(f"{where} must return a list of videos, got {type(videos).__name__}")
    if len(videos) != expected:
        raise EvalError(f"{where} returned {len(videos)} videos for {expected} inputs")
    out = []
    for video in videos:
        if hasattr(video, "detach"):  # a torch tensor
            video = video.detach().cpu().numpy()
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise EvalError(f"{where} must return uint8 videos [F, H, W, 3], got {video.dtype} {list(video.shape)}")
        out.append(video)
    return out


def _check_captions(captions: Any, expected: int, where: str) -> list[str]:
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise EvalError(f"{where} must return a list of strings")
    if len(captions) != expected:
        raise EvalError(f"{where} returned {len(captions)} captions for {expected} inputs")
    return list(captions)


def _batches(n: int, batch_size: int):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def run_tasks(evaluatee: Evaluatee, samples: Sequence[dict], tasks: Sequence[str], seed: int = 0,
              batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Run each task over all samples in batches. Batch b uses seed `seed + index of its first sample`,
    so results do not depend on which other tasks run. Returns {"t2v_videos", "v2t_inputs",
    "v2t_captions", "joint_videos", "joint_captions"} for the tasks run."""
    from tqdm import tqdm

    from univigu.data.video_io import read_video

    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    n = len(samples)
    prompts = [s.get("prompt") for s in samples]
    out: dict[str, Any] = {}
    for task in tasks:
        bar = tqdm(_batches(n, batch_size), desc=f"eval {task}", unit="batch", disable=not progress)
        if task == "t2v":
            out["t2v_videos"] = []
            for a, b in bar:
                videos = evaluatee.generate(list(prompts[a:b]), seed + a)
                out["t2v_videos"] += _check_videos(videos, b - a, "evaluatee.generate")
        elif task == "v2t":
            out["v2t_inputs"], out["v2t_captions"] = [], []
            for a, b in bar:
                inputs = [s["video"] if isinstance(s["video"], np.ndarray) else read_video(s["video"])
                          for s in samples[a:b]]
                out["v2t_inputs"] += inputs
                out["v2t_captions"] += _check_captions(evaluatee.caption(inputs), b - a, "evaluatee.caption")
        elif task == "joint":
            out["joint_videos"], out["joint_captions"] = [], []
            for a, b in bar:
                result = evaluatee.joint(list(prompts[a:b]), seed + a)
                if not isinstance(result, (tuple, list)) or len(result) != 2:
                    raise EvalError("evaluatee.joint must return (videos, captions)")
                out["joint_videos"] += _check_videos(result[0], b - a, "evaluatee.joint")
                out["joint_captions"] += _check_captions(result[1], b - a, "evaluatee.joint")
    return out


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _split_groups(samples: Sequence[dict]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[str(sample.get("split") or "all")].append(i)
    order = {"test": 0, "heldout": 1}  # iid test first, then held-out combinations
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))


def evaluate(evaluatee: Evaluatee, samples: Sequence[dict], world: WorldConfig, tasks: Sequence[str] = TASKS,
             out_dir: str | Path | None = None, seed: int = 0, batch_size: int = 16,
             caption_backend: str = "auto", report_examples: int = 12, progress: bool = False,
             title: str = "univigu evaluation", meta: dict | None = None) -> dict:
    """Run `tasks` on `samples` (manifest records), score them per split, write the report.

    Returns `{"meta": {...}, "<split>": {flat metrics}}` with names such as `n`, `t2v.colour`,
    `t2v.all_correct`, `t2v.all_correct_ci95`, `v2t.CIDEr`, `joint.all_correct`. With `out_dir`, also
    writes metrics.json, samples.jsonl and report.html there.
    """
    from univigu.data.oracle import parse_text, read_video_attributes
    from univigu.evaluation.captions import caption_metrics
    from univigu.evaluation.shapesworld_metrics import attribute_metrics, joint_attribute_metrics

    tasks = parse_tasks(tasks)
    check_samples(samples, tasks)
    outputs = run_tasks(evaluatee, samples, tasks, seed=seed, batch_size=batch_size, progress=progress)
    truths = [s["objects"] for s in samples]

    # Per-sample readings once; splits are index subsets of them.
    per: dict[str, list] = {}
    if "t2v" in tasks:
        per["t2v_reading"] = [read_video_attributes(v, world) for v in outputs["t2v_videos"]]
    if "v2t" in tasks:
        per["v2t_parsed"] = [parse_text(c) for c in outputs["v2t_captions"]]
    if "joint" in tasks:
        per["joint_reading"] = [read_video_attributes(v, world) for v in outputs["joint_videos"]]
        per["joint_parsed"] = [parse_text(c) for c in outputs["joint_captions"]]

    metrics: dict[str, Any] = {}
    caption_info: dict = {}
    have_references = all(isinstance(s.get("caption"), str) for s in samples)
    for split, idx in _split_groups(samples).items():
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        flat: dict[str, Any] = {"n": len(idx)}
        if "t2v" in tasks:
            flat.update(attribute_metrics(pick(per["t2v_reading"]), pick(truths), "t2v"))
        if "v2t" in tasks:
            flat.update(attribute_metrics(pick(per["v2t_parsed"]), pick(truths), "v2t"))
            if have_references:
                caption_info = caption_metrics(pick(outputs["v2t_captions"]),
                                               [[samples[i]["caption"]] for i in idx], backend=caption_backend)
                for name in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"):
                    flat[f"v2t.{name}"] = caption_info[name]
        if "joint" in tasks:
            flat.update(joint_attribute_metrics(pick(per["joint_reading"]), pick(per["joint_parsed"]), pick(truths)))
        metrics[split] = flat

    info = {"tasks": ",".join(tasks), "samples": len(samples), "seed": seed,
            "world": f"{world.width}x{world.height}x{world.frames}"}
    info.update(meta or {})
    if "v2t" in tasks:
        if caption_info:
            info["caption_backend"] = caption_info["backend"]
            info["notes"] = caption_info["notes"] + ["v2t caption metrics score generated captions against "
                                                     "the manifest's detailed caption"]
            info["unavailable"] = caption_info["unavailable"]
        else:
            info["notes"] = ["v2t caption metrics skipped: not every sample has a reference 'caption'"]
    metrics = {"meta": info, **metrics}

    if out_dir is not None:
        _write_outputs(Path(out_dir), metrics, samples, tasks, outputs, per, report_examples, world, title)
    return metrics


def _sample_rows(samples, tasks, outputs, per) -> list[dict]:
    from univigu.data.oracle import score_sample

    rows = []
    for i, sample in enumerate(samples):
        row = {"id": sample.get("id", i), "split": sample.get("split"), "prompt": sample.get("prompt"),
               "objects": sample["objects"]}
        if "t2v" in tasks:
            row["t2v_reading"] = per["t2v_reading"][i]
            row["t2v_ok"] = score_sample(per["t2v_reading"][i], sample["objects"])["all_correct"]
        if "v2t" in tasks:
            row["v2t_caption"] = outputs["v2t_captions"][i]
            row["v2t_ok"] = score_sample(per["v2t_parsed"][i], sample["objects"])["all_correct"]
        if "joint" in tasks:
            row["joint_caption"] = outputs["joint_captions"][i]
            row["joint_reading"] = per["joint_reading"][i]
            row["joint_ok"] = (score_sample(per["joint_reading"][i], sample["objects"])["all_correct"]
                               and score_sample(per["joint_parsed"][i], sample["objects"])["all_correct"])
        rows.append(row)
    return rows


def _write_outputs(out_dir: Path, metrics, samples, tasks, outputs, per, k: int, world, title) -> None:
    from univigu.evaluation.report import to_jsonable, write_report

    rows = _sample_rows(samples, tasks, outputs, per)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "samples.jsonl", "".join(json.dumps(to_jsonable(row)) + "\n" for row in rows))

    # Up to k examples per task and split, so held-out samples are shown too.
    shown = [i for idx in _split_groups(samples).values() for i in idx[:k]]
    examples: dict[str, list[dict]] = {}
    if "t2v" in tasks:
        examples["t2v"] = [{"id": rows[i]["id"], "split": rows[i]["split"], "video": outputs["t2v_videos"][i],
                            "prompt": samples[i]["prompt"], "reading": per["t2v_reading"][i],
                            "ok": rows[i]["t2v_ok"]} for i in shown]
    if "v2t" in tasks:
        examples["v2t"] = [{"id": rows[i]["id"], "split": rows[i]["split"], "video": outputs["v2t_inputs"][i],
                            "caption": outputs["v2t_captions"][i], "reference": samples[i].get("caption"),
                            "ok": rows[i]["v2t_ok"]} for i in shown]
    if "joint" in tasks:
        examples["joint"] = [{"id": rows[i]["id"], "split": rows[i]["split"], "video": outputs["joint_videos"][i],
                              "prompt": samples[i]["prompt"], "caption": outputs["joint_captions"][i],
                              "reading": per["joint_reading"][i], "ok": rows[i]["joint_ok"]} for i in shown]
    write_report(out_dir, metrics, examples, title=title, fps=world.fps)


# --------------------------------------------------------------------------------------------
# Loading a model directory
# --------------------------------------------------------------------------------------------


def _to_uint8_videos(videos: Any) -> list[np.ndarray]:
    """Pipeline output -> uint8 [F, H, W, 3] list (accepts float [B, 3, F, H, W] in [-1, 1] too)."""
    if hasattr(videos, "frames"):
        videos = videos.frames
    result = []
    for video in videos:
        if hasattr(video, "detach"):
            video = video.detach().float().cpu().numpy() if video.is_floating_point() else video.cpu().numpy()
        video = np.asarray(video)
        if np.issubdtype(video.dtype, np.floating):  # [3, F, H, W] in [-1, 1]
            video = np.round((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 3, 0)
        result.append(video)
    return result


def _texts(output: Any) -> list[str]:
    for name in ("captions", "texts", "text"):
        if hasattr(output, name):
            output = getattr(output, name)
            break
    return [output] if isinstance(output, str) else list(output)


class PipelineEvaluatee:
    """Adapts `univigu.pipeline.UniViGUPipeline` to `Evaluatee` at the world's size and length;
    `candidates`: captions drawn per video for verification (None: the model's sampler.json)."""

    def __init__(self, pipeline: Any, world: WorldConfig, candidates: int | None = None):
        self.pipeline, self.world, self.candidates = pipeline, world, candidates

    def generate(self, prompts: list[str], seed: int) -> list[np.ndarray]:
        w = self.world
        return _to_uint8_videos(self.pipeline.generate(prompts, num_frames=w.frames, height=w.height,
                                                       width=w.width, seed=seed))

    def caption(self, videos: list[np.ndarray]) -> list[str]:
        import torch

        from univigu.data.video_io import frames_to_tensor

        return _texts(self.pipeline.caption(torch.stack([frames_to_tensor(v) for v in videos]),
                                            candidates=self.candidates))

    def joint(self, prompts: list[str], seed: int) -> tuple[list[np.ndarray], list[str]]:
        w = self.world
        out = self.pipeline.joint(prompts, num_frames=w.frames, height=w.height, width=w.width, seed=seed)
        return _to_uint8_videos(out), _texts(out)


def load_evaluatee(ckpt_dir: str | Path, world: WorldConfig, candidates: int | None = None) -> Evaluatee:
    """A model directory -> Evaluatee through `UniViGUPipeline.from_pretrained` (imported lazily)."""
    path = Path(ckpt_dir)
    if not path.exists():
        raise EvalError(f"model directory not found: {path}")
    if not path.is_dir():
        raise EvalError(f"--ckpt_dir must be a model directory, got a file: {path}")
    try:
        from univigu.pipeline import UniViGUPipeline
    except ImportError as err:
        raise EvalError(f"cannot load {path}: univigu.pipeline is not available ({err})") from None
    return PipelineEvaluatee(UniViGUPipeline.from_pretrained(str(path)), world, candidates)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def format_summary(metrics: dict) -> str:
    """A plain-text table of the headline figures, one block per split."""
    lines = []
    for split, flat in metrics.items():
        if split == "meta":
            continue
        lines.append(f"[{split}] n={flat['n']}")
        for name, value in flat.items():
            if name == "n" or name.endswith("_ci95") or value is None or isinstance(value, (str, list)):
                continue
            ci = flat.get(f"{name}_ci95")
            if ci is not None:
                lines.append(f"  {name:32s} {100 * value:6.1f}%  [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")
            elif isinstance(value, float):
                lines.append(f"  {name:32s} {value:7.3f}")
    return "\n".join(lines)
