"""Latent codecs: the exact pixel-shuffle default and the Wan VAE (tiny random AutoencoderKLWan)."""

import json

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_ordered

from univigu.config import CodecConfig
from univigu.models.vae import CodecError, PixelShuffleCodec, WanVAECodec, load_codec


def video(b, f, h, w, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, f, h, w, generator=g) * 2 - 1).to(dtype)


# --------------------------------------------------------------------------------------------
# Pixel shuffle
# --------------------------------------------------------------------------------------------


def per_frame_unshuffle(x, sf):
    """Reference: torch's pixel_unshuffle applied to each frame."""
    return torch.stack([F.pixel_unshuffle(x[:, :, f], sf) for f in range(x.shape[2])], dim=2)


@pytest.mark.parametrize("sf", [1, 2, 4])
def test_pixel_shuffle_is_per_frame_pixel_unshuffle(sf):
    codec = PixelShuffleCodec(spatial_factor=sf)
    x = video(2, 5, 16, 24)
    z = codec.encode(x)
    assert z.shape == (2, 3 * sf * sf, 5, 16 // sf, 24 // sf)
    assert torch.equal(z, per_frame_unshuffle(x, sf))
    assert codec.latent_channels == 3 * sf * sf
    assert codec.latent_shape(5, 16, 24) == tuple(z.shape[1:])


def test_pixel_shuffle_temporal_fold_layout():
    sf, tf = 2, 3
    codec = PixelShuffleCodec(spatial_factor=sf, temporal_factor=tf)
    x = video(2, 6, 8, 12)
    z = codec.encode(x)
    assert z.shape == (2, 3 * sf * sf * tf, 2, 4, 6)
    # Channel ((c*tf + t)*sf + i)*sf + j holds colour c of frame f'*tf + t at (h'*sf+i, w'*sf+j):
    # i.e. for each frame offset t, the per-frame pixel_unshuffle of frames t, t+tf, ...
    parts = [per_frame_unshuffle(x[:, :, t::tf], sf).reshape(2, 3, 1, sf * sf, 2, 4, 6)
             for t in range(tf)]
    expected = torch.cat(parts, dim=2).reshape(2, 3 * tf * sf * sf, 2, 4, 6)
    assert torch.equal(z, expected)
    # and a single element checked by hand
    c, t, i, j, fp, hp, wp = 2, 1, 1, 0, 1, 3, 5
    assert z[1, ((c * tf + t) * sf + i) * sf + j, fp, hp, wp] == x[1, c, fp * tf + t, hp * sf + i,
                                                                     wp * sf + j]


@pytest.mark.parametrize("sf,tf,dtype", [(4, 1, torch.float32), (2, 2, torch.float32),
                                         (4, 1, torch.bfloat16), (1, 3, torch.float64)])
def test_pixel_shuffle_round_trip_is_exact(sf, tf, dtype):
    codec = PixelShuffleCodec(sf, tf)
    x = video(3, 6, 16, 32, seed=1, dtype=dtype)
    z = codec.encode(x)
    assert z.dtype == dtype
    assert torch.equal(codec.decode(z), x)
    assert torch.equal(codec.encode(codec.decode(z)), z)


def test_pixel_shuffle_refuses_bad_sizes_and_shapes():
    codec = PixelShuffleCodec(spatial_factor=4, temporal_factor=2)
    with pytest.raises(CodecError, match="divisible by 8"):  # sf * patch 2
        codec.check_frames(4, 20, 32)
    with pytest.raises(CodecError, match="divisible by 2"):
        codec.check_frames(5, 32, 32)
    codec.check_frames(4, 12, 12, patch=1)  # 12 % 4 == 0 without the patchifier
    with pytest.raises(CodecError, match="divisible by 8"):
        codec.check_frames(4, 12, 12)
    with pytest.raises(CodecError, match=r"\[B, 3, F, H, W\]"):
        codec.encode(torch.zeros(3, 4, 16, 16))  # no batch dimension
    with pytest.raises(CodecError, match=r"\[B, 3, F, H, W\]"):
        codec.encode(torch.zeros(1, 1, 4, 16, 16))  # grey video
    with pytest.raises(CodecError, match="float"):
        codec.encode(torch.zeros(1, 3, 4, 16, 16, dtype=torch.uint8))
    with pytest.raises(CodecError, match="frame count divisible by 2"):
        codec.encode(torch.zeros(1, 3, 3, 16, 16))
    with pytest.raises(CodecError, match="latents must have shape"):
        codec.decode(torch.zeros(1, 47, 2, 4, 4))
    with pytest.raises(CodecError, match="spatial_factor"):
        PixelShuffleCodec(spatial_factor=0)


def test_pixel_shuffle_save_and_load(tmp_path):
    codec = PixelShuffleCodec(2, 2)
    codec.save_pretrained(tmp_path / "codec")
    loaded = load_codec(tmp_path / "codec")
    assert isinstance(loaded, PixelShuffleCodec)
    assert (loaded.spatial_factor, loaded.temporal_factor) == (2, 2)
    default = load_codec(CodecConfig())
    assert (default.spatial_factor, default.temporal_factor, default.latent_channels) == (4, 1, 48)


# --------------------------------------------------------------------------------------------
# Wan VAE (tiny random AutoencoderKLWan)
# --------------------------------------------------------------------------------------------

MEAN = [0.1, -0.2, 0.3, 0.5]
STD = [0.5, 2.0, 1.5, 0.8]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=MEAN,
                           latents_std=STD)
    path = tmp_path_factory.mktemp("wan_vae")
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def reference_vae(wan_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(wan_dir)).eval()


def decoder_terms(vae) -> int:
    """Reduction length through the decoder, whose input is the un-normalised latent (rounded once):
    its widest convolution's fan-in, once per convolution."""
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    return len(convs) * max(m.weight[0].numel() for m in convs)


def stats():
    return torch.tensor(MEAN).view(1, 4, 1, 1, 1), torch.tensor(STD).view(1, 4, 1, 1, 1)


def test_wan_vae_matches_diffusers_with_normalisation(wan_dir, reference_vae):
    codec = load_codec(CodecConfig(kind="wan_vae", path=str(wan_dir), normalize=True))
    assert isinstance(codec, WanVAECodec)
    assert (codec.latent_channels, codec.temporal_factor, codec.spatial_factor) == (4, 4, 8)
    x = video(2, 5, 16, 32)
    z = codec.encode(x)
    assert z.shape == (2,) + codec.latent_shape(5, 16, 32) == (2, 4, 2, 2, 4)
    mean, std = stats()
    with torch.no_grad():
        raw = reference_vae.encode(x).latent_dist.mode()
        assert_close_ordered(z, (raw - mean) / std, terms=2)  # diffusers' latents, then a shift and a scale
        torch.testing.assert_close(codec.encode(x), z, rtol=0, atol=0)  # deterministic
        expected = reference_vae.decode(raw).sample
    assert_close_ordered(codec.decode(z), expected, terms=decoder_terms(reference_vae))
    # decode un-normalises: the raw latents fed straight to diffusers give a different video
    assert not torch.allclose(codec.decode(raw), expected, atol=1e-3)


def test_wan_vae_raw_latents_without_normalisation(wan_dir, reference_vae):
    codec = WanVAECodec.from_pretrained(wan_dir, normalize=False)
    x = video(1, 9, 32, 16, seed=3)
    with torch.no_grad():
        raw = reference_vae.encode(x).latent_dist.mode()
        expected = reference_vae.decode(raw).sample
    z = codec.encode(x)
    assert z.shape == (1, 4, 3, 4, 2)
    assert_close_ordered(z, raw, terms=1)
    assert_close_ordered(codec.decode(z), expected, terms=decoder_terms(reference_vae))


def test_wan_vae_save_pretrained_round_trip(wan_dir, tmp_path):
    codec = WanVAECodec.from_pretrained(wan_dir, normalize=False)
    codec.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "codec_config.json").read_text())["kind"] == "wan_vae"
    loaded = load_codec(tmp_path / "saved")
    assert isinstance(loaded, WanVAECodec) and loaded.normalize is False
    x = video(1, 5, 16, 16, seed=4)
    torch.testing.assert_close(loaded.encode(x), codec.encode(x), rtol=0, atol=0)


def test_wan_vae_refuses_frame_counts_and_sizes(wan_dir):
    codec = WanVAECodec.from_pretrained(wan_dir)
    for frames in (2, 4, 8):
        with pytest.raises(CodecError, match="4n\\+1"):
            codec.check_frames(frames, 16, 16)
    with pytest.raises(CodecError, match="divisible by 16"):
        codec.check_frames(5, 24, 16)
    with pytest.raises(CodecError, match="4n\\+1"):
        codec.encode(video(1, 4, 16, 16))
    with pytest.raises(CodecError, match=r"\[B, 3, F, H, W\]"):
        codec.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(CodecError, match="latents must have shape"):
        codec.decode(torch.zeros(1, 16, 2, 2, 2))


def test_codec_loading_errors(tmp_path):
    with pytest.raises(CodecError, match="not found"):
        load_codec(tmp_path / "missing")
    with pytest.raises(CodecError, match="not found"):
        load_codec(CodecConfig(kind="wan_vae", path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match="holds no codec"):
        load_codec(tmp_path / "empty")
    with pytest.raises(CodecError, match="expected config.json"):
        load_codec(CodecConfig(kind="wan_vae", path=str(tmp_path / "empty")))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(CodecError, match="safetensors"):
        load_codec(tmp_path / "noweights")
    with pytest.raises(CodecError, match="needs codec.path"):
        load_codec(CodecConfig(kind="wan_vae"))
