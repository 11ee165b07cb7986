"""Latent codecs: pixels <-> latents behind one interface.

Two codecs:

* `PixelShuffleCodec` — the offline default. A fixed, exactly invertible rearrangement: each
  `sf x sf` pixel block (and optionally `tf` consecutive frames) is folded into channels, exactly
  `torch.nn.functional.pixel_unshuffle` per frame. It compresses nothing and learns nothing; it only
  trades resolution for channels so a small transformer sees few tokens. Latents are the pixel
  values themselves (in [-1, 1]), unscaled.
* `WanVAECodec` — the Wan2.1 VAE through diffusers' `AutoencoderKLWan`, loaded from a local
  directory. Encoding is deterministic (the posterior mean); latents are normalised per channel with
  the config's `latents_mean` / `latents_std` unless `normalize=False` (the published Uni-ViGU fed
  raw VAE latents).

Video tensors are `[B, 3, F, H, W]` floats in [-1, 1]; latents are `[B, C, F', H', W']`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from univigu.atomic import atomic_write_text
from univigu.config import CodecConfig, ConfigError, from_dict

CODEC_CONFIG_NAME = "codec_config.json"


class CodecError(ValueError):
    """A codec cannot take this input (shape, frame count, size) or cannot be loaded."""


def _check_positive_sizes(num_frames: int, height: int, width: int) -> None:
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise CodecError(f"{name} must be a positive integer, got {value!r}")


class LatentCodec(nn.Module):
    """Common interface of every codec.

    Subclasses set `latent_channels`, `spatial_factor`, `temporal_factor` and implement
    `encode`, `decode`, `check_frames`, `latent_shape` and `config`.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    kind: str

    # -- shape contract ----------------------------------------------------------------------
    def check_frames(self, num_frames: int, height: int, width: int, patch: int = 2) -> None:
        """Raise CodecError if the codec (followed by a `patch x patch` patchifier) cannot take
        videos of this size."""
        raise NotImplementedError

    def latent_frames(self, num_frames: int) -> int:
        raise NotImplementedError

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """`(C, F', H', W')` of the latent of one video of this size (checked first)."""
        self.check_frames(num_frames, height, width, patch=1)
        return (self.latent_channels, self.latent_frames(num_frames),
                height // self.spatial_factor, width // self.spatial_factor)

    def _check_video(self, frames: Any, patch: int = 1) -> None:
        if not isinstance(frames, torch.Tensor):
            raise CodecError(f"video must be a torch.Tensor, got {type(frames).__name__}")
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise CodecError(
                f"video must have shape [B, 3, F, H, W], got {list(frames.shape)}")
        if not frames.is_floating_point():
            raise CodecError(f"video must be a float tensor in [-1, 1], got dtype {frames.dtype}")
        self.check_frames(frames.shape[2], frames.shape[3], frames.shape[4], patch=patch)

    def _check_latents(self, latents: Any) -> None:
        if not isinstance(latents, torch.Tensor):
            raise CodecError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise CodecError(
                f"latents must have shape [B, {self.latent_channels}, F', H', W'], "
                f"got {list(latents.shape)}")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The `CodecConfig` fields that rebuild this codec."""
        raise NotImplementedError

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `codec_config.json` (plus weights for learned codecs) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / CODEC_CONFIG_NAME, json.dumps(self.config, indent=2))
        return directory


# --------------------------------------------------------------------------------------------
# The default: pixel unshuffle (exact, parameter-free)
# --------------------------------------------------------------------------------------------


class PixelShuffleCodec(LatentCodec):
    """Fold `sf x sf` pixel blocks and `tf` consecutive frames into channels.

    Latent channel index is `((c * tf + t) * sf + i) * sf + j` for colour `c`, frame offset `t`,
    row offset `i`, column offset `j`; with `tf = 1` this is exactly
    `torch.nn.functional.pixel_unshuffle(frame, sf)` applied to each frame. Decoding is the exact
    inverse, so round trips are bit-exact in any dtype.
    """

    kind = "pixel_shuffle"

    def __init__(self, spatial_factor: int = 4, temporal_factor: int = 1):
        super().__init__()
        for name, value in (("spatial_factor", spatial_factor),
                            ("temporal_factor", temporal_factor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CodecError(f"{name} must be a positive integer, got {value!r}")
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.latent_channels = 3 * spatial_factor * spatial_factor * temporal_factor

    def check_frames(self, num_frames: int, height: int, width: int, patch: int = 2) -> None:
        sf, tf = self.spatial_factor, self.temporal_factor
        _check_positive_sizes(num_frames, height, width)
        if num_frames % tf != 0:
            raise CodecError(
                f"pixel_shuffle codec with temporal_factor={tf} needs a frame count divisible by "
                f"{tf}, got {num_frames} frames")
        step = sf * patch
        if height % step != 0 or width % step != 0:
            raise CodecError(
                f"pixel_shuffle codec with spatial_factor={sf} (and transformer patch {patch}) "
                f"needs height and width divisible by {step}, got {height}x{width}")

    def latent_frames(self, num_frames: int) -> int:
        return num_frames // self.temporal_factor

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` -> `[B, 3*sf*sf*tf, F/tf, H/sf, W/sf]` (values unchanged)."""
        self._check_video(frames, patch=1)
        sf, tf = self.spatial_factor, self.temporal_factor
        b, c, f, h, w = frames.shape
        x = frames.reshape(b, c, f // tf, tf, h // sf, sf, w // sf, sf)
        # [B, C, F', t, H', i, W', j] -> [B, C, t, i, j, F', H', W']
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.latent_channels, f // tf, h // sf, w // sf)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Exact inverse of `encode`."""
        self._check_latents(latents)
        sf, tf = self.spatial_factor, self.temporal_factor
        b, _, f, h, w = latents.shape
        x = latents.reshape(b, 3, tf, sf, sf, f, h, w)
        # [B, C, t, i, j, F', H', W'] -> [B, C, F', t, H', i, W', j]
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, 3, f * tf, h * sf, w * sf)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "spatial_factor": self.spatial_factor,
                "temporal_factor": self.temporal_factor}

    def extra_repr(self) -> str:
        return f"spatial_factor={self.spatial_factor}, temporal_factor={self.temporal_factor}"


# --------------------------------------------------------------------------------------------
# Wan VAE (diffusers AutoencoderKLWan from a local directory)
# --------------------------------------------------------------------------------------------


class WanVAECodec(LatentCodec):
    """The Wan VAE (`diffusers.AutoencoderKLWan`) as a codec.

    Encoding returns the posterior mode (deterministic). With `normalize=True` latents are
    `(z - latents_mean) / latents_std` per channel (what Wan's pipelines feed the transformer);
    with `normalize=False` they are the raw VAE latents (what the published Uni-ViGU fed).
    Frame counts must be `4n + 1` (for the stock temporal factor 4) and height/width multiples of
    `8 * patch` (16 for the transformer's 2x2 patches).
    """

    kind = "wan_vae"

    def __init__(self, vae: nn.Module, normalize: bool = True, path: str | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.normalize = normalize
        self.path = path
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        downs = list(cfg.temperal_downsample)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** len(downs))
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(downs))
        if normalize:
            if cfg.latents_mean is None or cfg.latents_std is None:
                raise CodecError("Wan VAE config has no latents_mean/latents_std; "
                                 "use normalize=False")
            if len(cfg.latents_mean) != self.latent_channels or \
                    len(cfg.latents_std) != self.latent_channels:
                raise CodecError(
                    f"Wan VAE latents_mean/latents_std must have z_dim={self.latent_channels} "
                    f"values, got {len(cfg.latents_mean)}/{len(cfg.latents_std)}")
            mean = torch.tensor(cfg.latents_mean, dtype=torch.float32)
            std = torch.tensor(cfg.latents_std, dtype=torch.float32)
        else:
            mean = torch.zeros(self.latent_channels)
            std = torch.ones(self.latent_channels)
        # Buffers move with .to(device); kept out of the state dict (they come from the config).
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, normalize: bool = True,
                        dtype: torch.dtype = torch.float32) -> "WanVAECodec":
        """Load an `AutoencoderKLWan` from a local diffusers directory (never downloads)."""
        path = Path(path)
        if not path.is_dir():
            raise CodecError(f"Wan VAE directory not found: {path}")
        # A full pipeline directory keeps the VAE in `vae/`.
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
        if not (path / "config.json").is_file() or not weights:
            raise CodecError(
                f"{path} is not an AutoencoderKLWan directory: expected config.json and "
                f"*.safetensors weights (diffusers format)")
        from diffusers import AutoencoderKLWan

        try:
            vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype,
                                                   local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise CodecError(f"could not load AutoencoderKLWan from {path}: {err}") from None
        return cls(vae, normalize=normalize, path=str(path))

    def check_frames(self, num_frames: int, height: int, width: int, patch: int = 2) -> None:
        tf, sf = self.temporal_factor, self.spatial_factor
        _check_positive_sizes(num_frames, height, width)
        if (num_frames - 1) % tf != 0:
            raise CodecError(
                f"Wan VAE needs {tf}n+1 frames (1, {tf + 1}, {2 * tf + 1}, ...), "
                f"got {num_frames}")
        step = sf * patch
        if height % step != 0 or width % step != 0:
            raise CodecError(
                f"Wan VAE (spatial factor {sf}, transformer patch {patch}) needs height and width "
                f"divisible by {step}, got {height}x{width}")

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_factor + 1

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` in [-1, 1] -> (normalised) posterior mode `[B, z, F', H/8, W/8]`."""
        self._check_video(frames, patch=1)
        dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(frames.to(dtype)).latent_dist.mode()
        z = z.float()
        return (z - self.latents_mean) / self.latents_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(Normalised) latents -> frames in [-1, 1] (diffusers clamps)."""
        self._check_latents(latents)
        dtype = next(self.vae.parameters()).dtype
        z = latents.float() * self.latents_std + self.latents_mean
        return self.vae.decode(z.to(dtype)).sample.float()

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "path": self.path, "normalize": self.normalize}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the VAE weights (diffusers format) and `codec_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(str(directory))
        cfg = dict(self.config, path=None)  # the directory itself holds the weights
        atomic_write_text(directory / CODEC_CONFIG_NAME, json.dumps(cfg, indent=2))
        return directory


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def load_codec(source: CodecConfig | str | Path | None = None, *,
               dtype: torch.dtype = torch.float32) -> LatentCodec:
    """Build a codec from a `CodecConfig`, or from a directory written by `save_pretrained`
    (or a bare diffusers `AutoencoderKLWan` directory). `None` gives the default codec."""
    if source is None:
        source = CodecConfig()
    if isinstance(source, (str, Path)):
        directory = Path(source)
        if not directory.is_dir():
            raise CodecError(f"codec directory not found: {directory}")
        config_file = directory / CODEC_CONFIG_NAME
        if config_file.is_file():
            try:
                data = json.loads(config_file.read_text())
                data = {k: v for k, v in data.items() if v is not None}
                source = from_dict(CodecConfig, data, prefix="codec")
            except (json.JSONDecodeError, ConfigError) as err:
                raise CodecError(f"invalid {config_file}: {err}") from None
            if source.kind == "wan_vae" and source.path is None:
                source.path = str(directory)
        elif (directory / "config.json").is_file() or (directory / "vae").is_dir():
            source = CodecConfig(kind="wan_vae", path=str(directory))
        else:
            raise CodecError(
                f"{directory} holds no codec: expected {CODEC_CONFIG_NAME} "
                f"or a diffusers AutoencoderKLWan (config.json + *.safetensors)")
    if not isinstance(source, CodecConfig):
        raise CodecError(f"load_codec takes a CodecConfig or a directory, "
                         f"got {type(source).__name__}")
    if source.kind == "pixel_shuffle":
        return PixelShuffleCodec(source.spatial_factor, source.temporal_factor)
    if source.kind == "wan_vae":
        if not source.path:
            raise CodecError("codec kind 'wan_vae' needs codec.path (a local AutoencoderKLWan "
                             "directory)")
        return WanVAECodec.from_pretrained(source.path, normalize=source.normalize, dtype=dtype)
    raise CodecError(f"unknown codec kind {source.kind!r} (known: pixel_shuffle, wan_vae)")


__all__ = ["CodecError", "LatentCodec", "PixelShuffleCodec", "WanVAECodec", "load_codec"]
