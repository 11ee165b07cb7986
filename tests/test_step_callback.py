"""The samplers' per-step callback (diffusers' `callback_on_step_end`) and the V2T candidates with
their verification scores in `CaptionOutput`: what the web demo's co-evolving joint view and its
captioning tab read from the pipeline."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import prompt_encoder, tiny_model_dir

from univigu.flow.paths import FlowError, sampling_grid
from univigu.flow.samplers import VideoSamplerOptions, sample_video
from univigu.pipeline import PipelineError, UniViGUPipeline

PROMPT = "a small red circle moves to the left"


def _gaussian_model(video, text, video_timestep, text_timestep, condition):
    """The exact velocity of a unit-mean Gaussian target with std 0.5 on the rectified-flow path."""
    s = (video_timestep / 1000).view(-1, *[1] * (video.dim() - 1))
    mean, std = 1.0, 0.5
    var = (1 - s) ** 2 * std**2 + s**2
    x0 = mean + (1 - s) * std**2 * (video - (1 - s) * mean) / var
    eps = (video - (1 - s) * x0) / s.clamp(min=1e-6)
    return eps - x0, None


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    directory = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    return UniViGUPipeline.from_pretrained(directory, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())


def test_video_sampler_callback_sees_every_step_and_changes_nothing():
    options = VideoSamplerOptions(steps=4, solver="euler", shift=2.0, guidance_scale=1.0)
    cond = torch.zeros(2, 3, 4)
    plain = sample_video(_gaussian_model, (2, 1, 1, 2, 2), cond, options=options, seeds=[1, 2]).video
    seen = []

    def callback(step, s, state):
        seen.append((step, s, state["video"].clone(), state["prediction"].clone()))

    watched = sample_video(_gaussian_model, (2, 1, 1, 2, 2), cond, options=options, seeds=[1, 2],
                           callback_on_step_end=callback).video
    assert torch.equal(plain, watched)
    grid = sampling_grid(4, 2.0)
    assert [step for step, *_ in seen] == [0, 1, 2, 3]
    assert [s for _, s, *_ in seen] == pytest.approx([float(g) for g in grid[:-1]])
    assert torch.equal(seen[-1][2], watched)
    # Euler's last step lands on s = 0: x + (0 - s) v is exactly the step's prediction x - s v.
    torch.testing.assert_close(seen[-1][3], watched)


def test_a_returned_dict_replaces_the_state_and_a_bad_return_is_refused():
    options = VideoSamplerOptions(steps=3, solver="euler", guidance_scale=1.0)
    cond = torch.zeros(1, 3, 4)
    out = sample_video(_gaussian_model, (1, 1, 1, 2, 2), cond, options=options, seeds=[0],
                       callback_on_step_end=lambda i, s, st: {"video": torch.zeros_like(st["video"])}
                       if i == 2 else None).video
    assert torch.equal(out, torch.zeros(1, 1, 1, 2, 2))
    with pytest.raises(FlowError, match="must return a dict or None"):
        sample_video(_gaussian_model, (1, 1, 1, 2, 2), cond, options=options, seeds=[0],
                     callback_on_step_end=lambda i, s, st: 1)


def test_joint_callback_shows_video_and_text_co_evolving(pipe):
    plain = pipe.joint(PROMPT, steps=3, seed=4)
    seen = []

    def callback(p, step, s, state):
        assert p is pipe
        seen.append((step, s, state["video"].clone(), state["tokens"].clone(), state["prediction"].shape))

    out = pipe.joint(PROMPT, steps=3, seed=4, callback_on_step_end=callback)
    assert torch.equal(out.latents, plain.latents) and torch.equal(out.tokens, plain.tokens)
    assert [step for step, *_ in seen] == [0, 1, 2]
    levels = [s for _, s, *_ in seen]
    assert levels == sorted(levels, reverse=True) and levels[0] == pytest.approx(1.0)
    assert torch.equal(seen[-1][2].cpu(), out.latents) and torch.equal(seen[-1][3].cpu(), out.tokens)
    assert seen[-1][4] == out.latents.shape
    # The canvas starts all masked and unmasks as the steps go.
    masked = [int((tokens == pipe.tokenizer.mask_id).sum()) for *_, tokens, _ in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0


def test_generate_takes_the_callback_and_refuses_a_non_callable(pipe):
    steps = []
    out = pipe.generate(PROMPT, steps=2, seed=0, callback_on_step_end=lambda p, i, s, st: steps.append(i))
    assert steps == [0, 1] and out.frames[0].shape == (5, 16, 16, 3)
    with pytest.raises(PipelineError, match="must be callable"):
        pipe.generate(PROMPT, steps=2, callback_on_step_end="progress")


def test_caption_output_lists_the_candidates_and_their_verification_scores(pipe):
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = pipe.caption(video, candidates=4, seed=3)
    assert len(out.candidates) == len(out.candidate_scores) == 2
    for caption, texts, scores in zip(out.captions, out.candidates, out.candidate_scores):
        assert len(texts) == len(scores) == 4
        scored = [(score, text) for score, text in zip(scores, texts) if score is not None]
        if len(set(texts)) == 1:
            assert scored == [] and caption == texts[0]
            continue
        # Every distinct candidate is scored once; the kept caption has the lowest loss.
        assert sorted(t for _, t in scored) == sorted(set(texts))
        assert caption == min(scored)[1]
    # The scores are the pipeline's own verification losses.
    i = next((i for i, s in enumerate(out.candidate_scores) if s[0] is not None), None)
    if i is not None:
        loss = pipe.caption_flow_loss(pipe.codec.encode(video[i:i + 1]), [out.candidates[i][0]], [3 + i])
        assert out.candidate_scores[i][0] == pytest.approx(float(loss[0]), rel=1e-5)

    single = pipe.caption(video, candidates=1, seed=3)
    assert single.candidates == [[c] for c in single.captions] and single.candidate_scores == [[None], [None]]
