"""The web demo's parts that need no server: the `serve` command's flags and defaults, the videos
made for the browser, the text canvas mid-sampling, the oracle's reading, and the checks on prompts
and uploads (one clear message each)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from pipeline_helpers import WORLD, corpus

from univigu.cli import build_parser, main
from univigu.commands import serve
from univigu.data import shapesworld as sw
from univigu.data.video_io import probe_video, read_video, write_video
from univigu.models.text import TextTokenizer
from univigu.web.media import (MASK_GLYPH, InputError, check_prompt, check_upload, frame_strip, inside,
                               oracle_reading, remove_upload, render_canvas, upscale, write_display_video)


def test_serve_help_and_localhost_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt_dir", "--host", "--port", "--concurrency", "--max_queue", "--max_upload_mb"):
        assert flag in text
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.concurrency == 1


def test_serve_defaults_to_the_demo_model_else_the_shipped_generator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert serve.default_model_dir().name == "generator"
    made = tmp_path / serve.DEMO_MODEL
    made.mkdir(parents=True)
    (made / "model_index.json").write_text("{}")
    assert serve.default_model_dir() == serve.DEMO_MODEL


@pytest.mark.parametrize("argv,message", [
    (["--ckpt_dir", "nowhere"], "model directory not found: nowhere"),
    (["--port", "70000"], "--port must be 0-65535"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
])
def test_serve_bad_flags_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_display_video_is_vp9_yuv420p_upscaled_to_even_size(tmp_path):
    frames = sw.render(sw.make_samples(1, seed=0, world=WORLD)[0].scene, WORLD)  # 5 x 16 x 16
    path = write_display_video(tmp_path / "v.webm", frames, fps=WORLD.fps)
    info = probe_video(path, decode=True)
    assert info["codec"] == "vp9" and (info["width"], info["height"]) == (256, 256)
    assert info["num_frames"] == 5 and info["duration"] == pytest.approx(5 / WORLD.fps)
    import av

    with av.open(str(path)) as container:
        assert container.format.name.startswith("matroska,webm")
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    # What the page shows is the video: at the centre of each 16 x 16 block, the rendered pixel
    # (lossy VP9 and 4:2:0 chroma blur the block edges, not the centres, beyond a few levels).
    back = read_video(path)[:, 8::16, 8::16].astype(int)
    assert np.abs(back - frames.astype(int)).mean() < 2 and np.abs(back - frames.astype(int)).max() <= 24
    odd = upscale(np.zeros((2, 3, 5, 3), np.uint8), target=7)  # factor 3 -> 9 x 15, padded to even
    assert odd.shape == (2, 10, 16, 3)
    assert frame_strip(frames, size=32, gap=2).shape == (32, 5 * 32 + 4 * 2, 3)


def test_canvas_shows_masked_positions_and_stops_at_a_settled_eos():
    tokenizer = TextTokenizer.train_from_corpus(corpus())
    ids = tokenizer.encode(["a small red circle moves up"], 12)[0].tolist()
    eos = ids.index(tokenizer.eos_id)
    assert render_canvas(tokenizer, ids) == "a small red circle moves up"
    masked = list(ids)
    masked[1] = masked[eos + 2] = tokenizer.mask_id
    # A mask after EOS keeps the end open: the blocks after it still show.
    assert render_canvas(tokenizer, masked) == f"a {MASK_GLYPH} red circle moves up {MASK_GLYPH}"
    assert render_canvas(tokenizer, [tokenizer.mask_id] * 3) == " ".join([MASK_GLYPH] * 3)


def test_oracle_reading_names_what_the_video_shows_and_scores_the_texts():
    sample = sw.make_samples(1, seed=3, world=WORLD)[0]
    frames = sw.render(sample.scene, WORLD)
    text = oracle_reading(frames, WORLD, [("the prompt", sample.prompt), ("the caption", "blah")])
    obj = sample.scene.objects[0]
    assert f"{obj.size} {obj.colour} {obj.shape}" in text
    assert "Against the prompt" in text and "all correct" in text
    assert "The caption names no object the oracle knows." in text
    assert "cannot read" in oracle_reading(frames[:1], WORLD)  # one frame: no motion to read


def test_prompts_the_model_cannot_take_get_one_clear_message():
    tokenizer = TextTokenizer.train_from_corpus(corpus())
    assert check_prompt("  a small red circle moves up ", tokenizer, 12) == "a small red circle moves up"
    with pytest.raises(InputError, match="The prompt is empty"):
        check_prompt("   ", tokenizer, 12)
    with pytest.raises(InputError, match="at most 400"):
        check_prompt("a " * 300)
    with pytest.raises(InputError, match="does not know the word"):
        check_prompt("a small red zeppelin moves up", tokenizer, 12)
    with pytest.raises(InputError, match="text canvas holds"):
        check_prompt("a small red circle moves up and a large blue square moves down", tokenizer, 12)
    # A video-only model has no canvas: any non-empty prompt of sane length goes to the encoder.
    assert check_prompt("a small red zeppelin") == "a small red zeppelin"


def test_uploads_are_checked_confined_and_removed(tmp_path):
    uploads = tmp_path / "uploads"
    (uploads / "abc").mkdir(parents=True)
    good = uploads / "abc" / "clip.mp4"
    write_video(good, np.zeros((5, 16, 16, 3), np.uint8), fps=8)
    assert check_upload(str(good), uploads, 2**20, 10, 100)["num_frames"] == 5

    corrupt = uploads / "abc" / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(2000))
    with pytest.raises(InputError, match="'corrupt.mp4' is not a video this demo can read") as err:
        check_upload(str(corrupt), uploads, 2**20, 10, 100)
    assert str(uploads) not in str(err.value)  # no server path in the message
    with pytest.raises(InputError, match="too long"):
        check_upload(str(good), uploads, 2**20, 0.2, 100)
    with pytest.raises(InputError, match="up to 0 MB"):
        check_upload(str(good), uploads, 10, 10, 100)
    with pytest.raises(InputError, match="Upload a video first"):
        check_upload(None, uploads, 2**20, 10, 100)

    outside = tmp_path / "secret.mp4"
    write_video(outside, np.zeros((5, 16, 16, 3), np.uint8), fps=8)
    for path in (outside, uploads / ".." / "secret.mp4"):
        with pytest.raises(InputError, match="Only videos uploaded through this page"):
            check_upload(str(path), uploads, 2**20, 10, 100)
    link = uploads / "abc" / "link.mp4"
    link.symlink_to(outside)
    assert not inside(link, uploads)
    remove_upload(str(link), uploads)  # a link out of the folder is not followed, not removed
    assert outside.exists() and link.exists()
    link.unlink()

    remove_upload(str(good), uploads)
    remove_upload(str(corrupt), uploads)
    assert not (uploads / "abc").exists() and uploads.exists()
    remove_upload(str(outside), uploads)  # outside the folder: left alone
    assert outside.exists()
    with pytest.raises(InputError, match="is gone"):
        check_upload(str(good), uploads, 2**20, 10, 100)


def test_caption_tensor_from_uint8_frames_matches_the_oracle_input():
    # The V2T tab captions ShapesWorld examples from their frames; the oracle reads the same tensor.
    sample = sw.make_samples(1, seed=5, world=WORLD)[0]
    frames = sw.render(sample.scene, WORLD)
    from univigu.data.video_io import frames_to_tensor

    text = oracle_reading(frames_to_tensor(frames), WORLD, [("the prompt", sample.prompt)])
    assert "all correct" in text
    assert torch.is_tensor(frames_to_tensor(frames))
