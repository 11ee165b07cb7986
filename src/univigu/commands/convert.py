"""`univigu convert`: a Wan2.1 or published Uni-ViGU checkpoint -> a univigu model directory.

Three sources:

* `--wan_dir DIR`: a diffusers `WanTransformer3DModel` folder, or a whole diffusers Wan pipeline
  folder (transformer/, vae/, text_encoder/, tokenizer/);
* `--original PATH --config NAME|FILE`: an original-format Wan2.1 checkpoint (file or folder);
* `--univigu_checkpoint PATH [--wan_base DIR]`: the published Uni-ViGU weights (a partial checkpoint
  is completed from the Wan base).

A Wan checkpoint holds only the video generator, so its directory is video-only (T2V); grow it into
a unified model with `univigu train` (stage knowledge_recall, train.init_from=OUT). Components the
weights do not carry are *recorded*, not copied: the Wan VAE (`--vae_dir`, a diffusers
AutoencoderKLWan folder) and the UMT5 prompt encoder (`--text_encoder_dir`) are stored as paths in
codec/codec_config.json and prompt_encoder/prompt_encoder.json. A small model whose latents fit the
pixel-shuffle codec (in_channels = 3 * f^2 * t) and whose text_dim is MiniLM's 384 needs neither.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .generate import CommandError
from .sizes import parse_frame_size as parse_size

EPILOG = """\
examples:
  univigu convert --wan_dir Wan2.1-T2V-1.3B-Diffusers --out models/wan-1.3b
  univigu convert --original Wan2.1-T2V-1.3B/diffusion_pytorch_model.safetensors --config t2v-1.3B \\
      --vae_dir Wan2.1-T2V-1.3B-Diffusers/vae --text_encoder_dir Wan2.1-T2V-1.3B-Diffusers \\
      --out models/wan-1.3b
  univigu convert --univigu_checkpoint Uni-ViGU/ckpt.pth --wan_base Wan2.1-T2V-1.3B-Diffusers \\
      --out models/uni-vigu

--config takes t2v-1.3B, t2v-14B or a JSON file with the original WanModel fields (dim, num_heads,
...) or ours. The VAE and UMT5 folders are recorded by path (keep them where they are); in a
diffusers Wan pipeline folder they are found automatically. The published checkpoint needs the
UMT5 tokenizer for its text stream (found in the text encoder / base folder, or --tokenizer), and
gets the released inference's sampling defaults: Euler video steps on a shift-3 grid, guidance 5,
the discrete Euler text sampler, 50 steps each (the --sample_* flags override the video ones).
"""

# Wan2.1's released transformer configs (wan/configs/wan_t2v_*.py).
WAN_PRESETS = {
    "t2v-1.3B": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
    "t2v-14B": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40},
}
# Wan2.1 T2V sampling defaults (generate.py / configs): 81 frames of 832x480 at 16 fps, 50 steps,
# guidance 5, shift 5. Its UniPC solver is replaced by our second-order DPM-Solver++(2M).
WAN_WORLD = {"width": 832, "height": 480, "frames": 81, "fps": 16}
WAN_SAMPLER = {"video_steps": 50, "video_solver": "dpmpp2m", "shift": 5.0, "guidance_scale": 5.0}


class ConvertError(CommandError):
    """The conversion cannot be done with the given inputs."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a Wan2.1 or published Uni-ViGU checkpoint into a univigu model directory",
        description="Convert a Wan2.1 checkpoint (diffusers or original format) or the published Uni-ViGU "
                    "checkpoint into a univigu model directory that `generate`, `caption`, `joint`, `eval` "
                    "and `train` load. Weights are read with safetensors or torch.load(weights_only=True).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--wan_dir", metavar="DIR", help="diffusers WanTransformer3DModel or Wan pipeline folder")
    source.add_argument("--original", metavar="PATH", help="original-format Wan2.1 checkpoint (file or folder)")
    source.add_argument("--univigu_checkpoint", metavar="PATH", help="published Uni-ViGU weights (.pth/.safetensors)")
    source.add_argument("--model_dir", metavar="DIR", help="a univigu model directory (with --merge_lora)")
    parser.add_argument("--merge_lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="merge this LoRA (peft adapter folder, diffusers or original-key Wan .safetensors) "
                             "into the weights written; repeat for several")
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--config", default=None, metavar="NAME|FILE",
                        help="with --original: t2v-1.3B, t2v-14B or a JSON config (default: config.json "
                             "beside the checkpoint)")
    parser.add_argument("--wan_base", default=None, metavar="DIR",
                        help="with --univigu_checkpoint: diffusers Wan folder completing a partial checkpoint")
    parser.add_argument("--vae_dir", default=None, metavar="DIR", help="diffusers AutoencoderKLWan folder (recorded)")
    parser.add_argument("--text_encoder_dir", default=None, metavar="DIR",
                        help="UMT5 encoder folder, or a Wan pipeline folder (recorded)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer.json of the text stream (published checkpoint: the UMT5 tokenizer)")
    parser.add_argument("--text_length", type=int, default=256,
                        help="text canvas length of the published checkpoint (default 256)")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="published checkpoint without --wan_base: attention heads (default: from its text "
                             "RoPE buffer, else width / 128)")
    parser.add_argument("--masked", action="store_true",
                        help="the published-format checkpoint was trained with a mask source (one extra id)")
    parser.add_argument("--condition_length", type=int, default=None,
                        help="prompt embedding length (default: 512 for UMT5, 32 for MiniLM)")
    parser.add_argument("--null_condition", default=None, choices=("empty", "zeros"),
                        help="unconditional embedding: the empty prompt's (default; loads the prompt encoder "
                             "once, which for UMT5-xxl is large) or zeros (the published model's choice)")
    parser.add_argument("--temporal_factor", type=int, default=1,
                        help="pixel-shuffle codec only: frames folded into channels (default 1)")
    parser.add_argument("--size", default=None, metavar="W*H", help="default frame size (Wan: 832*480)")
    parser.add_argument("--frame_num", type=int, default=None, help="default frame count (Wan: 81)")
    parser.add_argument("--fps", type=int, default=None, help="default frame rate (Wan: 16)")
    parser.add_argument("--sample_steps", type=int, default=None, help="default sampling steps (Wan: 50)")
    parser.add_argument("--sample_shift", type=float, default=None, help="default timestep shift (Wan: 5)")
    parser.add_argument("--sample_solver", default=None, choices=("euler", "heun", "dpmpp2m"),
                        help="default video solver (dpmpp2m)")
    parser.add_argument("--sample_guide_scale", type=float, default=None, help="default guidance (Wan: 5)")
    parser.add_argument("--device", default="cpu", help="where the null condition is computed (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="dtype of the stored transformer weights (default fp32)")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# Locating the parts
# --------------------------------------------------------------------------------------------


def _folder(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    folder = Path(path)
    if not folder.is_dir():
        raise ConvertError(f"{what} folder not found: {folder}")
    return folder.resolve()


def _pipeline_part(root: Path | None, name: str) -> Path | None:
    """`root/name` when `root` is a diffusers Wan pipeline folder that has it."""
    if root is not None and (root / name).is_dir():
        return (root / name).resolve()
    return None


def _transformer_folder(directory: Path) -> Path:
    if not (directory / "config.json").is_file() and (directory / "transformer" / "config.json").is_file():
        return directory / "transformer"
    return directory


def _read_config(spec: str):
    """--config: a preset name or a JSON file (original WanModel fields, or our TransformerConfig)."""
    from univigu.config import ConfigError, TransformerConfig, from_dict

    if spec in WAN_PRESETS:
        return dict(WAN_PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise ConvertError(f"--config must be one of {', '.join(WAN_PRESETS)} or a JSON file; {spec} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConvertError(f"--config {path} is not valid JSON: {err}") from None
    data.pop("_class_name", None)
    if "dim" in data or "num_heads" in data:  # the original WanModel fields
        return {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        return from_dict(TransformerConfig, {k: v for k, v in data.items() if not k.startswith("_")},
                         prefix="config")
    except ConfigError as err:
        raise ConvertError(f"--config {path}: {err}") from None


def _codec(in_channels: int, vae_dir: Path | None, normalize: bool, temporal_factor: int):
    """The codec to record: the Wan VAE by path, or the pixel-shuffle codec the channels imply."""
    from univigu.models.vae import LatentCodec, PixelShuffleCodec, WanVAECodec

    if vae_dir is not None:
        if not (vae_dir / "config.json").is_file():
            raise ConvertError(f"--vae_dir {vae_dir} is not a diffusers AutoencoderKLWan folder (no config.json)")
        try:
            vae_config = json.loads((vae_dir / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise ConvertError(f"{vae_dir / 'config.json'} is not valid JSON: {err}") from None
        z_dim = vae_config.get("z_dim")
        if z_dim is not None and z_dim != in_channels:
            raise ConvertError(f"the VAE in {vae_dir} makes {z_dim}-channel latents but the transformer "
                               f"takes {in_channels}")

        class RecordedWanVAE(LatentCodec):
            """Stands for the Wan VAE in the directory: only its settings are written (and its
            frame-size rule checked); `load_codec` loads the real one from the recorded path."""

            kind = "wan_vae"
            latent_channels = in_channels
            spatial_factor = int(vae_config.get("scale_factor_spatial")
                                 or 2 ** len(vae_config.get("temperal_downsample", [0, 0, 0])))
            temporal_factor = int(vae_config.get("scale_factor_temporal")
                                  or 2 ** sum(vae_config.get("temperal_downsample", [False, True, True])))
            check_frames = WanVAECodec.check_frames
            latent_frames = WanVAECodec.latent_frames

            @property
            def config(self) -> dict:
                return {"kind": "wan_vae", "path": str(vae_dir), "normalize": normalize}

        return RecordedWanVAE()
    tf = temporal_factor
    if tf < 1:
        raise ConvertError(f"--temporal_factor must be at least 1, got {tf}")
    factor = math.isqrt(in_channels // (3 * tf)) if in_channels % (3 * tf) == 0 else 0
    if factor < 1 or 3 * factor * factor * tf != in_channels:
        raise ConvertError(f"the transformer takes {in_channels}-channel latents: give --vae_dir (a diffusers "
                           f"AutoencoderKLWan folder); no pixel-shuffle codec makes {in_channels} channels "
                           f"with temporal factor {tf}")
    return PixelShuffleCodec(factor, tf)


def _prompt_encoder_config(text_dim: int, encoder_dir: Path | None, args, null_default: str):
    from univigu.config import PromptEncoderConfig

    null = args.null_condition or null_default
    if encoder_dir is not None:
        return PromptEncoderConfig(kind="umt5", path=str(encoder_dir), condition_length=args.condition_length or 512,
                                   null_condition=null)
    if text_dim == 384:
        return PromptEncoderConfig(kind="minilm", condition_length=args.condition_length or 32, null_condition=null)
    raise ConvertError(f"the transformer's prompt embeddings are {text_dim}-wide: give --text_encoder_dir (a UMT5 "
                       "folder or a diffusers Wan pipeline folder); only 384 (MiniLM) needs none")


def _null_condition(config, text_dim: int, device: str):
    import torch

    if config.null_condition == "zeros":  # no need to load the encoder
        return torch.zeros(1, config.condition_length, text_dim)
    from univigu.pipeline import resolve_device, shared_prompt_encoder

    encoder = shared_prompt_encoder(config, resolve_device(device))
    if encoder.embed_dim != text_dim:
        raise ConvertError(f"the prompt encoder ({config.kind}) makes {encoder.embed_dim}-wide embeddings but the "
                           f"transformer takes {text_dim}")
    return encoder.null_condition()[0].float().cpu()


def _find_tokenizer(args, *roots: Path | None):
    from univigu.models.text import TextTokenizer

    if args.tokenizer:
        path = Path(args.tokenizer)
        return TextTokenizer.load(path) if path.is_dir() and (path / "text_tokenizer.json").is_file() \
            else TextTokenizer.from_file(path)
    for root in roots:
        if root is None:
            continue
        for candidate in (root / "tokenizer" / "tokenizer.json", root / "tokenizer.json"):
            if candidate.is_file():
                return TextTokenizer.from_file(candidate)
    raise ConvertError("the published checkpoint's text stream needs its tokenizer: give --tokenizer "
                       "(the UMT5 tokenizer.json), or a --text_encoder_dir / --wan_base folder holding it")


def _fit_tokenizer(tokenizer, vocab_size: int):
    """The tokenizer limited to the text stream's vocabulary: the released model's vocabulary is
    the SentencePiece pieces, without the sentinel tokens a UMT5 tokenizer.json adds after them."""
    from univigu.models.text import TokenizerError

    if tokenizer.vocab_size <= vocab_size:
        return tokenizer
    try:
        return tokenizer.with_vocab_size(vocab_size)
    except TokenizerError as err:
        raise ConvertError(f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's text stream only "
                           f"{vocab_size}: {err}") from None


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    import torch

    from univigu.config import FlowConfig, SamplerConfig, TransformerConfig, WorldConfig, from_dict, to_dict
    from univigu.models.bundle import save_bundle
    from univigu.models.convert import load_diffusers_wan, load_original_wan

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from univigu.atomic import atomic_directory, check_writable

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file; give a folder for the model directory")
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"output folder {out} exists and is not empty")
    check_writable(out.parent / f"{out.name}.probe", "--out")
    if args.config is not None and args.original is None:
        raise ConvertError("--config goes with --original")
    if args.wan_base is not None and args.univigu_checkpoint is None:
        raise ConvertError("--wan_base goes with --univigu_checkpoint")
    if args.model_dir is not None:
        return _merge_into_model_dir(args, out)
    width, height = parse_size(args.size)
    vae_dir = _folder(args.vae_dir, "--vae_dir")
    encoder_dir = _folder(args.text_encoder_dir, "--text_encoder_dir")
    tokenizer = None
    flow = FlowConfig()
    normalize, null_default = True, "empty"
    sampler_defaults = {}

    if args.wan_dir is not None:
        root = _folder(args.wan_dir, "--wan_dir")
        transformer = load_diffusers_wan(_transformer_folder(root), dtype=dtype)
        vae_dir = vae_dir or _pipeline_part(root, "vae")
        encoder_dir = encoder_dir or (root if _pipeline_part(root, "text_encoder") else None)
        source = f"diffusers Wan {root}"
    elif args.original is not None:
        path = Path(args.original)
        if not path.exists():
            raise ConvertError(f"checkpoint not found: {path}")
        config = _read_config(args.config) if args.config else None
        if config is None and not (path.is_dir() and (path / "config.json").is_file()):
            raise ConvertError(f"{path} carries no config: give --config ({', '.join(WAN_PRESETS)} or a JSON file)")
        if isinstance(config, TransformerConfig):
            config = from_dict(TransformerConfig, {**to_dict(config), "vocab_size": 0})
        transformer = load_original_wan(path, config, dtype=dtype)
        source = f"original Wan {path}"
    else:
        from univigu.models.published import load_published_univigu

        base = _folder(args.wan_base, "--wan_base")
        transformer, settings = load_published_univigu(args.univigu_checkpoint, base, text_length=args.text_length,
                                                       masked=args.masked, num_attention_heads=args.num_heads,
                                                       dtype=dtype)
        vae_dir = vae_dir or _pipeline_part(base, "vae")
        encoder_dir = encoder_dir or (base if _pipeline_part(base, "text_encoder") else None)
        if vae_dir is None:
            raise ConvertError("the published checkpoint runs on Wan VAE latents: give --vae_dir (a diffusers "
                               "AutoencoderKLWan folder) or a --wan_base pipeline folder with vae/")
        if encoder_dir is None:
            raise ConvertError("the published checkpoint is conditioned on UMT5: give --text_encoder_dir (or a "
                               "--wan_base pipeline folder with text_encoder/)")
        tokenizer = _fit_tokenizer(_find_tokenizer(args, encoder_dir, base), transformer.config.vocab_size)
        flow = from_dict(FlowConfig, {**to_dict(flow), **settings["flow"]})
        normalize = settings["codec"]["normalize"]
        null_default = settings["prompt_encoder"]["null_condition"]
        sampler_defaults = settings["sampler"]
        source = f"published Uni-ViGU {args.univigu_checkpoint}"

    _merge_loras(transformer, args.merge_lora)
    cfg = transformer.config
    codec = _codec(cfg.in_channels, vae_dir, normalize, args.temporal_factor)
    encoder_config = _prompt_encoder_config(cfg.text_dim, encoder_dir, args, null_default)
    null = _null_condition(encoder_config, cfg.text_dim, args.device)

    wan_like = codec.kind == "wan_vae"
    world = {**to_dict(WorldConfig()), **(WAN_WORLD if wan_like else {})}
    world.update({k: v for k, v in (("width", width), ("height", height), ("frames", args.frame_num),
                                    ("fps", args.fps)) if v is not None})
    sampler = {**to_dict(SamplerConfig()), **(WAN_SAMPLER if wan_like else {}), **sampler_defaults}
    sampler.update({k: v for k, v in (("video_steps", args.sample_steps), ("shift", args.sample_shift),
                                      ("video_solver", args.sample_solver),
                                      ("guidance_scale", args.sample_guide_scale)) if v is not None})
    world, sampler = from_dict(WorldConfig, world, prefix="world"), from_dict(SamplerConfig, sampler, prefix="sampler")
    try:
        codec.check_frames(world.frames, world.height, world.width, patch=max(cfg.patch_size[1:]))
    except ValueError as err:
        raise ConvertError(f"default video size {world.width}x{world.height}x{world.frames}: {err}") from None

    with atomic_directory(out) as tmp:  # the folder appears complete under its name, or not at all
        save_bundle(tmp, transformer, codec, encoder_config, null, tokenizer, world, sampler, flow)
    kind = "unified (T2V, V2T, joint)" if transformer.has_text_stream else \
        "video-only (T2V); add the text stream with `univigu train` (knowledge_recall, train.init_from=OUT)"
    print(f"converted {source}")
    print(f"model directory: {out}  [{kind}]")
    print(f"codec: {codec.kind}{' ' + str(vae_dir) if vae_dir else ''}; prompt encoder: {encoder_config.kind}"
          f"{' ' + str(encoder_dir) if encoder_dir else ''}")
    return 0


def _merge_loras(transformer, values: list[str]) -> None:
    """Apply each --merge_lora PATH[:SCALE] and merge them all into the plain weights (in place)."""
    from univigu.models import lora

    from .generate import parse_lora

    for i, value in enumerate(values):
        path, scale = parse_lora(value)
        if not path.exists():
            raise ConvertError(f"--merge_lora: not found: {path}")
        try:
            lora.load_adapter(transformer, path, f"merge_{i}", scale=scale)
        except lora.LoraError as err:
            raise ConvertError(f"--merge_lora {value}: {err}") from None
    if values:
        lora.unload(transformer, merge=True)


def _merge_into_model_dir(args, out: Path) -> int:
    """--model_dir DIR --merge_lora ...: the same model directory with the LoRAs merged in."""
    from univigu.models.bundle import load_bundle, save_bundle

    if not args.merge_lora:
        raise ConvertError("--model_dir converts nothing by itself: give --merge_lora PATH[:SCALE]")
    directory = _folder(args.model_dir, "--model_dir")
    try:
        bundle = load_bundle(directory)
    except (OSError, ValueError) as err:
        raise ConvertError(f"--model_dir {directory}: {err}") from None
    _merge_loras(bundle.transformer, args.merge_lora)
    save_bundle(out, bundle.transformer, bundle.codec, bundle.prompt_encoder_config, bundle.null_condition,
                bundle.tokenizer, bundle.world, bundle.sampler, bundle.flow)
    print(f"merged {len(args.merge_lora)} LoRA(s) into {directory}")
    print(f"model directory: {out}")
    return 0
