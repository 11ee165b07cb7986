"""`UniViGUPipeline`: text-to-video, video-to-text and joint generation with one unified model.

```python
pipe = UniViGUPipeline.from_pretrained("runs/unified/model")
video = pipe.generate("a small red circle moves to the left", seed=0).frames[0]  # uint8 [F, H, W, 3]
text = pipe.caption("clip.mp4").captions[0]
both = pipe.joint("a large blue square moves up", seed=1)                          # frames + captions
```

The pipeline owns no sampling logic; it wires the parts of a model directory (`models/bundle.py`)
to the samplers (`flow/samplers.py`) with the task semantics of DESIGN.md section 4:

* **T2V**: the video ODE runs from noise with the prompt embedding as condition and, when the model
  has a text stream, the prompt (tokenised by the text-stream tokenizer) in the text stream, clean
  (text timestep 0). Guidance's unconditional branch is the stored null condition (or the negative
  prompt) with a fully noised text stream; the sampler builds it.
* **V2T**: the text sampler runs with the clean video latents and the stored *null* condition.
* **Joint**: both modalities advance from noise on one grid, conditioned on the prompt.

Sample `i` of a batch draws its noise only from `torch.Generator().manual_seed(seed_i)`, where
`seed_i = seed + i` for an integer `seed` (or the i-th of a list), so results do not depend on the
batch they were computed in. Defaults (steps, solver, shift, guidance) come from the directory's
`sampler.json`; frame count and size from its `world.json`.

Precision: the weights stay in fp32; `dtype=torch.bfloat16` runs the model under bf16 autocast
(norms, modulation, RoPE and timestep embeddings stay fp32). The default is bf16 only where it is
fast (CUDA with bf16, or an AVX-512 CPU); on AVX2-only CPUs bf16 is emulated and ~100x slower.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import FlowConfig, PromptEncoderConfig, SamplerConfig, WorldConfig
from .flow.paths import MixtureTextPath
from .flow.options import JointSamplerOptions, TextSamplerOptions, VideoSamplerOptions
from .flow.samplers import sample_joint, sample_video
from .flow.verify import Captioner, video_flow_loss
from .models.bundle import Bundle, load_bundle, save_bundle
from .models.text import PromptEncoder, TextTokenizer, shared_prompt_encoder
from .models.transformer import UniViGUTransformer
from .models.vae import CodecError, LatentCodec
from .precision import autocast, bf16_is_fast


class PipelineError(ValueError):
    """Bad input to the pipeline (empty prompt, a size the codec cannot take, a task the model lacks)."""


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    """Text-to-video results, one entry per prompt."""

    frames: list[np.ndarray]  # uint8 [F, H, W, 3] each
    latents: torch.Tensor  # float32 [B, C, F', H', W'] on the CPU
    captions: list[str] | None  # with_caption=True: the model's own caption of each video
    seeds: list[int]
    nfe: int  # model evaluations (a batched guidance call counts once)


@dataclass
class CaptionOutput:
    """Video-to-text results, one entry per video."""

    captions: list[str]
    tokens: torch.Tensor  # long [B, L], the whole canvas
    seeds: list[int]
    # Text-sampler model evaluations per caption: K times the sampler's with K candidates (the
    # verification's flow-loss forwards, at most K per noise level, are not counted).
    nfe: int
    # Per video, its K candidate captions (the sampler's first, then the temperature-1 draws) and
    # their verification scores: the video flow loss under each (lower = more likely; the kept
    # caption has the lowest). None where a candidate was not scored: a repeat of an earlier one,
    # or every candidate of the video agreeing (K = 1 included).
    candidates: list[list[str]] | None = None
    candidate_scores: list[list[float | None]] | None = None


@dataclass
class JointOutput:
    """Joint generation results, one entry per prompt."""

    frames: list[np.ndarray]
    captions: list[str]
    latents: torch.Tensor
    tokens: torch.Tensor
    seeds: list[int]
    nfe: int


# --------------------------------------------------------------------------------------------
# Device, dtype, shared prompt encoders
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None -> CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise PipelineError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device} requested but CUDA is not available here")
    return device


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The compute dtype: None / "auto" -> bf16 where it is fast, else fp32."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise PipelineError(f"unknown dtype {dtype!r} (use auto, fp32 or bf16)")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16):
        raise PipelineError(f"dtype {dtype} is not supported (use fp32 or bf16; fp16 is never used)")
    if dtype == torch.bfloat16 and not bf16_is_fast(device):
        warnings.warn(f"bf16 on {device} without fast bf16 kernels is emulated and much slower than fp32",
                      stacklevel=3)
    return dtype


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    try:
        prompts = list(prompts)
    except TypeError:
        raise PipelineError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}") from None
    if not prompts:
        raise PipelineError(f"{name} list is empty: give at least one prompt")
    for i, text in enumerate(prompts):
        where = name if len(prompts) == 1 else f"{name} {i}"
        if not isinstance(text, str):
            raise PipelineError(f"{where} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise PipelineError(f"{where} is empty: describe the video to generate")
    return prompts


def _seed_list(seed: int | Sequence[int], batch: int) -> list[int]:
    def check(value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise PipelineError(f"seed must be an integer, got {value!r}")
        return int(value)

    if isinstance(seed, (list, tuple)):
        seeds = [check(s) for s in seed]
        if len(seeds) != batch:
            raise PipelineError(f"got {len(seeds)} seeds for {batch} inputs")
        return seeds
    base = check(seed)
    return [base + i for i in range(batch)]


def _overrides(**values) -> dict:
    """Keyword arguments that were actually given (None = use the stored default)."""
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class UniViGUPipeline:
    """Everything needed to run a unified model: transformer, codec, prompt encoder (built on first
    use), text tokenizer, null condition and defaults. See the module docstring."""

    def __init__(self, transformer: UniViGUTransformer, codec: LatentCodec,
                 prompt_encoder_config: PromptEncoderConfig, null_condition: torch.Tensor,
                 tokenizer: TextTokenizer | None = None, world: WorldConfig | None = None,
                 sampler: SamplerConfig | None = None, flow: FlowConfig | None = None, *,
                 prompt_encoder: PromptEncoder | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, progress: bool = False):
        self.transformer = transformer.eval().requires_grad_(False)
        self.codec = codec.eval()
        self.prompt_encoder_config = prompt_encoder_config
        self.tokenizer = tokenizer
        self.world = world or WorldConfig()
        self.sampler = sampler or SamplerConfig()
        self.flow = flow or FlowConfig()
        self.progress = progress
        self._prompt_encoder = prompt_encoder
        cfg = transformer.config
        null_condition = torch.as_tensor(null_condition).float()
        if null_condition.ndim == 2:
            null_condition = null_condition[None]
        if null_condition.ndim != 3 or null_condition.shape[0] != 1 or null_condition.shape[-1] != cfg.text_dim:
            raise PipelineError(f"null condition must be [1, Lc, {cfg.text_dim}] (the transformer's text_dim), "
                                f"got {list(null_condition.shape)}")
        self.null_condition = null_condition
        if codec.latent_channels != cfg.in_channels:
            raise PipelineError(f"the codec makes {codec.latent_channels}-channel latents but the transformer "
                                f"takes {cfg.in_channels} channels")
        self.text_path: MixtureTextPath | None = None
        if transformer.has_text_stream:
            if tokenizer is None:
                raise PipelineError("the transformer has a text stream but the model has no text tokenizer")
            if tokenizer.vocab_size > cfg.vocab_size:
                raise PipelineError(f"the tokenizer has {tokenizer.vocab_size} ids but the text stream only "
                                    f"{cfg.vocab_size}")
            if self.flow.text_source == "mask" and not cfg.mask_token:
                raise PipelineError("flow.text_source is 'mask' but the transformer has no mask id "
                                    "(mask_token=false); set text_source to 'uniform'")
            self.text_path = MixtureTextPath.from_config(self.flow, cfg.vocab_size, tokenizer.special_ids)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.to(device, dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs) -> "UniViGUPipeline":
        return cls(bundle.transformer, bundle.codec, bundle.prompt_encoder_config, bundle.null_condition,
                   bundle.tokenizer, bundle.world, bundle.sampler, bundle.flow, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None, *, prompt_encoder: PromptEncoder | None = None,
                        progress: bool = False) -> "UniViGUPipeline":
        """Load a model directory (`save_pretrained` / training output). The prompt encoder is
        built on first use (or pass an already built one)."""
        device = resolve_device(device)
        return cls.from_bundle(load_bundle(directory, device="cpu"), prompt_encoder=prompt_encoder,
                               device=device, dtype=dtype, progress=progress)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model directory (one subfolder per component and model_index.json); loaded
        LoRA adapters are written merged in, at their current weights."""
        transformer = self.transformer
        if getattr(transformer, "peft_config", None):
            import copy

            from .models.lora import unload

            transformer = unload(copy.deepcopy(transformer), merge=True)
        return save_bundle(directory, transformer, self.codec, self.prompt_encoder_config,
                           self.null_condition, self.tokenizer, self.world, self.sampler, self.flow)

    def to(self, device: str | torch.device | None = None,
           dtype: str | torch.dtype | None = None) -> "UniViGUPipeline":
        """Move the model to `device` and set the compute dtype (weights stay fp32)."""
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.transformer.to(self.device)
        self.codec.to(self.device)
        self.null_condition = self.null_condition.to(self.device)
        if self._prompt_encoder is not None:
            self._prompt_encoder.to(self.device)
        return self

    @property
    def prompt_encoder(self) -> PromptEncoder:
        """The prompt encoder, loaded on first use (it is the slowest component to load)."""
        if self._prompt_encoder is None:
            self._prompt_encoder = shared_prompt_encoder(self.prompt_encoder_config, self.device)
        return self._prompt_encoder

    @property
    def has_text_stream(self) -> bool:
        return self.text_path is not None

    def __repr__(self) -> str:
        cfg = self.transformer.config
        return (f"UniViGUPipeline(layers={cfg.num_layers}, width={cfg.inner_dim}, vocab={cfg.vocab_size}, "
                f"codec={self.codec.kind}, prompt_encoder={self.prompt_encoder_config.kind}, "
                f"world={self.world.width}x{self.world.height}x{self.world.frames}, device={self.device}, "
                f"dtype={self.dtype})")

    # ------------------------------------------------------------------ helpers
    def _autocast(self):
        return autocast(self.device, self.dtype == torch.bfloat16)

    def _require_text_stream(self, task: str) -> None:
        if not self.has_text_stream:
            raise PipelineError(f"{task} needs a text stream, but this model is video-only (a generator); "
                                "grow it with `univigu train` stage knowledge_recall first")

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt embeddings [B, Lc, D] on the pipeline's device."""
        embeddings, _ = self.prompt_encoder.encode(list(prompts))
        return embeddings.to(self.device, torch.float32)

    def video_size(self, num_frames: int | None = None, height: int | None = None,
                   width: int | None = None) -> tuple[int, int, int]:
        """(frames, height, width), defaulting to the model's world, checked against the codec and
        the transformer's patch size; one clear PipelineError otherwise."""
        frames = self.world.frames if num_frames is None else num_frames
        height = self.world.height if height is None else height
        width = self.world.width if width is None else width
        for name, value in (("frame count", frames), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PipelineError(f"{name} must be a positive integer, got {value!r}")
        frames, height, width = int(frames), int(height), int(width)
        pt, ph, pw = self.transformer.config.patch_size
        try:
            self.codec.check_frames(frames, height, width, patch=max(ph, pw))
        except CodecError as err:
            raise PipelineError(f"cannot make {frames} frames of width {width} and height {height}: {err}") from None
        latent_frames = self.codec.latent_frames(frames)
        if latent_frames % pt:
            raise PipelineError(f"cannot make {frames} frames: they give {latent_frames} latent frames, not "
                                f"divisible by the transformer's temporal patch {pt}")
        return frames, height, width

    def _video_options(self, steps, guidance_scale, shift, solver) -> VideoSamplerOptions:
        if solver == "dpm++":  # Wan's name for its DPM-Solver++ option
            solver = "dpmpp2m"
        return VideoSamplerOptions.from_config(self.sampler, progress=self.progress, **_overrides(
            steps=steps, guidance_scale=guidance_scale, shift=shift, solver=solver))

    def _text_options(self, steps=None, sampler=None, guidance_scale=None, temperature=None) -> TextSamplerOptions:
        return TextSamplerOptions.from_config(self.sampler, progress=self.progress, **_overrides(
            steps=steps, sampler=sampler, guidance_scale=guidance_scale, temperature=temperature))

    def _negative_condition(self, negative_prompt, batch: int) -> torch.Tensor | None:
        if negative_prompt is None:
            return None
        negatives = _prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * batch
        if len(negatives) != batch:
            raise PipelineError(f"got {len(negatives)} negative prompts for {batch} prompts")
        return self.encode_prompts(negatives)

    def decode_latents(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents [B, C, F', H', W'] -> uint8 frames [F, H, W, 3] per sample."""
        from .data.video_io import tensor_to_frames

        with torch.no_grad(), self._autocast():
            video = self.codec.decode(latents.to(self.device)).float()
        return [tensor_to_frames(v) for v in video]

    def captioner(self) -> Captioner:
        """V2T with verification (flow/verify.py), the path `univigu eval` and validation share."""
        self._require_text_stream("captioning")
        length = self.transformer.config.text_length

        def encode_text(captions: list[str]) -> torch.Tensor:
            return self.tokenizer.encode(captions, length, truncate=True).to(self.device)

        return Captioner(null_condition=self.null_condition, path=self.text_path, text_length=length,
                         eos_id=self.tokenizer.eos_id, decode=self.tokenizer.decode,
                         encode_prompts=self.encode_prompts, encode_text=encode_text,
                         skip_ids=self.tokenizer.special_ids, levels=self.sampler.verify_levels)

    def _caption_latents(self, latents: torch.Tensor, seeds: list[int], options: TextSamplerOptions,
                         candidates: int | None = None, details: dict | None = None):
        """Captions of clean latents; with `candidates` > 1 (default sampler.json), the one of that
        many per video that the model's own video flow finds most likely (flow/verify.py). A
        `details` dict receives each video's "candidates" and their "scores" (see CaptionOutput)."""
        k = self.sampler.caption_candidates if candidates is None else candidates
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PipelineError(f"candidates must be a positive integer, got {k!r}")
        with torch.no_grad(), self._autocast():
            return self.captioner().caption(self.transformer, latents, seeds, options, candidates=k,
                                            details=details)

    def caption_flow_loss(self, latents: torch.Tensor, captions: Sequence[str], seeds: Sequence[int],
                          levels: Sequence[float] | None = None) -> torch.Tensor:
        """The model's text-to-video flow-matching loss [B] of each clean latent under its caption,
        at `levels` (default sampler.json's verify_levels); rows with the same seed see the same
        noise (flow/verify.py). Lower: the generator finds the caption more likely."""
        with torch.no_grad(), self._autocast():
            if not self.has_text_stream:  # a generator scores captions as prompts only
                return video_flow_loss(self.transformer, latents.to(self.device), None, self.encode_prompts(captions),
                                       seeds, levels=self.sampler.verify_levels if levels is None else levels)
            return self.captioner().flow_loss(self.transformer, latents.to(self.device), captions, seeds, levels)

    def _step_callback(self, callback):
        """diffusers' `callback_on_step_end` for the samplers: `callback(pipe, step, s, state)` after
        step `step` (0-based) at noise level `s`, with `state` holding "video" (latents after the
        step), "prediction" (the clean latents the step predicts) and, in joint generation,
        "tokens" (the text canvas; masked positions hold `tokenizer.mask_id`). A dict it returns
        replaces those entries; raising from it stops sampling."""
        if callback is None:
            return None
        if not callable(callback):
            raise PipelineError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
        return lambda step, s, state: callback(self, step, s, state)

    # ------------------------------------------------------------------ T2V
    def generate(self, prompt: str | Sequence[str], num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                 shift: float | None = None, solver: str | None = None,
                 negative_prompt: str | Sequence[str] | None = None, seed: int | Sequence[int] = 0,
                 with_caption: bool = False, stream_text: str | Sequence[str] | None = None,
                 callback_on_step_end=None) -> GenerationOutput:
        """Text-to-video for one prompt or a list of prompts.

        Args:
            prompt: a prompt or a list of prompts (one video each).
            num_frames / height / width: video size (default: the model's world).
            steps / guidance_scale / shift / solver: video sampler settings (default: sampler.json);
                solver is euler, heun or dpmpp2m (Wan's "dpm++" is accepted).
            negative_prompt: replaces the null condition in the guidance branch.
            seed: an integer (sample i uses seed + i) or one seed per prompt.
            with_caption: also caption each generated video with the model (V2T on its latents,
                with the same seeds).
            stream_text: what the clean text stream holds (default: the prompt). A model trained
                with Capability Refinement saw detailed captions there; give them when known.
            callback_on_step_end: `callback(pipe, step, s, state)` after each video step (see
                `_step_callback`).
        """
        prompts = _prompt_list(prompt)
        batch = len(prompts)
        seeds = _seed_list(seed, batch)
        frames, height, width = self.video_size(num_frames, height, width)
        options = self._video_options(steps, guidance_scale, shift, solver)
        if with_caption:
            self._require_text_stream("with_caption")
        shape = (batch, *self.codec.latent_shape(frames, height, width))
        text = None
        if self.has_text_stream:
            # T2V keeps the prompt in the clean text stream (DESIGN.md section 4).
            texts = prompts if stream_text is None else _prompt_list(stream_text, "stream_text")
            if len(texts) != batch:
                raise PipelineError(f"got {len(texts)} stream texts for {batch} prompts")
            text = self.tokenizer.encode(texts, self.transformer.config.text_length, truncate=True)
            text = text.to(self.device)
        condition = self.encode_prompts(prompts)
        negative = self._negative_condition(negative_prompt, batch)
        with torch.no_grad(), self._autocast():
            sample = sample_video(self.transformer, shape, condition, self.null_condition, text=text,
                                  text_path=self.text_path, options=options, negative_condition=negative,
                                  seeds=seeds, device=self.device,
                                  callback_on_step_end=self._step_callback(callback_on_step_end))
        latents = sample.video.float()
        captions, nfe = None, sample.nfe
        if with_caption:
            captions, text_sample = self._caption_latents(latents, seeds, self._text_options())
            nfe += text_sample.nfe
        return GenerationOutput(frames=self.decode_latents(latents), latents=latents.cpu(), captions=captions,
                                seeds=seeds, nfe=nfe)

    __call__ = generate

    # ------------------------------------------------------------------ V2T
    def load_videos(self, video, num_frames: int | None = None, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
        """Videos -> float tensor [B, 3, F, H, W] in [-1, 1] on the pipeline's device.

        Accepts a tensor [3, F, H, W] or [B, 3, F, H, W] in [-1, 1], a uint8 array [F, H, W, 3], a
        file path, or a list of these. Files are sampled to `num_frames` evenly spaced frames and
        resized (cover + centre crop) to `width` x `height` (default: the model's world); tensors
        and arrays are taken as they are.
        """
        from .data.video_io import frames_to_tensor, load_video_tensor

        items = video if isinstance(video, (list, tuple)) else [video]
        if not items:
            raise PipelineError("no video given")
        if isinstance(video, torch.Tensor) and video.ndim == 5:
            items = list(video)
        elif isinstance(video, np.ndarray) and video.ndim == 5:
            items = list(video)
        need_file_size = any(isinstance(v, (str, Path)) for v in items)
        if need_file_size:
            num_frames, height, width = self.video_size(num_frames, height, width)
        tensors = []
        for item in items:
            if isinstance(item, (str, Path)):
                tensors.append(load_video_tensor(item, num_frames=num_frames, size=(width, height)))
            elif isinstance(item, np.ndarray):
                tensors.append(frames_to_tensor(item))
            elif isinstance(item, torch.Tensor):
                if item.ndim != 4 or item.shape[0] != 3 or not item.is_floating_point():
                    raise PipelineError(f"a video tensor must be float [3, F, H, W] (or [B, 3, F, H, W]) in "
                                        f"[-1, 1], got {item.dtype} {list(item.shape)}")
                tensors.append(item.float())
            else:
                raise PipelineError(f"cannot caption a {type(item).__name__}: give a file path, a float tensor "
                                    "[3, F, H, W] in [-1, 1] or uint8 frames [F, H, W, 3]")
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise PipelineError(f"videos in one batch must have one size, got {sorted(shapes)}")
        _, f, h, w = tensors[0].shape
        self.video_size(f, h, w)  # the codec and patchifier must take it
        return torch.stack(tensors).to(self.device)

    def caption(self, video, steps: int | None = None, sampler: str | None = None, seed: int | Sequence[int] = 0,
                guidance_scale: float | None = None, temperature: float | None = None,
                num_frames: int | None = None, height: int | None = None, width: int | None = None,
                candidates: int | None = None) -> CaptionOutput:
        """Video-to-text: caption one video or a batch (see `load_videos` for accepted inputs).

        The text sampler (`euler` or `confidence`, default sampler.json) runs on the clean video
        latents with the stored null condition. `guidance_scale` is the text guidance against the
        branch without video (1 = none). With `candidates` K > 1 (default sampler.json's
        caption_candidates) it draws K captions per video, the first as above and the rest at
        temperature 1, and keeps the one under which the model's own text-to-video flow loss on
        the video is lowest: the generator verifies the caption (flow/verify.py).
        """
        self._require_text_stream("captioning")
        options = self._text_options(steps, sampler, guidance_scale, temperature)
        videos = self.load_videos(video, num_frames, height, width)
        seeds = _seed_list(seed, videos.shape[0])
        with torch.no_grad(), self._autocast():
            latents = self.codec.encode(videos).float()
        details: dict = {}
        captions, sample = self._caption_latents(latents, seeds, options, candidates, details)
        return CaptionOutput(captions=captions, tokens=sample.tokens.cpu(), seeds=seeds, nfe=sample.nfe,
                             candidates=details["candidates"], candidate_scores=details["scores"])

    # ------------------------------------------------------------------ joint
    def joint(self, prompt: str | Sequence[str], num_frames: int | None = None, height: int | None = None,
              width: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
              shift: float | None = None, solver: str | None = None,
              negative_prompt: str | Sequence[str] | None = None, seed: int | Sequence[int] = 0,
              text_sampler: str | None = None, text_guidance_scale: float | None = None,
              temperature: float | None = None, text_grid: str = "video",
              callback_on_step_end=None) -> JointOutput:
        """Generate a video and its caption together from each prompt (T2VT).

        Both modalities start from noise and advance on one grid of `steps` steps; the video gets
        guidance `guidance_scale` (null/negative condition with fully noised text), the text its
        own sampler update (`text_sampler`) and optional guidance against the branch without video.
        `text_grid` "video" moves text on the video's shifted grid, "linear" on an unshifted one.
        `callback_on_step_end(pipe, step, s, state)` sees the video latents and the text canvas
        after each step (see `_step_callback`): how the two co-evolve.
        """
        self._require_text_stream("joint generation")
        prompts = _prompt_list(prompt)
        batch = len(prompts)
        seeds = _seed_list(seed, batch)
        frames, height, width = self.video_size(num_frames, height, width)
        options = JointSamplerOptions(
            video=self._video_options(steps, guidance_scale, shift, solver),
            text=self._text_options(sampler=text_sampler, guidance_scale=text_guidance_scale,
                                    temperature=temperature),
            text_grid=text_grid)
        shape = (batch, *self.codec.latent_shape(frames, height, width))
        condition = self.encode_prompts(prompts)
        negative = self._negative_condition(negative_prompt, batch)
        with torch.no_grad(), self._autocast():
            sample = sample_joint(self.transformer, shape, self.transformer.config.text_length, condition,
                                  self.null_condition, path=self.text_path, eos_id=self.tokenizer.eos_id,
                                  options=options, negative_condition=negative, seeds=seeds,
                                  skip_ids=self.tokenizer.special_ids, device=self.device,
                                  callback_on_step_end=self._step_callback(callback_on_step_end))
        latents = sample.video.float()
        return JointOutput(frames=self.decode_latents(latents), captions=self.tokenizer.decode(sample.tokens.cpu()),
                           latents=latents.cpu(), tokens=sample.tokens.cpu(), seeds=seeds, nfe=sample.nfe)

    # ------------------------------------------------------------------ LoRA adapters
    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None,
                          scale: float = 1.0) -> str:
        """Apply a LoRA (peft's folder, a diffusers Wan LoRA file or one with original Wan keys;
        `models/lora.py`) to the transformer as adapter `adapter_name` (default `default_N`), at
        `scale`. Active beside those already loaded; returns its name."""
        from .models import lora

        existing = lora.adapter_names(self.transformer)
        if adapter_name is None:
            adapter_name = f"default_{len(existing)}"
        if any(layer.merged for _, layer in lora.lora_layers(self.transformer)):
            raise PipelineError("unfuse_lora() before loading another LoRA")
        lora.load_adapter(self.transformer, path, adapter_name, scale=scale)
        self.transformer.to(self.device).eval()
        return adapter_name

    def get_list_adapters(self) -> list[str]:
        from .models import lora

        return lora.adapter_names(self.transformer)

    def get_active_adapters(self) -> list[str]:
        from .models import lora

        return lora.active_adapters(self.transformer)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None):
        """Activate these adapters (the others are off), each at its weight (default 1)."""
        from .models import lora

        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if isinstance(adapter_weights, (int, float)):
            adapter_weights = [float(adapter_weights)] * len(names)
        lora.set_adapters(self.transformer, names, adapter_weights)

    def fuse_lora(self, adapter_names: Sequence[str] | None = None) -> None:
        """Merge the active (or the named) adapters into the weights: the same outputs, no adapter
        cost per forward; `unfuse_lora` takes them out again."""
        from .models import lora

        lora.fuse(self.transformer, None if adapter_names is None else list(adapter_names))

    def unfuse_lora(self) -> None:
        from .models import lora

        lora.unfuse(self.transformer)

    def unload_lora_weights(self, merge: bool = False) -> None:
        """Remove every adapter (merged into the weights first when `merge`): a plain transformer."""
        from .models import lora

        lora.unload(self.transformer, merge=merge)


__all__ = ["UniViGUPipeline", "PipelineError", "GenerationOutput", "CaptionOutput", "JointOutput",
           "resolve_device", "resolve_dtype", "bf16_is_fast", "shared_prompt_encoder"]
