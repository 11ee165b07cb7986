"""Video files <-> arrays and tensors, with PyAV.

Conventions:
* At the file boundary frames are uint8 ``[F, H, W, 3]`` (RGB).
* Models see float tensors ``[3, F, H, W]`` in ``[-1, 1]``
  (``frames_to_tensor`` / ``tensor_to_frames``).
* Every failure to read a file (missing, empty, truncated, corrupt, not a video) raises one
  ``VideoError`` whose message names the file; PyAV's own exceptions never escape.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from univigu.atomic import atomic_file


class VideoError(ValueError):
    """A video file is missing, empty, truncated or not a video, or frames are malformed."""


# Everything PyAV / FFmpeg can throw while opening, demuxing or decoding a damaged file.
_DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, UnicodeDecodeError)


# --------------------------------------------------------------------------------------------
# Opening and probing
# --------------------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"video file not found: {path}")
    if not path.is_file():
        raise VideoError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes)")


@contextmanager
def _open_video(path: Path) -> Iterator[tuple]:
    """Open `path`, yield (container, first video stream); every PyAV error becomes VideoError."""
    _check_file(path)
    try:
        container = av.open(str(path))
    except _DECODE_ERRORS as err:
        raise VideoError(f"cannot open video {path}: {_describe(err)}") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    except VideoError:
        raise
    except _DECODE_ERRORS as err:
        raise VideoError(f"cannot decode video {path}: {_describe(err)}") from None
    finally:
        container.close()


def _describe(err: BaseException) -> str:
    """One short line for an FFmpeg error (PyAV repeats the file name and errno in str(err))."""
    if isinstance(err, av.error.FFmpegError) and getattr(err, "strerror", None):
        return err.strerror
    return str(err) or type(err).__name__


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _demuxed_frames(container, stream) -> int:
    """Count the video packets that can be read (exact frame count for every common codec)."""
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode(container, stream, path: Path) -> Iterator["av.VideoFrame"]:
    """Decode every frame of `stream`, packet by packet.

    Threaded decoders drop a damaged last packet silently, so a stream that yields fewer frames
    than it has packets is reported as damaged instead of passing as a shorter video.
    """
    packets = frames = 0
    for packet in container.demux(stream):
        packets += 1 if packet.size else 0
        for frame in packet.decode():  # the final empty packet flushes the decoder
            frames += 1
            yield frame
    if frames < packets:
        raise VideoError(f"video {path} is truncated or corrupt: {packets} frames stored, "
                         f"only {frames} decode")


def probe_video(path: str | Path, decode: bool = False) -> dict:
    """Read a video's metadata: ``dict(duration, width, height, num_frames, fps, codec)``.

    The frame count comes from demuxing every packet (cheap, no decoding), not from the header,
    which is missing or wrong in many files. With ``decode=True`` every frame is decoded, which
    also catches damage inside the compressed data (the only sure check; slower).
    """
    path = Path(path)
    with _open_video(path) as (container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = _stream_fps(stream)
        codec = stream.codec_context.name
        header_frames = stream.frames
        stream_duration = (float(stream.duration * stream.time_base)
                           if stream.duration and stream.time_base else None)
        if decode:
            num_frames = sum(1 for _ in _decode(container, stream, path))
        else:
            num_frames = _demuxed_frames(container, stream)
    if num_frames == 0:
        raise VideoError(f"video {path} has no readable frames (truncated or corrupt)")
    if not decode and header_frames and num_frames < header_frames:
        raise VideoError(f"video {path} is truncated: header lists {header_frames} frames, "
                         f"only {num_frames} can be read")
    if width <= 0 or height <= 0:
        raise VideoError(f"video {path} has no frame size")
    duration = stream_duration or (num_frames / fps if fps else 0.0)
    return {"duration": duration, "width": width, "height": height,
            "num_frames": num_frames, "fps": fps, "codec": codec}


# --------------------------------------------------------------------------------------------
# Frame sampling, resizing, cropping
# --------------------------------------------------------------------------------------------


def sample_indices(total: int, num_frames: int | None = None, stride: int | None = None,
                   fps: float | None = None, source_fps: float | None = None,
                   start: int = 0) -> list[int]:
    """Frame indices to keep from a video of `total` frames.

    * `stride` k: frames start, start+k, start+2k, ...
    * `fps` f (needs `source_fps`): the frame on screen at each time start + i/f.
    * `num_frames` n alone: n frames spread evenly over the whole video (first and last included).
    * `num_frames` with `stride` or `fps`: the first n frames of that sequence (a clip);
      a video too short for it raises ValueError.
    Nothing given: every frame.
    """
    if stride is not None and fps is not None:
        raise ValueError("give either stride or fps, not both")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not 0 <= start < total:
        raise ValueError(f"start frame {start} is outside the video's {total} frames")
    available = total - start
    if stride is None and fps is None:
        if num_frames is None:
            return list(range(start, total))
        if num_frames > available:
            raise ValueError(f"needs {num_frames} frames, the video has {available}")
        if num_frames == 1:
            return [start]
        # Evenly spaced, exact rational positions so both ends are always included.
        return [start + (i * (available - 1)) // (num_frames - 1) for i in range(num_frames)]
    if stride is not None:
        step = Fraction(stride)
    else:
        if not source_fps:
            raise ValueError("sampling at a target fps needs the video's own fps")
        step = Fraction(source_fps).limit_denominator(1001) / Fraction(fps).limit_denominator(1001)
    count = math.ceil(available / step)  # every i with floor(i * step) < available
    if num_frames is not None:
        if num_frames > count:
            how = f"stride {stride}" if stride is not None else f"{fps:g} fps"
            raise ValueError(f"needs {num_frames} frames at {how}, the video has only {count} "
                             f"({available} frames at {source_fps or 0:g} fps)")
        count = num_frames
    return [start + math.floor(i * step) for i in range(count)]


def resize_center_crop(frame: np.ndarray, size: tuple[int, int],
                       resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Scale a uint8 [H, W, 3] frame to cover `size` = (W, H), then crop the centre to exactly that.

    Pillow's `box` takes the crop rectangle in source coordinates, so the crop is exactly centred
    (sub-pixel) and the output size is exact, with one resampling step.
    """
    out_w, out_h = int(size[0]), int(size[1])
    if out_w < 1 or out_h < 1:
        raise ValueError(f"target size must be positive (W, H), got {size}")
    src_h, src_w = frame.shape[:2]
    if (src_w, src_h) == (out_w, out_h):
        return frame
    target_aspect = out_w / out_h
    if src_w / src_h > target_aspect:  # too wide: keep full height
        crop_w, crop_h = src_h * target_aspect, float(src_h)
    else:  # too tall: keep full width
        crop_w, crop_h = float(src_w), src_w / target_aspect
    left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    image = Image.fromarray(frame).resize((out_w, out_h), resample=resample, box=box)
    return np.asarray(image)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def read_video(path: str | Path, num_frames: int | None = None, stride: int | None = None,
               fps: float | None = None, size: tuple[int, int] | None = None,
               start: int = 0) -> np.ndarray:
    """Decode a video file to uint8 [F, H, W, 3], optionally sampled and resized (see
    `sample_indices` and `resize_center_crop`). With no options, every frame at native size."""
    path = Path(path)
    if size is not None and (len(size) != 2 or min(int(size[0]), int(size[1])) < 1):
        raise VideoError(f"size must be a positive (W, H) pair, got {size}")
    sampling = num_frames is not None or stride is not None or fps is not None or start != 0
    wanted: dict[int, int] = {}  # frame index -> copies (indices repeat above the source fps)
    if sampling:
        # Evenly spaced sampling needs the frame count up front: demux once (no decoding).
        with _open_video(path) as (container, stream):
            source_fps = _stream_fps(stream)
            total = _demuxed_frames(container, stream)
        if total == 0:
            raise VideoError(f"video {path} has no readable frames (truncated or corrupt)")
        try:
            indices = sample_indices(total, num_frames, stride, fps, source_fps, start)
        except ValueError as err:
            raise VideoError(f"video {path}: {err}") from None
        for i in indices:
            wanted[i] = wanted.get(i, 0) + 1
        last = indices[-1]
    frames: list[np.ndarray] = []
    with _open_video(path) as (container, stream):
        for index, frame in enumerate(_decode(container, stream, path)):
            copies = wanted.get(index, 0) if sampling else 1
            if copies:
                array = frame.to_ndarray(format="rgb24")
                if size is not None:
                    array = resize_center_crop(array, size)
                frames.extend([array] * copies)
            if sampling and index >= last:
                break
    if not frames:
        raise VideoError(f"video {path} has no readable frames (truncated or corrupt)")
    if sampling and len(frames) < len(indices):
        raise VideoError(f"video {path} is truncated: decoded {len(frames)} of the "
                         f"{len(indices)} sampled frames")
    return np.stack(frames)


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (0 -> -1, 255 -> 1)."""
    frames = torch.as_tensor(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames must be shaped [F, H, W, 3], got {list(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise VideoError(f"frames must be uint8, got {frames.dtype}")
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0).contiguous()


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] (clamped, rounded; inverse of
    `frames_to_tensor` on its outputs)."""
    if not isinstance(video, torch.Tensor):
        video = torch.as_tensor(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise VideoError(f"video tensor must be shaped [3, F, H, W], got {list(video.shape)}")
    pixels = (video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5
    return pixels.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def load_video_tensor(path: str | Path, num_frames: int | None = None,
                      size: tuple[int, int] | None = None, stride: int | None = None,
                      fps: float | None = None, start: int = 0) -> torch.Tensor:
    """Decode, sample and resize a video into a float tensor [3, F, H, W] in [-1, 1].

    `size` is (W, H); the frames are scaled to cover it and centre-cropped.
    """
    return frames_to_tensor(read_video(path, num_frames=num_frames, stride=stride, fps=fps,
                                       size=size, start=start))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _check_frames(frames) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise VideoError(f"frames must be a non-empty uint8 array [F, H, W, 3], "
                         f"got shape {list(frames.shape)}")
    if frames.dtype != np.uint8:
        raise VideoError(f"frames must be uint8, got {frames.dtype} (use tensor_to_frames)")
    return frames


CONTAINER_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".m4v": "mp4", ".webm": "webm",
                     ".avi": "avi"}


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8, crf: int = 0,
                pix_fmt: str = "yuv444p") -> None:
    """Encode uint8 frames [F, H, W, 3] as H.264 mp4.

    The default (crf 0, yuv444p) is lossless up to the RGB<->YUV rounding, which keeps the
    ShapesWorld oracle exact. For files every player opens use ``crf=18, pix_fmt="yuv420p"``
    (then width and height must be even).
    """
    path = Path(path)
    frames = _check_frames(frames)
    height, width = frames.shape[1:3]
    if pix_fmt == "yuv420p" and (width % 2 or height % 2):
        raise VideoError(f"yuv420p needs even width and height, got {width}x{height} for {path}")
    container_format = CONTAINER_FORMATS.get(path.suffix.lower(), "mp4")
    with atomic_file(path) as tmp:  # a failed or killed write leaves the previous file
        with av.open(str(tmp), mode="w", format=container_format) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width, height
            stream.pix_fmt = pix_fmt
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def write_gif(path: str | Path, frames: np.ndarray, fps: float = 8, loop: int = 0) -> None:
    """Write uint8 frames [F, H, W, 3] as an animated GIF (Pillow; each frame gets its own
    256-colour palette, exact for frames with at most 256 colours). GIF stores frame delays in
    1/100 s, so the played fps is 100 / round(100 / fps). Pillow merges a frame identical to the
    previous one into it (adding its delay), so a still stretch plays right but decodes to fewer
    frames."""
    path = Path(path)
    frames = _check_frames(frames)
    if fps <= 0:
        raise VideoError(f"fps must be > 0, got {fps}")
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_file(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=1000.0 / fps, loop=loop, disposal=1)


# --------------------------------------------------------------------------------------------
# Contact sheet
# --------------------------------------------------------------------------------------------


def contact_sheet(videos: Sequence[np.ndarray], path: str | Path | None = None,
                  labels: Sequence[str] | None = None, scale: int | None = None,
                  gap: int = 2, background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """A PNG grid of videos: one row per sample, one column per frame.

    `videos` is a list of uint8 [F, H, W, 3] (frame counts and sizes may differ; cells are sized
    for the largest). `scale` enlarges pixels by an integer factor with nearest-neighbour (so tiny
    videos stay crisp); None picks the smallest factor that makes cells at least 64 px. `labels`
    (one per row) are written to the left of each row. Writes the PNG when `path` is given and
    returns the grid as uint8 [H, W, 3].
    """
    if len(videos) == 0:
        raise VideoError("contact_sheet needs at least one video")
    videos = [_check_frames(v) for v in videos]
    if labels is not None and len(labels) != len(videos):
        raise VideoError(f"got {len(labels)} labels for {len(videos)} videos")
    cell_h = max(v.shape[1] for v in videos)
    cell_w = max(v.shape[2] for v in videos)
    if scale is None:
        scale = max(1, math.ceil(64 / max(cell_h, cell_w)))
    if scale < 1:
        raise VideoError(f"scale must be >= 1, got {scale}")
    cell_h, cell_w = cell_h * scale, cell_w * scale
    cols = max(v.shape[0] for v in videos)

    font = ImageFont.load_default(size=max(10, min(16, cell_h // 3)))
    label_w = 0
    if labels is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(probe.textbbox((0, 0), str(text), font=font)[2] for text in labels) + 2 * gap

    sheet = Image.new("RGB", (label_w + cols * (cell_w + gap) + gap,
                              len(videos) * (cell_h + gap) + gap), background)
    draw = ImageDraw.Draw(sheet)
    for row, video in enumerate(videos):
        top = gap + row * (cell_h + gap)
        if labels is not None:
            box = draw.textbbox((0, 0), str(labels[row]), font=font)
            draw.text((gap, top + (cell_h - (box[3] - box[1])) // 2 - box[1]), str(labels[row]),
                      fill=(0, 0, 0), font=font)
        for col, frame in enumerate(video):
            big = frame.repeat(scale, axis=0).repeat(scale, axis=1)
            sheet.paste(Image.fromarray(big), (label_w + gap + col * (cell_w + gap), top))
    if path is not None:
        with atomic_file(path) as tmp:
            sheet.save(tmp, format="PNG")
    return np.asarray(sheet)
