"""UniViGUPipeline: task semantics against hand-written references, save/load, seeds, bad input.

The references below use only the transformer (the model callable), the MiniLM encoder and
`torch.nn.functional.pixel_(un)shuffle`; they re-derive the T2V and V2T procedures of DESIGN.md
section 4 (condition, clean text stream, null condition, guidance branch, timesteps, seeds)
independently of the samplers and of the pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_ordered, network_terms
from pipeline_helpers import ENCODER_CONFIG, SAMPLER, TEXT_LENGTH, WORLD, prompt_encoder, tiny_model_dir

from univigu.config import FlowConfig, TransformerConfig
from univigu.models.bundle import BundleError
from univigu.models.text import TextTokenizer
from univigu.models.transformer import UniViGUTransformer
from univigu.models.vae import PixelShuffleCodec
from univigu.pipeline import PipelineError, UniViGUPipeline, resolve_dtype

PROMPTS = ["a small red circle moves to the left", "a large blue square moves up"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory):
    """The same kind of model under the `full` attention policy: no cached protocol."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_full") / "model", seed=1, attention_policy="full")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return UniViGUPipeline.from_pretrained(model_dir, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())


def _frames(latents: torch.Tensor) -> np.ndarray:
    """Pixel-shuffle decoding by torch's own op, frame by frame -> uint8 [B, F, H, W, 3]."""
    video = torch.stack([F.pixel_shuffle(latents[:, :, f], 4) for f in range(latents.shape[2])], dim=2)
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def _grid(steps: int, shift: float) -> list[float]:
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).tolist()


# --------------------------------------------------------------------------------------------
# T2V and V2T against hand-written references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,negative", [("isolated", None), ("full", "a green triangle")])
def test_generate_is_the_guided_video_ode_with_the_prompt_in_the_text_stream(which, negative, model_dir,
                                                                               full_model_dir):
    directory = model_dir if which == "isolated" else full_model_dir
    pipe = UniViGUPipeline.from_pretrained(directory, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())
    steps, shift, scale, seeds = 3, 2.5, 2.5, [5, 9]
    out = pipe.generate(PROMPTS, steps=steps, solver="euler", shift=shift, guidance_scale=scale, seed=seeds,
                        negative_prompt=negative)

    model = UniViGUTransformer.from_pretrained(directory / "transformer").eval()
    tokenizer = TextTokenizer.load(directory / "tokenizer")
    encoder = prompt_encoder()
    cond = encoder.encode(PROMPTS)[0]
    uncond = encoder.encode([negative] * 2)[0] if negative else encoder.null_condition()[0].expand(2, -1, -1)
    text = tokenizer.encode(PROMPTS, TEXT_LENGTH, truncate=True)
    all_masked = torch.full_like(text, tokenizer.vocab_size)  # the mask id: one past the vocabulary
    x = torch.stack([torch.randn(48, 5, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])
    grid = _grid(steps, shift)
    with torch.no_grad():
        for s, s_next in zip(grid[:-1], grid[1:]):
            t = torch.full((2,), 1000 * s, dtype=torch.float64).float()
            v_cond = model(x, text, t, torch.zeros(2), cond)[0]
            v_uncond = model(x, all_masked, t, torch.full((2,), 1000.0), uncond)[0]
            x = x + (s_next - s) * (v_uncond + scale * (v_cond - v_uncond))

    # each step's velocity carries its own rounding: the network's reductions once per step
    assert_close_ordered(out.latents, x, terms=steps * network_terms(pipe.transformer.config))
    expected = _frames(x)
    for got, want in zip(out.frames, expected):
        assert got.dtype == np.uint8 and got.shape == (5, 16, 16, 3)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert out.captions is None and out.seeds == seeds


def test_caption_is_the_text_sampler_on_clean_video_with_the_null_condition(pipe, model_dir):
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # One confidence step at temperature 0 commits every position to its argmax.
    out = pipe.caption(video, steps=1, sampler="confidence", temperature=0.0, guidance_scale=1.0, seed=0)

    model = UniViGUTransformer.from_pretrained(model_dir / "transformer").eval()
    tokenizer = TextTokenizer.load(model_dir / "tokenizer")
    latents = torch.stack([F.pixel_unshuffle(video[:, :, f], 4) for f in range(5)], dim=2)
    canvas = torch.full((2, TEXT_LENGTH), tokenizer.vocab_size)
    null = prompt_encoder().null_condition()[0].expand(2, -1, -1)
    with torch.no_grad():
        logits = model(latents, canvas, torch.zeros(2), torch.full((2,), 1000.0), null)[1]
    tokens = logits.argmax(-1)
    assert torch.equal(out.tokens, tokens)
    assert out.captions == tokenizer.decode(tokens)
    assert all(isinstance(c, str) and c for c in out.captions)


class RecordingModel(torch.nn.Module):
    """Passes every call through to the model and records the conditions and videos it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.conditions, self.videos = model, [], []
        self.config = model.config

    def forward(self, video, text, video_timestep, text_timestep, condition):
        self.conditions.append(condition)
        if video is not None:
            self.videos.append(video)
        return self.model(video, text, video_timestep, text_timestep, condition)

    def supports_cache(self, clean):
        return self.model.supports_cache(clean)

    def prefill(self, clean, video=None, text=None, condition=None):
        self.conditions.append(condition)
        if video is not None:
            self.videos.append(video)
        return self.model.prefill(clean, video=video, text=text, condition=condition)

    def step_text(self, text, text_timestep, cache):
        return self.model.step_text(text, text_timestep, cache)


@pytest.mark.parametrize("which", ["isolated", "full"])
def test_captioning_sees_only_the_null_condition_and_the_clean_video_latents(which, model_dir, full_model_dir):
    directory = model_dir if which == "isolated" else full_model_dir
    pipe = UniViGUPipeline.from_pretrained(directory, device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())
    pipe.transformer = RecordingModel(pipe.transformer)
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pipe.caption(video, steps=3, guidance_scale=1.0)
    null = prompt_encoder().null_condition()[0]
    latents = torch.stack([F.pixel_unshuffle(video[:, :, f], 4) for f in range(5)], dim=2)
    calls = pipe.transformer.conditions
    assert len(calls) == (1 if which == "isolated" else 3)  # one prefill, or a full forward per step
    assert all(torch.equal(c, null.expand(2, -1, -1)) for c in calls)
    assert all(torch.equal(v, latents) for v in pipe.transformer.videos)


def test_with_caption_captions_the_generated_video_with_the_same_seeds(pipe):
    out = pipe.generate(PROMPTS, seed=2, with_caption=True)
    decoded = torch.stack([F.pixel_shuffle(out.latents[:, :, f], 4) for f in range(5)], dim=2)  # unclamped
    again = pipe.caption(decoded, seed=2)
    assert out.captions == again.captions and len(out.captions) == 2


def test_the_text_stream_holds_the_prompt_unless_told_otherwise(pipe):
    default = pipe.generate(PROMPTS[0], seed=6)
    same = pipe.generate(PROMPTS[0], seed=6, stream_text=PROMPTS[0])
    other = pipe.generate(PROMPTS[0], seed=6, stream_text=PROMPTS[1])
    assert torch.equal(default.latents, same.latents) and not torch.equal(default.latents, other.latents)


def test_defaults_come_from_the_stored_sampler_and_world(pipe):
    default = pipe.generate(PROMPTS[0], seed=4)
    explicit = pipe.generate(PROMPTS[0], seed=4, steps=SAMPLER.video_steps, solver=SAMPLER.video_solver,
                             shift=SAMPLER.shift, guidance_scale=SAMPLER.guidance_scale, num_frames=WORLD.frames,
                             height=WORLD.height, width=WORLD.width)
    assert torch.equal(default.latents, explicit.latents)
    other = pipe.generate(PROMPTS[0], seed=4, guidance_scale=1.0)
    assert not torch.equal(default.latents, other.latents)
    assert default.frames[0].shape == (WORLD.frames, WORLD.height, WORLD.width, 3)


# --------------------------------------------------------------------------------------------
# Seeds, batches, save / load
# --------------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different_output(pipe):
    a, b, c = (pipe.generate(PROMPTS[0], seed=s, with_caption=True) for s in (7, 7, 8))
    assert torch.equal(a.latents, b.latents) and a.captions == b.captions
    assert not torch.equal(a.latents, c.latents)
    j1, j2, j3 = (pipe.joint(PROMPTS[1], seed=s) for s in (3, 3, 4))
    assert torch.equal(j1.latents, j2.latents) and torch.equal(j1.tokens, j2.tokens)
    assert not torch.equal(j1.latents, j3.latents) and not torch.equal(j1.tokens, j3.tokens)


def test_a_sample_does_not_depend_on_its_batch(pipe):
    both = pipe.generate(PROMPTS, seed=10)  # sample i uses seed 10 + i
    alone = pipe.generate(PROMPTS[1], seed=11)
    terms = SAMPLER.video_steps * network_terms(pipe.transformer.config)
    assert_close_ordered(both.latents[1:], alone.latents, terms=terms)
    joint_both = pipe.joint(PROMPTS, seed=[4, 6])
    joint_alone = pipe.joint([PROMPTS[1]], seed=[6])
    assert_close_ordered(joint_both.latents[1:], joint_alone.latents, terms=terms)
    assert joint_both.captions[1] == joint_alone.captions[0]


def test_save_and_load_round_trip_gives_identical_outputs(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    loaded = UniViGUPipeline.from_pretrained(tmp_path / "copy", device="cpu", dtype="fp32", prompt_encoder=prompt_encoder())
    a, b = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.null_condition, pipe.null_condition)
    assert (loaded.world, loaded.sampler, loaded.flow) == (pipe.world, pipe.sampler, pipe.flow)
    assert loaded.prompt_encoder_config == ENCODER_CONFIG
    for run in (lambda p: p.generate(PROMPTS, seed=1, with_caption=True),
                lambda p: p.joint(PROMPTS[0], seed=2)):
        x, y = run(pipe), run(loaded)
        assert torch.equal(x.latents, y.latents) and x.captions == y.captions
        assert all(np.array_equal(f, g) for f, g in zip(x.frames, y.frames))
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert pipe.caption(video, seed=5).captions == loaded.caption(video, seed=5).captions


def test_captioning_files_in_a_batch_equals_one_by_one(pipe, tmp_path):
    from univigu.data.video_io import write_video

    paths = []
    for i in range(2):
        frames = np.random.default_rng(i).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
        write_video(tmp_path / f"v{i}.mp4", frames)
        paths.append(tmp_path / f"v{i}.mp4")
    together = pipe.caption(paths, seed=4).captions
    assert together == [pipe.caption(paths[0], seed=4).captions[0], pipe.caption(str(paths[1]), seed=5).captions[0]]


# --------------------------------------------------------------------------------------------
# Bad input and settings
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_clear_error(pipe, tmp_path):
    cases = [
        (lambda: pipe.generate(""), "empty"),
        (lambda: pipe.generate(["ok", "  "]), "prompt 1 is empty"),
        (lambda: pipe.generate("ok", height=20), "divisible by 8"),
        (lambda: pipe.generate("ok", num_frames=0), "frame count must be a positive integer"),
        (lambda: pipe.generate(PROMPTS, seed=[1]), "1 seeds for 2 inputs"),
        (lambda: pipe.generate("ok", solver="unipc"), "unknown video solver"),
        (lambda: pipe.caption(torch.zeros(3, 5, 16, 16, dtype=torch.uint8)), "float"),
        (lambda: pipe.caption(torch.zeros(3, 5, 12, 16)), "divisible by 8"),
        (lambda: pipe.caption(tmp_path / "missing.mp4"), "missing.mp4"),
        (lambda: UniViGUPipeline.from_pretrained(tmp_path / "nowhere"), "not found"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(BundleError):
        UniViGUPipeline.from_pretrained(tmp_path)  # exists, but holds no model


def test_a_codec_with_a_temporal_factor_rejects_frame_counts_it_cannot_take(pipe):
    codec = PixelShuffleCodec(2, 4)  # 3 * 2 * 2 * 4 = 48 channels, like the tiny transformer
    other = UniViGUPipeline(pipe.transformer, codec, pipe.prompt_encoder_config, pipe.null_condition,
                            pipe.tokenizer, pipe.world, pipe.sampler, pipe.flow, prompt_encoder=prompt_encoder())
    with pytest.raises(PipelineError, match="divisible by 4, got 5 frames"):
        other.generate("a red circle")
    assert other.generate("a red circle", num_frames=8, steps=1).frames[0].shape == (8, 16, 16, 3)


def test_a_video_only_model_generates_but_refuses_text_tasks(pipe):
    config = TransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
                               text_dim=384, freq_dim=32, ffn_dim=64, num_layers=1, vocab_size=0)
    video_only = UniViGUPipeline(UniViGUTransformer(config), PixelShuffleCodec(4), ENCODER_CONFIG,
                                 pipe.null_condition, None, WORLD, SAMPLER, FlowConfig(),
                                 prompt_encoder=prompt_encoder())
    assert video_only.generate("a red circle", steps=1).frames[0].shape == (5, 16, 16, 3)
    for call in (lambda: video_only.caption(torch.zeros(3, 5, 16, 16)), lambda: video_only.joint("a red circle"),
                 lambda: video_only.generate("a red circle", with_caption=True)):
        with pytest.raises(PipelineError, match="video-only"):
            call()


def test_dtype_defaults_to_bf16_only_where_it_is_fast():
    fast_cpu = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert resolve_dtype(None, torch.device("cpu")) == (torch.bfloat16 if fast_cpu else torch.float32)
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    with pytest.raises(PipelineError, match="fp16"):
        resolve_dtype(torch.float16, torch.device("cpu"))
    with pytest.raises(PipelineError, match="unknown dtype"):
        resolve_dtype("half-ish", torch.device("cpu"))
