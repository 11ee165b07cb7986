"""Validation during training: fixed-noise losses per modality and ShapesWorld oracle metrics.

* `Validator.losses` — the video loss (T2V: clean text stream, prompt condition) and the text loss
  (V2T: clean video, null condition) on a held-out set with noise levels, noise and masks fixed by
  the seed (sample i sits at noise level (i + 1/2) / N), so values from different steps and runs
  are comparable. `val.loss = val.video_loss + lambda * val.text_loss`.
* `Validator.oracle` — ShapesWorld only: T2V videos sampled from the prompts are read back by the
  pixel oracle; V2T captions are sampled with the NULL condition (so Knowledge Recall cannot pass by
  copying the prompt from the condition), each the best of `sampler.caption_candidates` through the
  pipeline's own captioning path (`flow.verify.Captioner`), and parsed; both are scored against
  the true attributes (`evaluation.shapesworld_metrics`).
* `Validator.samples` — GIFs and captions of a few fixed prompts and videos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.video_io import tensor_to_frames
from ..flow.losses import joint_loss
from ..flow.paths import RectifiedFlowPath, noise_level_to_timestep
from ..flow.options import TextSamplerOptions, VideoSamplerOptions
from ..flow.samplers import sample_video
from ..flow.verify import Captioner
from ..models.text import shared_prompt_encoder
from ..precision import autocast
from .logging import write_samples


def validation_generator(seed: int, index: int) -> torch.Generator:
    """RNG of held-out sample `index` (4 words: never equal to a training sample's (seed, step, id))."""
    mixed = np.random.SeedSequence([seed, 0, index, 1]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def _eval_mode(model) -> None:
    if isinstance(model, torch.nn.Module):  # samplers also take plain callables
        model.eval()


@dataclass
class ValidationData:
    latents: torch.Tensor  # clean latents [N, C, F, H, W] (one size)
    condition: torch.Tensor  # prompt embeddings [N, Lc, D]
    prompts: list[str]
    captions: list[str]
    truths: list[list[dict]] | None = None  # ShapesWorld attributes; None for real data

    def __len__(self) -> int:
        return len(self.prompts)


def validation_data(source, codec, prompts, num_samples: int) -> ValidationData:
    """The held-out samples validation uses: all of a ShapesWorld set; for real data the clips of
    its first bucket (one size), at most `num_samples`."""
    index = np.arange(len(source))
    if hasattr(source, "bucket_of"):
        index = index[source.bucket_of == source.bucket_of[0]][:num_samples]
    truths = getattr(source, "truths", None)
    return ValidationData(latents=source.latents(index, codec),
                          condition=prompts([source.prompts[i] for i in index]),
                          prompts=[source.prompts[i] for i in index],
                          captions=[source.captions[i] for i in index],
                          truths=None if truths is None else [truths[i] for i in index])


class Validator:
    """Runs validation of one stage on a fixed held-out set (rank 0 only, on a plain model)."""

    def __init__(self, data: ValidationData, *, stage: str, codec, null_condition: torch.Tensor, tokenizer,
                 text_path, flow_config, sampler_config, world, text_length: int, seed: int,
                 device: torch.device, bf16: bool = False, batch_size: int = 16, prompt_encoder_config=None):
        self.data, self.stage, self.codec = data, stage, codec
        self.null = null_condition.float()
        self.tokenizer, self.text_path = tokenizer, text_path
        self.flow, self.sampler, self.world = flow_config, sampler_config, world
        self.text_length, self.seed = text_length, seed
        self.device, self.bf16, self.batch_size = torch.device(device), bf16, batch_size
        self.prompt_encoder_config = prompt_encoder_config
        self.text = None
        if tokenizer is not None:
            source = data.prompts if stage == "knowledge_recall" else data.captions
            self.text = tokenizer.encode(source, text_length, truncate=True)

    def _autocast(self):
        return autocast(self.device, self.bf16)

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield np.arange(start, min(n, start + self.batch_size))

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def losses(self, model) -> dict[str, float]:
        _eval_mode(model)
        n, dev = len(self.data), self.device
        levels = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        gens = [validation_generator(self.seed, i) for i in range(n)]
        path = RectifiedFlowPath()
        video_sum = text_sum = 0.0
        text_count = 0.0
        for idx in self._chunks(n):
            clean = self.data.latents[idx]
            s = levels[idx]
            noise = torch.stack([torch.randn(clean.shape[1:], generator=gens[i]) for i in idx])
            sample = path.sample(clean, s, noise=noise)
            text = None if self.text is None else self.text[idx].to(dev)
            zeros = torch.zeros(len(idx))
            timestep = noise_level_to_timestep(s).to(dev)
            with self._autocast():
                velocity, _ = model(sample.noisy.to(dev), text, timestep,
                                    None if text is None else zeros.to(dev), self.data.condition[idx].to(dev))
            video_sum += float(joint_loss(velocity=velocity, video_target=sample.target.to(dev),
                                          video_noise_level=s.to(dev)).video_sum)
            if self.text is None:
                continue
            noisy = torch.cat([self.text_path.sample(self.text[i:i + 1], s[j:j + 1], generator=gens[i]).noisy
                               for j, i in enumerate(idx)])
            null = self.null.expand(len(idx), *self.null.shape[-2:])
            with self._autocast():
                _, logits = model(clean.to(dev), noisy.to(dev), zeros.to(dev), timestep, null.to(dev))
            result = joint_loss(logits=logits, text_target=text, text_noisy=noisy.to(dev),
                                text_noise_level=s.to(dev), path=self.text_path, text_loss=self.flow.text_loss)
            text_sum += float(result.text_sum)
            text_count += float(result.text_count)
        out = {"val.video_loss": video_sum / n}
        out["val.loss"] = out["val.video_loss"]
        if self.text is not None:
            out["val.text_loss"] = text_sum / max(text_count, 1.0)
            out["val.loss"] += self.flow.text_loss_weight * out["val.text_loss"]
        return out

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, model, index: np.ndarray) -> list[np.ndarray]:
        """T2V videos (uint8 [F, H, W, 3]) for the held-out prompts `index`, seeds fixed."""
        _eval_mode(model)
        options = VideoSamplerOptions.from_config(self.sampler)
        videos = []
        for chunk in np.array_split(index, max(1, int(np.ceil(len(index) / self.batch_size)))):
            if len(chunk) == 0:
                continue
            shape = (len(chunk), *self.data.latents.shape[1:])
            with self._autocast():
                out = sample_video(model, shape, self.data.condition[chunk].to(self.device),
                                   self.null[None].to(self.device),
                                   text=None if self.text is None else self.text[chunk].to(self.device),
                                   text_path=self.text_path, options=options,
                                   seeds=[self.seed * 100003 + int(i) for i in chunk], device=self.device)
            pixels = self.codec.decode(out.video.float().cpu())
            videos += [tensor_to_frames(v) for v in pixels]
        return videos

    def captioner(self) -> Captioner:
        """V2T with verification, the same path as the pipeline's (flow/verify.py); the prompt
        encoder that scores candidate captions is loaded on first use."""
        tokenizer, length = self.tokenizer, self.text_length

        def encode_prompts(captions: list[str]) -> torch.Tensor:
            if self.prompt_encoder_config is None:
                raise ValueError("verifying captions needs the prompt encoder's config")
            embeddings, _ = shared_prompt_encoder(self.prompt_encoder_config, self.device).encode(captions)
            return embeddings.to(self.device, torch.float32)

        def encode_text(captions: list[str]) -> torch.Tensor:
            return tokenizer.encode(captions, length, truncate=True).to(self.device)

        return Captioner(null_condition=self.null, path=self.text_path, text_length=length, eos_id=tokenizer.eos_id,
                         decode=tokenizer.decode, encode_prompts=encode_prompts, encode_text=encode_text,
                         skip_ids=tokenizer.special_ids, levels=self.sampler.verify_levels)

    @torch.no_grad()
    def caption(self, model, index: np.ndarray) -> list[str]:
        """V2T captions of the held-out videos `index` under the null condition, each the best of
        `sampler.caption_candidates` by the model's own video flow (as `univigu eval` captions)."""
        _eval_mode(model)
        options = TextSamplerOptions.from_config(self.sampler)
        captioner = self.captioner()
        captions = []
        for chunk in np.array_split(index, max(1, int(np.ceil(len(index) / self.batch_size)))):
            if len(chunk) == 0:
                continue
            with self._autocast():
                texts, _ = captioner.caption(model, self.data.latents[chunk].to(self.device),
                                             [self.seed * 100003 + int(i) for i in chunk], options,
                                             candidates=self.sampler.caption_candidates)
            captions += texts
        return captions

    def oracle(self, model) -> dict:
        """ShapesWorld oracle metrics of T2V (and V2T when the model has a text stream)."""
        if self.data.truths is None:
            return {}
        from ..evaluation.shapesworld_metrics import generation_metrics, understanding_metrics

        index = np.arange(len(self.data))
        out = {}
        metrics = generation_metrics(self.generate(model, index), self.data.truths, self.world)
        out.update({k: v for k, v in metrics.items() if k != "n"})
        if self.tokenizer is not None:
            metrics = understanding_metrics(self.caption(model, index), self.data.truths)
            out.update({k: v for k, v in metrics.items() if k != "n"})
        out["oracle.n"] = len(index)
        return out

    def samples(self, model, directory: str | Path, num: int, fps: float) -> Path:
        """Write GIFs of T2V samples for the first `num` held-out prompts and V2T captions of the
        first `num` held-out videos into `directory`."""
        index = np.arange(min(num, len(self.data)))
        generated = self.generate(model, index)
        videos, captions = [], []
        if self.tokenizer is not None:
            captions = self.caption(model, index)
            videos = [tensor_to_frames(v) for v in self.codec.decode(self.data.latents[index])]
        return write_samples(directory, fps, generated=generated, prompts=[self.data.prompts[i] for i in index],
                             videos=videos, captions=captions,
                             references=[self.data.captions[i] for i in index] if videos else [])
