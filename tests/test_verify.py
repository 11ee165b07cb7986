"""Caption verification by the video flow (flow/verify.py and `UniViGUPipeline.caption(candidates=K)`).

The loss is checked against a closed form: a model that knows a candidate latent ``c`` and returns
the exact conditional velocity ``(x_s - c) / s`` has loss ``mean((x - c)^2) / s^2`` at level ``s``,
whatever the noise. The pipeline's choice is re-derived from its public pieces: the candidates from
single-caption calls with the documented seeds and temperatures, their losses from
`video_flow_loss` with the caption as prompt and as clean text stream.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_ordered
from pipeline_helpers import TEXT_LENGTH, prompt_encoder, tiny_model_dir

from univigu.flow.paths import FlowError
from univigu.flow.verify import pick_lowest, video_flow_loss
from univigu.pipeline import PipelineError, UniViGUPipeline

SHAPE = (4, 3, 2, 2)  # latent [C, F, H, W]


class KnowsTheVideo(torch.nn.Module):
    """Velocity of the straight path to the latent it is given as `condition`."""

    def forward(self, video, text, video_t, text_t, condition):
        s = (video_t / 1000.0).view(-1, *[1] * (video.dim() - 1))
        return (video - condition) / s, None


def test_flow_loss_of_an_exact_velocity_is_the_closed_form_whatever_the_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *SHAPE, generator=g)
    candidates = torch.stack([x[0], x[1] + 0.5, x[2] - torch.randn(SHAPE, generator=g)])
    levels = (0.2, 0.6)
    losses = video_flow_loss(KnowsTheVideo(), x, None, candidates, seeds=[5, 5, 9], levels=levels, batch_size=2)
    expected = torch.stack([((x - candidates) ** 2).flatten(1).mean(1) / s ** 2 for s in levels]).mean(0)
    assert_close_ordered(losses, expected, terms=x[0].numel() * len(levels))  # means over elements, levels
    assert losses[0] < 1e-8


def test_candidates_with_one_seed_see_the_same_noise():
    class Zero(torch.nn.Module):
        def forward(self, video, text, video_t, text_t, condition):
            return torch.zeros_like(video), None

    x = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(1)).expand(3, *SHAPE)
    losses = video_flow_loss(Zero(), x, None, torch.zeros(3, 1, 1), seeds=[7, 7, 8], levels=(0.5,))
    eps = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(7))[0]
    assert_close_ordered(losses[0], ((eps - x[0]) ** 2).mean(), terms=x[0].numel())
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_pick_lowest_and_bad_levels():
    assert pick_lowest(torch.tensor([3.0, 1.0, 2.0, 0.5, 0.7]), [0, 0, 0, 1, 1], 2) == [1, 3]
    with pytest.raises(FlowError, match="no candidate"):
        pick_lowest(torch.tensor([1.0]), [0], 2)
    with pytest.raises(FlowError, match=r"\(0, 1\)"):
        video_flow_loss(KnowsTheVideo(), torch.zeros(1, *SHAPE), None, torch.zeros(1, *SHAPE), [0], levels=(0.0,))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    directory = tiny_model_dir(tmp_path_factory.mktemp("verify") / "model")
    return UniViGUPipeline.from_pretrained(directory, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())


def test_caption_keeps_the_candidate_with_the_lowest_video_flow_loss(pipe):
    video = torch.rand(3, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    k, seeds = 4, [0, 1, 2]
    out = pipe.caption(video, seed=0, temperature=0.0, candidates=k)

    latents = pipe.codec.encode(video)
    chosen = []
    for i, seed in enumerate(seeds):
        texts = [pipe.caption(video[i:i + 1], seed=seed, temperature=0.0, candidates=1).captions[0]]
        texts += [pipe.caption(video[i:i + 1], seed=seed * k + j, temperature=1.0, candidates=1).captions[0]
                  for j in range(1, k)]
        assert len(set(texts)) > 1, "a random tiny model should disagree with itself at temperature 1"
        stream = pipe.tokenizer.encode(texts, TEXT_LENGTH, truncate=True)
        with torch.no_grad():
            losses = video_flow_loss(pipe.transformer, latents[i:i + 1].expand(k, -1, -1, -1, -1), stream,
                                     pipe.encode_prompts(texts), [seed] * k, levels=pipe.sampler.verify_levels)
        chosen.append(texts[int(losses.argmin())])
    assert out.captions == chosen
    assert out.captions == pipe.caption(video, seed=0, temperature=0.0, candidates=k).captions  # same seed
    assert pipe.tokenizer.decode(out.tokens) == out.captions
    assert out.nfe == k * pipe.caption(video, seed=0, temperature=0.0, candidates=1).nfe


def test_one_candidate_is_the_plain_sampler_and_bad_counts_are_refused(pipe):
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert pipe.sampler.caption_candidates == 1
    assert pipe.caption(video, seed=4).captions == pipe.caption(video, seed=4, candidates=1).captions
    for bad in (0, 2.5, True):
        with pytest.raises(PipelineError, match="candidates"):
            pipe.caption(video, candidates=bad)
