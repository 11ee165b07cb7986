"""A model directory: every component a pipeline needs, one subfolder each, plus a root index.

```
DIR/model_index.json        what is inside, and the versions of the layout
DIR/transformer/            config.json + diffusion_pytorch_model.safetensors
DIR/codec/                  codec_config.json (+ weights for the Wan VAE)
DIR/prompt_encoder/         prompt_encoder.json (the PromptEncoderConfig) + null_condition.safetensors
DIR/tokenizer/              tokenizer.json + text_tokenizer.json (only with a text stream)
DIR/world.json, DIR/sampler.json, DIR/flow.json   ShapesWorld, sampling defaults, text-path settings
```
Training writes it at the end of each stage; `UniViGUPipeline` reads and writes it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_file, atomic_write_text, read_json, recover_directory
from ..config import (CodecConfig, FlowConfig, PromptEncoderConfig, SamplerConfig, WorldConfig, from_dict,
                      to_dict)
from .text import TextTokenizer, load_null_condition, load_prompt_encoder
from .transformer import UniViGUTransformer
from .vae import LatentCodec, load_codec

INDEX_NAME = "model_index.json"


class BundleError(ValueError):
    """A model directory is missing or incomplete."""


@dataclass
class Bundle:
    transformer: UniViGUTransformer
    codec: LatentCodec
    prompt_encoder_config: PromptEncoderConfig
    null_condition: torch.Tensor  # [1, Lc, D]
    tokenizer: TextTokenizer | None
    world: WorldConfig
    sampler: SamplerConfig
    flow: FlowConfig

    def prompt_encoder(self, device="cpu"):
        """The prompt encoder, built on demand (it is the largest component on CPU)."""
        return load_prompt_encoder(self.prompt_encoder_config, device=device)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def save_bundle(directory: str | Path, transformer: UniViGUTransformer, codec: LatentCodec,
                prompt_encoder_config: PromptEncoderConfig, null_condition: torch.Tensor,
                tokenizer: TextTokenizer | None, world: WorldConfig, sampler: SamplerConfig,
                flow: FlowConfig) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(directory / "transformer")
    codec.save_pretrained(directory / "codec")
    enc_dir = directory / "prompt_encoder"
    enc_dir.mkdir(exist_ok=True)
    _write_json(enc_dir / "prompt_encoder.json", to_dict(prompt_encoder_config))
    null = null_condition.reshape(null_condition.shape[-2:]).float().contiguous()
    with atomic_file(enc_dir / "null_condition.safetensors") as tmp:
        save_file({"embedding": null, "mask": null.abs().sum(-1) > 0}, str(tmp))
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
    _write_json(directory / "world.json", to_dict(world))
    _write_json(directory / "sampler.json", to_dict(sampler))
    _write_json(directory / "flow.json", to_dict(flow))
    _write_json(directory / INDEX_NAME, {
        "_class_name": "UniViGUPipeline", "layout": 1,
        "transformer": "transformer", "codec": "codec", "prompt_encoder": "prompt_encoder",
        "tokenizer": "tokenizer" if tokenizer is not None else None,
    })
    return directory


# Files whose absence falls back to the library's defaults; `univigu` commands refuse a model
# directory without them unless the sizes are given (a 3-frame model would make 9-frame videos).
DEFAULTED_FILES = ("world.json", "sampler.json")


def missing_defaults(directory: str | Path) -> list[str]:
    """The files of DEFAULTED_FILES that `directory` lacks."""
    return [name for name in DEFAULTED_FILES if not (Path(directory) / name).is_file()]


def _read_config(path: Path, cls):
    if not path.is_file():
        if path.name in DEFAULTED_FILES:
            warnings.warn(f"{path} is missing: using the default {cls.__name__} ({to_dict(cls())})", stacklevel=3)
        return cls()
    return from_dict(cls, read_json(path, BundleError), prefix=path.stem)


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    directory = Path(directory)
    recover_directory(directory, writer=False)  # an export killed between its two renames
    if not directory.is_dir():
        raise BundleError(f"model directory not found: {directory}")
    if not (directory / INDEX_NAME).is_file():
        raise BundleError(f"{directory} is not a univigu model directory (no {INDEX_NAME})")
    transformer = UniViGUTransformer.from_pretrained(directory / "transformer", device=device)
    codec = load_codec(directory / "codec")
    enc_cfg = _read_config(directory / "prompt_encoder" / "prompt_encoder.json", PromptEncoderConfig)
    null, _ = load_null_condition(directory / "prompt_encoder")
    tok_dir = directory / "tokenizer"
    tokenizer = TextTokenizer.load(tok_dir) if tok_dir.is_dir() else None
    return Bundle(transformer=transformer, codec=codec, prompt_encoder_config=enc_cfg,
                  null_condition=null.to(device), tokenizer=tokenizer,
                  world=_read_config(directory / "world.json", WorldConfig),
                  sampler=_read_config(directory / "sampler.json", SamplerConfig),
                  flow=_read_config(directory / "flow.json", FlowConfig))


__all__ = ["Bundle", "BundleError", "save_bundle", "load_bundle", "CodecConfig"]
