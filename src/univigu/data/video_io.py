"""Video files <-> arrays with PyAV. Frames are uint8 [F, H, W, 3] at the file boundary."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


class VideoError(ValueError):
    """A video file is missing, empty, truncated or not a video."""


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> None:
    """Encode uint8 frames [F, H, W, 3] as H.264 mp4 (lossless-ish crf 0 keeps the oracle exact)."""
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file to uint8 [F, H, W, 3]."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as err:
        raise VideoError(f"cannot decode video {path}: {err}") from None
    if not frames:
        raise VideoError(f"video {path} has no frames")
    return np.stack(frames)
