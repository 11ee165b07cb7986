"""Video I/O: round trips, frame sampling, resize/crop, contact sheets and clear errors on bad files."""

from __future__ import annotations

import traceback

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tolerances import assert_close_ordered

from univigu.data.video_io import (
    VideoError,
    contact_sheet,
    frames_to_tensor,
    load_video_tensor,
    probe_video,
    read_video,
    resize_center_crop,
    sample_indices,
    tensor_to_frames,
    write_gif,
    write_video,
)


def smooth_frames(num=9, height=32, width=48, seed=0):
    """Frames of moving colour gradients (realistic for a codec, unlike white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frames = []
    for t in range(num):
        channels = [127.5 + 120 * np.sin(xx / 7.0 + yy / 11.0 + 0.4 * t + p) for p in phase]
        frames.append(np.stack(channels, axis=-1))
    return np.clip(np.round(np.stack(frames)), 0, 255).astype(np.uint8)


def indexed_frames(num, height=16, width=16):
    """Flat frames whose grey level encodes the frame index (index * 8), to check sampling."""
    levels = (np.arange(num) * 8).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num, height, width, 3)).copy()


def frame_ids(frames):
    return [int(round(f.astype(float).mean() / 8)) for f in frames]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    frames = smooth_frames()
    write_video(path, frames, fps=8)
    return path, frames


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


def test_mp4_round_trip_default_is_near_lossless(clip):
    path, frames = clip
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(int) - frames.astype(int))
    # crf 0 + yuv444p: only the RGB<->YUV rounding remains.
    assert error.max() <= 3 and error.mean() < 1.0


def test_mp4_round_trip_yuv420_is_close(tmp_path):
    frames = smooth_frames(num=10, height=32, width=48, seed=1)
    path = tmp_path / "lossy.mp4"
    write_video(path, frames, fps=10, crf=18, pix_fmt="yuv420p")
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6.0
    with av.open(str(path)) as container:  # a file every player opens
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"


def test_probe_reports_what_was_written(clip, tmp_path):
    path, frames = clip
    for decode in (False, True):
        info = probe_video(path, decode=decode)
        assert (info["width"], info["height"], info["num_frames"]) == (48, 32, 9)
        assert info["fps"] == pytest.approx(8.0)
        assert info["duration"] == pytest.approx(9 / 8, abs=1e-3)
        assert info["codec"] == "h264"
    write_video(tmp_path / "b.mp4", smooth_frames(num=13, height=20, width=24), fps=5)
    info = probe_video(tmp_path / "b.mp4")
    assert (info["width"], info["height"], info["num_frames"]) == (24, 20, 13)
    assert info["duration"] == pytest.approx(13 / 5, abs=1e-3)


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(7, 3), dtype=np.uint8)
    frames = palette[rng.integers(0, 7, size=(6, 16, 20))]
    path = tmp_path / "a.gif"
    write_gif(path, frames, fps=10)
    # Independent reader: Pillow.
    with Image.open(path) as gif:
        assert gif.n_frames == 6
        assert gif.info["duration"] == 100
        pillow = []
        for k in range(gif.n_frames):
            gif.seek(k)
            pillow.append(np.asarray(gif.convert("RGB")))
    assert np.array_equal(np.stack(pillow), frames)
    # And our own PyAV reader.
    assert np.array_equal(read_video(path), frames)
    assert probe_video(path)["fps"] == pytest.approx(10.0)


def test_tensor_conversion_is_exact_inverse():
    values = np.arange(256, dtype=np.uint8)
    frames = np.stack([values.reshape(16, 16)] * 3, axis=-1)[None].repeat(2, axis=0)
    frames[1] = 255 - frames[1]
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (3, 2, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0
    # Layout: tensor[c, f, h, w] == frames[f, h, w, c] / 127.5 - 1.
    expected = torch.from_numpy(frames.astype(np.float64) / 127.5 - 1.0).permute(3, 0, 1, 2)
    assert_close_ordered(tensor.double(), expected, terms=2, dtype=torch.float32)  # a division, a subtraction
    assert np.array_equal(tensor_to_frames(tensor), frames)
    # Out-of-range model outputs clamp instead of wrapping around.
    wild = torch.full((3, 1, 2, 2), 5.0)
    wild[:, :, 0] = -5.0
    out = tensor_to_frames(wild)
    assert out[0, 0].max() == 0 and out[0, 1].min() == 255


def test_tensor_conversion_rejects_bad_shapes():
    with pytest.raises(VideoError, match=r"\[F, H, W, 3\]"):
        frames_to_tensor(np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(VideoError, match="uint8"):
        frames_to_tensor(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(VideoError, match=r"\[3, F, H, W\]"):
        tensor_to_frames(torch.zeros(1, 4, 8, 8))


def test_write_rejects_malformed_frames(tmp_path):
    with pytest.raises(VideoError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(VideoError, match="non-empty"):
        write_gif(tmp_path / "x.gif", np.zeros((0, 8, 8, 3), dtype=np.uint8), fps=8)
    with pytest.raises(VideoError, match="even width and height"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 9, 8, 3), dtype=np.uint8), pix_fmt="yuv420p")


# ------------------------------------------------------------------------------------------
# Sampling, resizing, cropping
# ------------------------------------------------------------------------------------------


def test_sample_indices_follow_the_definitions():
    assert sample_indices(10) == list(range(10))
    assert sample_indices(10, stride=3) == [0, 3, 6, 9]
    assert sample_indices(10, num_frames=2, stride=3) == [0, 3]
    assert sample_indices(10, stride=3, start=2) == [2, 5, 8]
    # Evenly spaced: both ends included.
    assert sample_indices(9, num_frames=5) == [0, 2, 4, 6, 8]
    assert sample_indices(10, num_frames=4) == [0, 3, 6, 9]
    assert sample_indices(7, num_frames=1) == [0]
    # Target fps: the frame on screen at time i / fps, i.e. floor(i * source_fps / fps).
    assert sample_indices(30, fps=10, source_fps=30) == list(range(0, 30, 3))
    assert sample_indices(10, fps=10, source_fps=25) == [0, 2, 5, 7]
    assert sample_indices(3, fps=10, source_fps=4) == [0, 0, 0, 1, 1, 2, 2, 2]  # upsampling repeats
    ntsc = sample_indices(300, fps=10, source_fps=30000 / 1001)
    assert ntsc == [int(i * 30000 / 1001 / 10) for i in range(len(ntsc))] and ntsc[-1] < 300


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="needs 5 frames at stride 3"):
        sample_indices(10, num_frames=5, stride=3)
    with pytest.raises(ValueError, match="needs 11 frames"):
        sample_indices(10, num_frames=11)
    with pytest.raises(ValueError, match="either stride or fps"):
        sample_indices(10, stride=2, fps=4, source_fps=8)


def test_read_video_samples_the_right_frames(tmp_path):
    path = tmp_path / "indexed.mp4"
    write_video(path, indexed_frames(20), fps=10)
    assert frame_ids(read_video(path)) == list(range(20))
    assert frame_ids(read_video(path, stride=4)) == [0, 4, 8, 12, 16]
    assert frame_ids(read_video(path, num_frames=3, stride=2, start=5)) == [5, 7, 9]
    assert frame_ids(read_video(path, num_frames=5)) == sample_indices(20, num_frames=5)
    assert frame_ids(read_video(path, fps=4)) == sample_indices(20, fps=4, source_fps=10)
    with pytest.raises(VideoError, match=r"indexed\.mp4.*needs 8 frames at stride 3"):
        read_video(path, num_frames=8, stride=3)


@pytest.mark.parametrize("shape, size", [((32, 48), (16, 16)), ((48, 32), (20, 10)),
                                         ((30, 70), (33, 17)), ((10, 10), (40, 30))])
def test_resize_center_crop_matches_pillow_fit(shape, size):
    frame = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours = resize_center_crop(frame, size)
    reference = np.asarray(ImageOps.fit(Image.fromarray(frame), size,
                                        method=Image.Resampling.BICUBIC, centering=(0.5, 0.5)))
    assert ours.shape == (size[1], size[0], 3)
    assert np.array_equal(ours, reference)


def test_center_crop_keeps_the_centre():
    # 40 wide x 20 high: blue centre square, red side bands; a square crop keeps only blue.
    frame = np.zeros((20, 40, 3), dtype=np.uint8)
    frame[:, :10] = frame[:, 30:] = (255, 0, 0)
    frame[:, 10:30] = (0, 0, 255)
    assert np.array_equal(resize_center_crop(frame, (20, 20)), frame[:, 10:30])
    small = resize_center_crop(frame, (5, 5))
    # Downscaling filters reach a little past the crop box, so only the border columns may pick
    # up a trace of red.
    assert np.array_equal(small[:, 1:-1], np.broadcast_to(np.array([0, 0, 255], np.uint8), (5, 3, 3)))
    assert small[..., 0].max() < 64


def test_load_video_tensor_shapes_and_range(clip):
    path, frames = clip
    video = load_video_tensor(path, num_frames=5, size=(16, 16))
    assert video.shape == (3, 5, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    full = load_video_tensor(path)
    assert full.shape == (3, 9, 32, 48)
    assert np.abs(tensor_to_frames(full).astype(int) - frames.astype(int)).max() <= 3
    strided = load_video_tensor(path, stride=2, size=(24, 12))
    assert strided.shape == (3, 5, 12, 24)
    with pytest.raises(VideoError, match="size must be a positive"):
        load_video_tensor(path, size=(0, 16))


# ------------------------------------------------------------------------------------------
# Bad files: one VideoError naming the file, never an exception from inside av
# ------------------------------------------------------------------------------------------


def _faststart_truncated(source, tmp_path):
    """An mp4 with its index (moov) first and the frame data cut off: it opens, but damaged."""
    whole = tmp_path / "faststart.mp4"
    with av.open(str(source)) as inp, av.open(str(whole), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    data = whole.read_bytes()
    path = tmp_path / "cut_data.mp4"
    path.write_bytes(data[: int(len(data) * 0.9)])
    return path


@pytest.fixture(scope="module")
def bad_files(clip, tmp_path_factory):
    source, _ = clip
    folder = tmp_path_factory.mktemp("bad")
    data = source.read_bytes()
    files = {}
    files["truncated"] = folder / "truncated.mp4"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["cut_data"] = _faststart_truncated(source, folder)
    files["empty"] = folder / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["text"] = folder / "notes.mp4"
    files["text"].write_text("this is a text file, not a video\n" * 20)
    files["missing"] = folder / "missing.mp4"
    return files


READERS = {
    "probe": lambda p: probe_video(p),
    "probe_decode": lambda p: probe_video(p, decode=True),
    "read": lambda p: read_video(p),
    "read_sampled": lambda p: read_video(p, num_frames=3),
    "tensor": lambda p: load_video_tensor(p, size=(16, 16)),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", ["truncated", "cut_data", "empty", "text", "missing"])
def test_bad_files_raise_one_clear_error(bad_files, kind, reader):
    path = bad_files[kind]
    with pytest.raises(VideoError) as info:
        READERS[reader](path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    # The error is raised from our module, without PyAV's exception chained to it.
    assert info.value.__cause__ is None and (info.value.__context__ is None
                                            or info.value.__suppress_context__)
    last_frame = traceback.extract_tb(info.value.__traceback__)[-1]
    assert last_frame.filename.endswith("video_io.py")


def test_specific_messages(bad_files):
    with pytest.raises(VideoError, match="empty"):
        read_video(bad_files["empty"])
    with pytest.raises(VideoError, match="not found"):
        read_video(bad_files["missing"])
    with pytest.raises(VideoError, match="truncated or corrupt"):
        read_video(bad_files["cut_data"])


# ------------------------------------------------------------------------------------------
# Contact sheet
# ------------------------------------------------------------------------------------------


def test_contact_sheet_layout(tmp_path):
    a = smooth_frames(num=3, height=8, width=10, seed=1)
    b = smooth_frames(num=2, height=8, width=10, seed=2)
    path = tmp_path / "sheet.png"
    sheet = contact_sheet([a, b], path, scale=3, gap=2)
    cell_h, cell_w = 8 * 3, 10 * 3
    assert sheet.shape == (2 * (cell_h + 2) + 2, 3 * (cell_w + 2) + 2, 3)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), sheet)
    for row, video in enumerate([a, b]):
        for col, frame in enumerate(video):
            top, left = 2 + row * (cell_h + 2), 2 + col * (cell_w + 2)
            cell = sheet[top:top + cell_h, left:left + cell_w]
            assert np.array_equal(cell, frame.repeat(3, axis=0).repeat(3, axis=1))
    # The missing third frame of row 2 is background.
    top, left = 2 + cell_h + 2, 2 + 2 * (cell_w + 2)
    assert (sheet[top:top + cell_h, left:left + cell_w] == 255).all()


def test_contact_sheet_labels_and_auto_scale():
    a = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    plain = contact_sheet([a, a])
    assert plain.shape[0] == 2 * (64 + 2) + 2  # auto scale makes 16 px cells 64 px
    labelled = contact_sheet([a, a], labels=["first", "second"])
    extra = labelled.shape[1] - plain.shape[1]
    assert extra > 0 and labelled.shape[0] == plain.shape[0]
    label_area = labelled[:, :extra]
    assert (label_area < 128).any()  # the text is drawn
    with pytest.raises(VideoError, match="labels"):
        contact_sheet([a, a], labels=["only one"])
