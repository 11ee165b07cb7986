"""`univigu generate / caption / joint / convert` on a tiny checkpoint made here.

Commands run in-process through `univigu.cli.main` (one subprocess checks the real exit code).
Every bad input must exit non-zero with exactly one `error: ...` line on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from backbone_helpers import randomize_
from pipeline_helpers import WORLD, prompt_encoder, tiny_model_dir

from univigu.cli import main
from univigu.config import WorldConfig
from univigu.data.video_io import read_video, write_video
from univigu.models.vae import PixelShuffleCodec
from univigu.pipeline import UniViGUPipeline

PROMPT = "a small red circle moves to the left"
COMMANDS = ("generate", "caption", "joint", "convert")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("cli") / "model")


@pytest.fixture(scope="module")
def model_dir_tf4(tmp_path_factory):
    """The same transformer shapes behind a codec that folds 4 frames into channels: 4n frames only."""
    world = WorldConfig(width=16, height=16, frames=8, fps=8)
    return tiny_model_dir(tmp_path_factory.mktemp("cli_tf4") / "model", codec=PixelShuffleCodec(2, 4), world=world)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return UniViGUPipeline.from_pretrained(model_dir, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_clear_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"univigu {command} " in out
    for flag in ("--device", "--dtype"):
        assert flag in out


# --------------------------------------------------------------------------------------------
# Commands on the tiny checkpoint
# --------------------------------------------------------------------------------------------


def test_generate_writes_the_pipelines_video_and_extras(model_dir, pipe, tmp_path, capsys):
    video, gif, sheet = tmp_path / "out.mp4", tmp_path / "out.gif", tmp_path / "out.png"
    code, out, _ = run(capsys, "generate", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--size", "16*16",
                       "--frame_num", 5, "--sample_steps", 2, "--sample_shift", 2.0, "--sample_solver", "heun",
                       "--sample_guide_scale", 3.0, "--base_seed", 3, "--save_file", video, "--gif", gif,
                       "--contact_sheet", sheet, "--with_caption", "--device", "cpu", "--dtype", "fp32")
    assert code == 0
    expected = pipe.generate(PROMPT, steps=2, shift=2.0, solver="heun", guidance_scale=3.0, seed=3,
                             with_caption=True)
    frames = read_video(video)
    assert frames.shape == (5, 16, 16, 3)
    # H.264 crf 0 in yuv444p is lossless up to the RGB <-> YUV rounding.
    assert np.abs(frames.astype(int) - expected.frames[0].astype(int)).max() <= 3
    assert f"caption: {expected.captions[0]}" in out.splitlines()
    assert gif.stat().st_size > 0
    from PIL import Image

    with Image.open(sheet) as image:
        assert image.width > 5 * 16 and image.height >= 16


def test_generate_names_the_file_after_the_prompt_by_default(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "generate", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--sample_steps", 1,
                       "--no-progress")
    assert code == 0
    written = list(tmp_path.glob("*.mp4"))
    assert len(written) == 1 and "a_small_red_circle" in written[0].name
    assert f"video: {written[0].name}" in out
    assert read_video(written[0]).shape == (WORLD.frames, WORLD.height, WORLD.width, 3)


def test_caption_prints_the_pipelines_captions(model_dir, pipe, tmp_path, capsys):
    paths = []
    for i in range(2):
        path = tmp_path / f"clip{i}.mp4"
        write_video(path, np.random.default_rng(i).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
        paths.append(path)
    expected = pipe.caption(paths, steps=3, sampler="euler", seed=7).captions
    code, out, _ = run(capsys, "caption", *paths, "--ckpt_dir", model_dir, "--sample_steps", 3,
                       "--text_sampler", "euler", "--base_seed", 7, "--batch_size", 1, "--dtype", "fp32")
    assert code == 0
    assert out.splitlines() == [f"{p}\t{c}" for p, c in zip(paths, expected)]
    code, out, _ = run(capsys, "caption", paths[0], "--ckpt_dir", model_dir, "--sample_steps", 3,
                       "--text_sampler", "euler", "--base_seed", 7)
    assert code == 0 and out.splitlines() == [expected[0]]
    code, out, _ = run(capsys, "caption", paths[1], "--ckpt_dir", model_dir, "--sample_steps", 3,
                       "--text_sampler", "euler", "--base_seed", 8, "--json")
    assert json.loads(out) == {"video": str(paths[1]), "caption": expected[1]}


def test_joint_writes_the_video_and_prints_its_caption(model_dir, pipe, tmp_path, capsys):
    video = tmp_path / "joint.mp4"
    code, out, _ = run(capsys, "joint", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--sample_steps", 3,
                       "--text_sampler", "confidence", "--base_seed", 2, "--save_file", video, "--dtype", "fp32")
    assert code == 0
    expected = pipe.joint(PROMPT, steps=3, text_sampler="confidence", seed=2)
    assert f"caption: {expected.captions[0]}" in out.splitlines()
    frames = read_video(video)
    assert frames.shape == (5, 16, 16, 3)
    assert np.abs(frames.astype(int) - expected.frames[0].astype(int)).max() <= 3


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(a tiny random diffusers WanTransformer3DModel, its saved folder)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=48, out_channels=48, text_dim=384, freq_dim=32, ffn_dim=64,
                                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=32)
    randomize_(model, seed=5)
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(folder)
    return model, folder


def test_convert_turns_a_diffusers_wan_into_a_loadable_model_directory(wan, tmp_path, capsys):
    wan, folder = wan
    out = tmp_path / "converted"
    code, stdout, _ = run(capsys, "convert", "--wan_dir", folder, "--out", out, "--size", "16*16",
                          "--frame_num", 5, "--condition_length", 16, "--sample_steps", 2)
    assert code == 0 and "video-only" in stdout

    pipe = UniViGUPipeline.from_pretrained(out, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())
    ours, theirs = pipe.transformer.state_dict(), wan.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert pipe.codec.kind == "pixel_shuffle" and pipe.codec.spatial_factor == 4
    assert pipe.prompt_encoder_config.kind == "minilm" and pipe.prompt_encoder_config.condition_length == 16
    torch.testing.assert_close(pipe.null_condition, prompt_encoder().encode([""])[0])
    assert (pipe.world.width, pipe.world.height, pipe.world.frames, pipe.sampler.video_steps) == (16, 16, 5, 2)
    assert pipe.generate(PROMPT, seed=0).frames[0].shape == (5, 16, 16, 3)
    code, _, err = run(capsys, "caption", tmp_path / "any.mp4", "--ckpt_dir", out)
    assert_one_clear_error(code, err, "video-only")


def test_convert_reads_an_original_format_wan_checkpoint(wan, tmp_path, capsys):
    from univigu.models.convert import export_original, load_diffusers_wan

    wan, folder = wan
    export_original(load_diffusers_wan(folder), tmp_path / "wan_original.safetensors")
    original_config = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "in_dim": 48, "out_dim": 48,
                       "text_dim": 384, "freq_dim": 32}
    (tmp_path / "config.json").write_text(json.dumps(original_config))
    out = tmp_path / "converted"
    code, _, _ = run(capsys, "convert", "--original", tmp_path / "wan_original.safetensors", "--config",
                     tmp_path / "config.json", "--out", out, "--size", "16*16", "--frame_num", 5)
    assert code == 0
    pipe = UniViGUPipeline.from_pretrained(out, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())
    ours, theirs = pipe.transformer.state_dict(), wan.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    code, _, err = run(capsys, "convert", "--original", tmp_path / "wan_original.safetensors", "--out",
                       tmp_path / "no_config")
    assert_one_clear_error(code, err, "--config")


def test_convert_records_the_wan_vae_and_published_settings(model_dir, tmp_path, capsys):
    """A published-format checkpoint (our tiny model under the released key names): the VAE and
    UMT5 folders are recorded by path, the released text/latent settings are kept."""
    from safetensors.torch import save_file

    from univigu.models.published import ours_key_to_published
    from univigu.models.transformer import UniViGUTransformer

    unified = UniViGUTransformer.from_pretrained(model_dir / "transformer")
    # The released model has no absolute text position embedding (one of our additions).
    state = {ours_key_to_published(k): v for k, v in unified.state_dict().items()
             if k != "text_stream.position_embedding"}
    # The released model has no mask row: drop it to mimic a uniform-source checkpoint.
    state["vocab_embed.weight"] = state["vocab_embed.weight"][:-1].contiguous()
    save_file(state, str(tmp_path / "uni.safetensors"))
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"z_dim": 48, "temperal_downsample": [False, True, True]}))
    umt5 = tmp_path / "umt5"
    umt5.mkdir()

    out = tmp_path / "published"
    code, stdout, _ = run(capsys, "convert", "--univigu_checkpoint", tmp_path / "uni.safetensors", "--out", out,
                          "--vae_dir", vae, "--text_encoder_dir", umt5, "--tokenizer", model_dir / "tokenizer",
                          "--text_length", 12, "--num_heads", 2)
    assert code == 0 and "unified" in stdout
    codec = json.loads((out / "codec" / "codec_config.json").read_text())
    assert codec == {"kind": "wan_vae", "path": str(vae.resolve()), "normalize": False}
    encoder = json.loads((out / "prompt_encoder" / "prompt_encoder.json").read_text())
    assert encoder == {"kind": "umt5", "path": str(umt5.resolve()), "condition_length": 512,
                       "null_condition": "zeros", "lexical_weight": 0.0}
    assert json.loads((out / "flow.json").read_text())["text_source"] == "uniform"
    world = json.loads((out / "world.json").read_text())
    assert (world["width"], world["height"], world["frames"], world["fps"]) == (832, 480, 81, 16)
    converted = UniViGUTransformer.from_pretrained(out / "transformer")
    assert converted.config.attention_policy == "full" and not converted.config.mask_token
    theirs = unified.state_dict()
    for key, value in converted.state_dict().items():
        expected = theirs[key][:-1] if key == "text_stream.token_embedding.weight" else theirs[key]
        assert torch.equal(value, expected), key

    code, _, err = run(capsys, "convert", "--univigu_checkpoint", tmp_path / "uni.safetensors", "--out",
                       tmp_path / "again", "--vae_dir", vae, "--text_encoder_dir", umt5, "--tokenizer",
                       model_dir / "tokenizer", "--text_length", 12, "--num_heads", 2, "--frame_num", 80)
    assert_one_clear_error(code, err, "4n+1")


# --------------------------------------------------------------------------------------------
# Bad input: one clear line each
# --------------------------------------------------------------------------------------------


def test_bad_inputs_exit_nonzero_with_one_clear_line(model_dir, model_dir_tf4, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_text("this is not a video\n")
    missing = tmp_path / "no_such_model"
    cases = [
        (("generate", "--prompt", PROMPT, "--ckpt_dir", missing), ("model directory not found",)),
        (("caption", corrupt, "--ckpt_dir", missing), ("model directory not found",)),
        (("joint", "--prompt", PROMPT, "--ckpt_dir", missing), ("model directory not found",)),
        (("caption", corrupt, "--ckpt_dir", model_dir), ("corrupt.mp4",)),
        (("caption", tmp_path / "absent.mp4", "--ckpt_dir", model_dir), ("absent.mp4",)),
        (("generate", "--prompt", "", "--ckpt_dir", model_dir), ("--prompt is empty",)),
        (("joint", "--prompt", "   ", "--ckpt_dir", model_dir), ("--prompt is empty",)),
        (("generate", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--size", "20*16"), ("divisible by 8",)),
        (("generate", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--size", "big"), ("--size",)),
        (("joint", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--frame_num", 0), ("frame count",)),
        (("generate", "--prompt", PROMPT, "--ckpt_dir", model_dir_tf4, "--frame_num", 5), ("divisible by 4",)),
        (("generate", "--prompt", PROMPT, "--ckpt_dir", model_dir, "--save_file", "out.gif"), ("--save_file",)),
        (("convert", "--wan_dir", missing, "--out", tmp_path / "x"), ("not found",)),
        (("convert", "--original", tmp_path / "none.pth", "--out", tmp_path / "x"), ("not found",)),
    ]
    for argv, needles in cases:
        code, _, err = run(capsys, *argv)
        assert_one_clear_error(code, err, *needles)
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["corrupt.mp4"]


def test_the_installed_command_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "univigu", "generate", "--prompt", PROMPT, "--ckpt_dir",
                             str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: model directory not found: {tmp_path / 'missing'}"]
