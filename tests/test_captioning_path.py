"""Validation V2T and `univigu eval` V2T caption through one path: `flow.verify.Captioner` (draw K
captions, score them by the model's own video flow, keep the lowest), with the same result."""

from __future__ import annotations

import numpy as np
import torch

from univigu.evaluation.harness import PipelineEvaluatee
from univigu.data.video_io import tensor_to_frames
from univigu.flow.options import TextSamplerOptions
from univigu.flow.verify import Captioner
from univigu.pipeline import UniViGUPipeline
from univigu.training.trainer import Trainer
from training_helpers import tiny_config, tiny_generator, training_cache  # noqa: F401 (fixtures)


def test_validation_and_eval_caption_through_the_same_verifier(tmp_path, training_cache, tiny_generator,
                                                               monkeypatch):
    trainer = Trainer(tiny_config(tmp_path, training_cache, "train.eval_samples=4", "sampler.caption_candidates=3",
                                  "sampler.temperature=0.0", stage="knowledge_recall", init_from=tiny_generator),
                      progress=False)
    cfg, model = trainer.cfg, trainer.ema_model()
    calls = []
    caption = Captioner.caption

    def recording(self, *args, **kwargs):
        calls.append(kwargs.get("candidates"))
        return caption(self, *args, **kwargs)

    monkeypatch.setattr(Captioner, "caption", recording)
    index = np.arange(4)
    validated = trainer.validator.caption(model, index)
    assert calls == [3]

    pipe = UniViGUPipeline(model, trainer.codec, cfg.prompt_encoder, trainer.null_condition, trainer.tokenizer,
                           cfg.world, cfg.sampler, cfg.flow, device="cpu", dtype="fp32")
    latents = trainer.validator.data.latents[index]
    seeds = [cfg.train.seed * 100003 + int(i) for i in index]
    captioned, sample = pipe._caption_latents(latents, seeds, TextSamplerOptions.from_config(cfg.sampler))
    assert calls == [3, 3] and captioned == validated and sample.tokens.shape[0] == 4

    # `univigu eval` captions through the pipeline, hence through the same verifier.
    frames = [tensor_to_frames(v) for v in trainer.codec.decode(latents)]
    texts = PipelineEvaluatee(pipe, cfg.world, candidates=3).caption(frames)
    assert calls == [3, 3, 3] and len(texts) == 4 and all(isinstance(t, str) for t in texts)


def test_the_verifier_keeps_the_candidate_it_scores_lowest():
    """The caption each video keeps is its candidate with the lowest score."""

    class Fixed(Captioner):
        def sample(self, model, latents, seeds, options):
            from univigu.flow.samplers import TextSample

            tokens = torch.tensor([[s % 97, 1] for s in seeds])
            return TextSample(tokens=tokens, sequences=[[int(t[0])] for t in tokens], nfe=1)

        def flow_loss(self, model, latents, captions, seeds, levels=None):
            return torch.tensor([0.0 if c in ("c32", "c62") else 1.0 for c in captions])

    captioner = Fixed(null_condition=torch.zeros(1, 2, 3), path=None, text_length=2, eos_id=1,
                      decode=lambda tokens: [f"c{int(row[0])}" for row in tokens],
                      encode_prompts=lambda captions: torch.zeros(len(captions), 2, 3))
    texts, sample = captioner.caption(None, torch.zeros(2, 1, 1, 1, 1), [10, 20], TextSamplerOptions(), candidates=3)
    # Candidates: the sampler's (seeds 10, 20), then seeds s * 3 + j: c31, c32 and c61, c62.
    assert texts == ["c32", "c62"] and sample.nfe == 3
