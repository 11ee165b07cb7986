"""What the web demo shows and what it accepts, without Gradio.

* Videos go to the browser as VP9 in WebM (yuv420p, even sizes), upscaled with nearest-neighbour
  pixels: the lossless yuv444p H.264 files univigu writes elsewhere do not play in Chromium, and a
  32 x 32 clip is too small to see.
* Joint generation's intermediate states become a strip of frames and the text canvas with its
  still-masked positions shown as blocks.
* The ShapesWorld oracle reads each video's objects back from its pixels, shown beside it.
* Prompts and uploads are checked up front; every problem is one `InputError` whose message is
  meant for the person at the page (no server paths, no tracebacks).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import av
import numpy as np

from ..config import WorldConfig
from ..data.oracle import OracleError, parse_text, read_video_attributes, score_sample
from ..data.video_io import VideoError, probe_video

DISPLAY_SIZE = 256  # the short side of a displayed video, in pixels
STRIP_SIZE = 96  # the side of one frame in a strip of intermediate frames
MASK_GLYPH = "\u2592"  # a still-masked text position
PROMPT_MAX_CHARS = 400


class InputError(ValueError):
    """Input the page cannot take; the message is shown to the user as it is."""


# --------------------------------------------------------------------------------------------
# Videos and images for the browser
# --------------------------------------------------------------------------------------------


def upscale(frames: np.ndarray, target: int = DISPLAY_SIZE) -> np.ndarray:
    """uint8 [F, H, W, 3] -> nearest-neighbour upscaled by the integer factor that brings the
    short side to at least `target`, then padded (edge pixels) to even width and height."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    factor = max(1, math.ceil(target / min(frames.shape[1:3])))
    big = frames.repeat(factor, axis=1).repeat(factor, axis=2)
    pad_h, pad_w = big.shape[1] % 2, big.shape[2] % 2
    if pad_h or pad_w:
        big = np.pad(big, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return big


def write_display_video(path: str | Path, frames: np.ndarray, fps: float, target: int = DISPLAY_SIZE) -> Path:
    """Write frames as a VP9 WebM Chromium plays (yuv420p, upscaled, even size); returns the path."""
    path = Path(path)
    big = upscale(frames, target)
    height, width = big.shape[1:3]
    with av.open(str(path), mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # Constant quality, fast: the frames are flat colours, so crf 15 looks lossless.
        stream.options = {"crf": "15", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
        for frame in big:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_strip(frames: np.ndarray, size: int = STRIP_SIZE, gap: int = 2) -> np.ndarray:
    """Frames side by side, each upscaled to about `size` pixels, `gap` grey pixels apart."""
    big = upscale(frames, size)
    f, h, w, _ = big.shape
    strip = np.full((h, f * w + (f - 1) * gap, 3), 128, dtype=np.uint8)
    for i, frame in enumerate(big):
        strip[:, i * (w + gap):i * (w + gap) + w] = frame
    return strip


def stack_rows(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Images of one width stacked top to bottom, `gap` white pixels apart."""
    width = max(r.shape[1] for r in rows)
    out = []
    for i, row in enumerate(rows):
        if row.shape[1] < width:
            row = np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
        out.append(row)
        if i < len(rows) - 1:
            out.append(np.full((gap, width, 3), 255, dtype=np.uint8))
    return np.concatenate(out)


def render_canvas(tokenizer, row: Sequence[int]) -> str:
    """A text canvas as it stands mid-sampling: decoded words, with a block per masked position.
    Decoding stops at an EOS with no masked position after it (the text's end is settled)."""
    row = [int(i) for i in row]
    mask_id = tokenizer.mask_id
    parts: list[str] = []
    run: list[int] = []

    def flush():
        if run:
            text = tokenizer.decode([run])[0]
            if text:
                parts.append(text)
            run.clear()

    for n, i in enumerate(row):
        if i == mask_id:
            flush()
            parts.append(MASK_GLYPH)
        elif i == tokenizer.eos_id:
            flush()
            if mask_id not in row[n + 1:]:
                break
        else:
            run.append(i)
    flush()
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# The oracle's reading
# --------------------------------------------------------------------------------------------


def describe_objects(objects: Sequence[dict]) -> str:
    """[{"shape", "colour", "size", "motion"}] -> "a small red star that moves up"."""
    if not objects:
        return "no object"
    words = []
    for obj in objects:
        noun = " ".join(v for v in (obj.get("size"), obj.get("colour"), obj.get("shape")) if v) or "object"
        motion = obj.get("motion")
        words.append(f"{noun} ({'still' if motion == 'still' else 'moving ' + motion})" if motion else noun)
    return "; ".join(words)


def read_objects(frames, world: WorldConfig) -> list[dict] | str:
    """The oracle's objects in a video, or a sentence saying why it cannot read it."""
    try:
        return read_video_attributes(frames, world)
    except (OracleError, ValueError) as err:
        return f"cannot read this video ({err})"


def oracle_reading(frames, world: WorldConfig, texts: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown: what the ShapesWorld oracle reads in the video and, for each (label, text) in
    `texts`, how many of the text's attributes the video shows."""
    objects = read_objects(frames, world)
    if isinstance(objects, str):
        return f"**Oracle:** {objects}."
    lines = [f"**Oracle reads the video as:** {describe_objects(objects)}."]
    for label, text in texts:
        truth = parse_text(text) if text else []
        if not truth:
            lines.append(f"{label.capitalize()} names no object the oracle knows.")
            continue
        score = score_sample(objects, truth)
        right = sum(score[k] for k in ("shape", "colour", "size", "motion"))  # per attribute: share of objects
        verdict = "all correct" if score["all_correct"] else f"{right:.3g} of 4 attributes shown"
        lines.append(f"Against {label} ({describe_objects(truth)}): **{verdict}**.")
    return "  \n".join(lines)


# --------------------------------------------------------------------------------------------
# Checks on input
# --------------------------------------------------------------------------------------------


def check_prompt(prompt, tokenizer=None, text_length: int | None = None, max_chars: int = PROMPT_MAX_CHARS) -> str:
    """The prompt, stripped; InputError when it is empty, too long, or (for a model with a text
    stream) not something its tokenizer can write on the canvas."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty: describe the video to generate, e.g. "
                         "\"a small red circle moves to the left\".")
    prompt = prompt.strip()
    if len(prompt) > max_chars:
        raise InputError(f"The prompt is {len(prompt)} characters long; this demo takes at most {max_chars}.")
    if tokenizer is not None:
        try:
            ids = tokenizer.tokenize(prompt)
        except ValueError as err:
            raise InputError(f"The model's tokenizer cannot take this prompt: {err}") from None
        unk = tokenizer.tokens.get("unk")
        unk_id = tokenizer.tokenizer.token_to_id(unk) if unk else None
        if unk_id is not None and unk_id in ids:
            words = [w for w in prompt.split() if unk_id in tokenizer.tokenize(w)]
            raise InputError(f"The model does not know the word(s) {', '.join(repr(w) for w in words[:5])}; "
                             "ShapesWorld prompts name a size, a colour, a shape and a motion.")
        room = None if text_length is None else text_length - 1 - int(bool(tokenizer.add_bos))
        if room is not None and len(ids) > room:
            raise InputError(f"The prompt needs {len(ids)} tokens but the model's text canvas holds {room}; "
                             "shorten it.")
    return prompt


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` (links resolved) lies inside `folder`."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))
    except (OSError, ValueError):
        return False


def check_upload(path, upload_dir: str | Path, max_bytes: int, max_seconds: float, max_frames: int) -> dict:
    """Probe an uploaded file: InputError unless it is a readable video inside `upload_dir`,
    at most `max_bytes` large, `max_seconds` long and `max_frames` frames. Returns its metadata."""
    if not path:
        raise InputError("Upload a video first, or pick a ShapesWorld example.")
    name = Path(path).name
    if not inside(path, upload_dir):
        raise InputError("Only videos uploaded through this page can be captioned.")
    if not Path(path).is_file():
        raise InputError(f"The upload {name!r} is gone (uploads are removed after use); upload it again.")
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise InputError(f"{name!r} is {size / 2**20:.1f} MB; this demo takes videos up to "
                         f"{max_bytes / 2**20:.0f} MB.")
    try:
        info = probe_video(path)
    except VideoError as err:
        reason = str(err).replace(str(path), name).replace(str(Path(path).resolve()), name)
        raise InputError(f"{name!r} is not a video this demo can read: {reason}") from None
    if info["duration"] > max_seconds or info["num_frames"] > max_frames:
        raise InputError(f"{name!r} is too long ({info['duration']:.1f} s, {info['num_frames']} frames); "
                         f"this demo takes up to {max_seconds:g} s and {max_frames} frames.")
    return info


def remove_upload(path, upload_dir: str | Path) -> None:
    """Delete an uploaded file (and its folder, when that empties) if it lies in `upload_dir`."""
    if not path or not inside(path, upload_dir):
        return
    path = Path(path)
    try:
        path.unlink(missing_ok=True)
        parent = path.parent
        if parent.resolve() != Path(upload_dir).resolve() and not any(parent.iterdir()):
            parent.rmdir()
    except OSError:
        pass
