"""Samplers on analytic models: exact Gaussian velocity fields and oracle text posteriors."""

import math

import pytest
import torch
from scipy import stats
from tolerances import assert_close_ordered

from univigu.flow.paths import FlowError, MixtureTextPath, kappa, sampling_grid
from univigu.flow.categorical import sample_categorical
from univigu.flow.options import JointSamplerOptions, TextSamplerOptions, VideoSamplerOptions
from univigu.flow.randomness import RandomSource
from univigu.flow.samplers import sample_joint, sample_text, sample_video
from univigu.flow.text_updates import confidence_step, decode_tokens, discrete_euler_step
from univigu.flow.video_solvers import VideoODESolver

VOCAB = 11
PAD, BOS, EOS = 0, 1, 2
SPECIALS = (PAD, BOS, EOS)
TARGET = torch.tensor([
    [5, 7, 3, 9, 4, 2, 0, 0, 0, 0],  # "5 7 3 9 4" EOS PAD...
    [10, 3, 2, 0, 0, 0, 0, 0, 0, 0],  # "10 3" EOS PAD...
])
TARGET_TEXT = [[5, 7, 3, 9, 4], [10, 3]]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def gaussian_velocity(x: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Exact rectified-flow velocity E[eps - x0 | x_s] for data N(mean, std^2) and noise N(0, 1)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, mean = s.double().view(shape), mean.double().view(shape)
    a = 1 - s
    var = a * a * std * std + s * s
    centred = x.double() - a * mean
    expected_data = mean + a * std * std / var * centred
    expected_noise = s / var * centred
    return (expected_noise - expected_data).float()


class AnalyticModel:
    """Exact Gaussian velocity (mean = condition[:, 0, 0]) and an oracle text posterior.

    The posterior puts all mass on `target` (``-inf`` elsewhere); without video it returns the
    `no_video_logits` instead, so text guidance has something to contrast against.
    """

    def __init__(self, std=0.5, target=None, no_video_logits=None):
        self.std, self.target, self.no_video_logits = std, target, no_video_logits
        self.calls = []

    def __call__(self, video, text, video_timestep, text_timestep, condition):
        self.calls.append(dict(video=None if video is None else video.clone(),
                               text=None if text is None else text.clone(),
                               video_timestep=video_timestep, text_timestep=text_timestep,
                               condition=condition.clone()))
        velocity = None
        if video is not None:
            velocity = gaussian_velocity(video, video_timestep / 1000, condition[:, 0, 0], self.std)
        logits = None
        if text is not None and self.target is not None:
            logits = self.text_logits(text, video is not None)
        return velocity, logits

    def text_logits(self, text, has_video=True):
        batch, length = text.shape
        if not has_video and self.no_video_logits is not None:
            return self.no_video_logits.expand(batch, length, -1).clone()
        target = self.target.repeat(batch // self.target.shape[0], 1)
        logits = torch.full((batch, length, VOCAB), -math.inf)
        return logits.scatter(-1, target.unsqueeze(-1), 0.0)


def condition_with_mean(means, length=3, dim=4):
    cond = torch.zeros(len(means), length, dim)
    cond[:, 0, 0] = torch.tensor(means, dtype=torch.float32)
    return cond


def exact_transport(noise, mean, std):
    """The flow ODE of a Gaussian target maps noise z to mean + std z."""
    return mean + std * noise


# --------------------------------------------------------------------------------------------
# Video ODE solvers
# --------------------------------------------------------------------------------------------


def _solve_error(solver, steps, shift, batch=512, mean=2.0, std=0.5):
    model = AnalyticModel(std=std)
    out = sample_video(model, (batch, 1, 2, 2, 2), condition_with_mean([mean] * batch),
                       options=VideoSamplerOptions(steps=steps, solver=solver, shift=shift, guidance_scale=1.0), generator=_gen(0))
    noise = torch.randn((batch, 1, 2, 2, 2), generator=_gen(0))
    return (out.video - exact_transport(noise, mean, std)).abs().max().item(), out


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_video_solvers_converge_and_second_order_beats_euler(shift):
    errors = {solver: [_solve_error(solver, steps, shift)[0] for steps in (4, 8, 16, 32)]
              for solver in ("euler", "heun", "dpmpp2m")}
    for solver, errs in errors.items():
        assert all(b < a for a, b in zip(errs, errs[1:])), f"{solver} error does not fall with steps: {errs}"
    for k in range(4):
        assert errors["heun"][k] < errors["euler"][k] and errors["dpmpp2m"][k] < errors["euler"][k], errors
    # Euler is first order; the second-order solvers close in much faster.
    assert errors["euler"][-1] > 0.05
    assert errors["heun"][-1] < 0.05 and errors["dpmpp2m"][-1] < 0.05


def test_video_samples_match_target_moments():
    batch, mean, std = 2048, -1.5, 0.4  # 16k elements: under torch's threading grain size
    _, out = _solve_error("heun", 24, 1.0, batch=batch, mean=mean, std=std)
    x = out.video.double().flatten()
    n = x.numel()
    assert abs(x.mean().item() - mean) < 4 * std / math.sqrt(n)
    assert abs(x.std().item() - std) < 4 * std / math.sqrt(2 * n) + 2e-3
    # The noise had mean 0 and std 1: the solver really moved the distribution.
    assert out.nfe == 2 * 24 - 1


def test_dpmpp2m_matches_diffusers_on_its_grid():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    scheduler.set_timesteps(12)
    grid = scheduler.sigmas.double()
    mean = torch.full((64,), 1.5)
    x0 = torch.randn(64, 3, 2, 2, generator=_gen(1))
    reference = x0.clone()
    for i, t in enumerate(scheduler.timesteps):
        v = gaussian_velocity(reference, torch.full((64,), float(grid[i])), mean, 0.7)
        reference = scheduler.step(v, t, reference).prev_sample
    solver = VideoODESolver("dpmpp2m", grid)
    x = x0.clone()
    for i in range(12):
        v = gaussian_velocity(x, torch.full((64,), float(grid[i])), mean, 0.7)
        x = solver.step(i, x, v, None)
    assert_close_ordered(x, reference, terms=12 * 8)  # 12 steps of a few fused multiply-adds each


# --------------------------------------------------------------------------------------------
# Video guidance, caching, seeds
# --------------------------------------------------------------------------------------------


def test_guidance_scale_one_equals_no_guidance():
    cond, null = condition_with_mean([1.0, -2.0]), torch.zeros(1, 3, 4)
    text = TARGET.clone()
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    plain_model, guided_model = AnalyticModel(), AnalyticModel()
    options = VideoSamplerOptions(steps=6, solver="heun", shift=3.0, guidance_scale=1.0)
    plain = sample_video(plain_model, (2, 1, 1, 2, 2), cond, text=text, options=options, generator=_gen(3))
    one = sample_video(guided_model, (2, 1, 1, 2, 2), cond, null, text=text, text_path=path,
                       options=VideoSamplerOptions(steps=6, solver="heun", shift=3.0, guidance_scale=1.0),
                       generator=_gen(3))
    assert torch.equal(plain.video, one.video)
    assert plain.nfe == one.nfe == 11
    assert all(c["condition"].shape[0] == 2 for c in guided_model.calls)  # no unconditional branch ran


@pytest.mark.parametrize("scale", [0.0, 2.5, 4.0])
def test_guided_gaussian_fields_reach_the_extrapolated_mean(scale):
    # With equal variances the guided field u + w (c - u) is exactly the field of a Gaussian with
    # mean mu_u + w (mu_c - mu_u), so the sampler must land on its transport map.
    batch, mu_c, mu_u = 256, 1.0, -0.5
    out = sample_video(AnalyticModel(std=0.6), (batch, 1, 1, 2, 2), condition_with_mean([mu_c] * batch),
                       condition_with_mean([mu_u]), options=VideoSamplerOptions(
                           steps=40, solver="heun", shift=1.0, guidance_scale=scale), generator=_gen(4))
    noise = torch.randn((batch, 1, 1, 2, 2), generator=_gen(4))
    expected = exact_transport(noise, mu_u + scale * (mu_c - mu_u), 0.6)
    assert (out.video - expected).abs().max().item() < 5e-3


@pytest.mark.parametrize("source", ["mask", "uniform"])
@pytest.mark.parametrize("batch_guidance", [True, False])
def test_unconditional_branch_gets_null_condition_and_fully_noised_text(source, batch_guidance):
    path = MixtureTextPath(VOCAB, source, SPECIALS)
    model = AnalyticModel()
    cond, null = condition_with_mean([1.0, 2.0]), torch.full((1, 3, 4), -7.0)
    sample_video(model, (2, 1, 1, 2, 2), cond, null, text=TARGET, text_path=path,
                 options=VideoSamplerOptions(steps=4, solver="euler", guidance_scale=3.0,
                                             batch_guidance=batch_guidance), generator=_gen(5))
    assert len(model.calls) == (4 if batch_guidance else 8)
    rows = []
    for call in model.calls:
        n = call["condition"].shape[0]
        for start in range(0, n, 2):
            rows.append({k: (v[start:start + 2] if torch.is_tensor(v) else v) for k, v in call.items()})
    conditional = [r for r in rows if torch.equal(r["condition"], cond)]
    unconditional = [r for r in rows if torch.all(r["condition"] == -7.0)]
    assert len(conditional) == len(unconditional) == 4
    for r in conditional:
        assert torch.equal(r["text"], TARGET) and torch.all(r["text_timestep"] == 0)
    noised = unconditional[0]["text"]
    for r in unconditional:
        assert torch.all(r["text_timestep"] == 1000.0)
        assert torch.equal(r["text"], noised)  # one fixed fully noised canvas
    if source == "mask":
        assert torch.all(noised == path.mask_id)
    else:
        assert not torch.isin(noised, torch.tensor(SPECIALS)).any()
        assert not torch.equal(noised, TARGET)


def test_negative_condition_replaces_null_and_guidance_interval_limits_branches():
    model = AnalyticModel()
    cond, null, negative = condition_with_mean([1.0]), torch.zeros(1, 3, 4), torch.full((1, 3, 4), 5.0)
    options = VideoSamplerOptions(steps=8, solver="euler", shift=1.0, guidance_scale=2.0,
                                  guidance_interval=(0.4, 0.8), batch_guidance=False)
    sample_video(model, (1, 1, 1, 2, 2), cond, null, negative_condition=negative, options=options, generator=_gen(0))
    grid = sampling_grid(8, 1.0)[:-1]
    in_interval = int(((grid >= 0.4) & (grid <= 0.8)).sum())
    unconditional = [c for c in model.calls if torch.all(c["condition"] == 5.0)]
    assert len(unconditional) == in_interval == 3  # s = 0.75, 0.625, 0.5
    assert not any(torch.all(c["condition"] == 0.0) for c in model.calls)
    guided_s = sorted(round(c["video_timestep"].item() / 1000, 6) for c in unconditional)
    assert guided_s == sorted(round(float(s), 6) for s in grid if 0.4 <= s <= 0.8)


class CachedModel(AnalyticModel):
    """An analytic model that also offers the cached protocol."""

    def __init__(self, allow=True, **kwargs):
        super().__init__(**kwargs)
        self.allow, self.prefills, self.steps = allow, [], 0

    def supports_cache(self, clean):
        return self.allow

    def prefill(self, clean, condition, video=None, text=None):
        self.prefills.append(clean)
        return dict(clean=clean, condition=condition, video=video)

    def step_video(self, video, video_timestep, cache):
        self.steps += 1
        return gaussian_velocity(video, video_timestep / 1000, cache["condition"][:, 0, 0], self.std)

    def step_text(self, text, text_timestep, cache):
        self.steps += 1
        return self.text_logits(text)


def test_t2v_uses_the_cache_only_when_allowed():
    cond, null = condition_with_mean([1.0, 0.5]), torch.zeros(1, 3, 4)
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    options = VideoSamplerOptions(steps=5, solver="dpmpp2m", guidance_scale=2.0)
    cached = CachedModel(allow=True)
    out_cached = sample_video(cached, (2, 1, 1, 2, 2), cond, null, text=TARGET, text_path=path,
                              options=options, generator=_gen(1))
    assert cached.prefills == ["text"] and cached.steps == 5
    assert len(cached.calls) == 5 and all(torch.all(c["text_timestep"] == 1000) for c in cached.calls)
    refused = CachedModel(allow=False)
    out_full = sample_video(refused, (2, 1, 1, 2, 2), cond, null, text=TARGET, text_path=path,
                            options=options, generator=_gen(1))
    assert refused.prefills == [] and refused.steps == 0 and len(refused.calls) == 5  # batched cond + uncond
    assert_close_ordered(out_cached.video, out_full.video, terms=5 * 8)  # 5 steps, each a guided update
    off = CachedModel(allow=True)
    sample_video(off, (2, 1, 1, 2, 2), cond, null, text=TARGET, text_path=path,
                 options=VideoSamplerOptions(steps=5, guidance_scale=2.0, use_cache=False), generator=_gen(1))
    assert off.prefills == []


def test_per_sample_seeds_make_samples_independent_of_the_batch():
    cond = condition_with_mean([1.0, -1.0, 0.0])
    options = VideoSamplerOptions(steps=3, solver="euler", guidance_scale=1.0)
    both = sample_video(AnalyticModel(), (3, 1, 1, 2, 2), cond, options=options, seeds=[11, 12, 13]).video
    for i, seed in enumerate([11, 12, 13]):
        alone = sample_video(AnalyticModel(), (1, 1, 1, 2, 2), cond[i:i + 1], options=options, seeds=[seed]).video
        assert torch.equal(both[i], alone[0])
    again = sample_video(AnalyticModel(), (3, 1, 1, 2, 2), cond, options=options, seeds=[11, 12, 13]).video
    assert torch.equal(both, again)
    assert not torch.equal(both[0], both[1])
    with pytest.raises(FlowError, match="seeds"):
        sample_video(AnalyticModel(), (3, 1, 1, 2, 2), cond, options=options, seeds=[1, 2])


# --------------------------------------------------------------------------------------------
# Text samplers
# --------------------------------------------------------------------------------------------


TEXT_SAMPLERS = [
    ("mask", dict(sampler="euler")),
    ("uniform", dict(sampler="euler")),
    ("mask", dict(sampler="confidence")),
    ("mask", dict(sampler="confidence", block_length=3)),
    ("mask", dict(sampler="euler", block_length=4)),
]


@pytest.mark.parametrize("source,kwargs", TEXT_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20])
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_oracle_posterior_gives_the_target_at_any_step_count(source, kwargs, steps, temperature):
    path = MixtureTextPath(VOCAB, source, SPECIALS, kappa_exponent=2.0 if steps % 2 else 1.0)
    blocks = -(-TARGET.shape[1] // kwargs.get("block_length", TARGET.shape[1]))
    steps = max(steps, blocks)
    model = AnalyticModel(target=TARGET)
    video = torch.randn(2, 1, 1, 2, 2, generator=_gen(0))
    out = sample_text(model, video, torch.zeros(2, 3, 4), path, TARGET.shape[1], eos_id=EOS,
                      options=TextSamplerOptions(steps=steps, temperature=temperature, **kwargs), generator=_gen(steps))
    assert torch.equal(out.tokens, TARGET)
    assert out.sequences == TARGET_TEXT
    assert out.nfe == steps
    assert all(torch.all(c["video_timestep"] == 0) and torch.equal(c["video"], video) for c in model.calls)


def test_v2t_uses_the_cache_and_text_guidance_keeps_the_oracle_target():
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    video = torch.randn(2, 1, 1, 2, 2, generator=_gen(0))
    model = CachedModel(target=TARGET, no_video_logits=torch.zeros(VOCAB))
    out = sample_text(model, video, torch.zeros(2, 3, 4), path, 10, eos_id=EOS,
                      options=TextSamplerOptions(steps=4, guidance_scale=3.0), generator=_gen(1))
    assert torch.equal(out.tokens, TARGET)
    assert model.prefills == ["video"] and model.steps == 4
    # The unconditional branch is a full forward without video.
    assert len(model.calls) == 4 and all(c["video"] is None and c["video_timestep"] is None for c in model.calls)


def test_discrete_euler_jump_frequencies_match_the_formula():
    batch, length, vocab = 64, 2048, 6  # 131,072 tokens
    s, s_next, exponent = 0.7, 0.45, 2.0
    k, k_next = kappa(torch.tensor(s), exponent).item(), kappa(torch.tensor(s_next), exponent).item()
    q = (k_next - k) / (1 - k)
    target = torch.randint(0, vocab, (batch, length), generator=_gen(2))
    # Mask source, oracle posterior: a masked token unmasks (to its target) with probability q.
    path = MixtureTextPath(vocab, "mask", kappa_exponent=exponent)
    state = path.sample(target, torch.full((batch,), s), generator=_gen(3)).noisy
    oracle = torch.full((batch, length, vocab), -math.inf).scatter(-1, target.unsqueeze(-1), 0.0)
    rng = RandomSource(batch, _gen(4))
    new = discrete_euler_step(state, torch.log_softmax(oracle.double(), -1), torch.full((batch,), s),
                              torch.full((batch,), s_next), path, rng)
    masked = state == path.mask_id
    unmasked_now = masked & (new != path.mask_id)
    n = masked.sum().item()
    assert abs(unmasked_now.sum().item() / n - q) < 3 * math.sqrt(q * (1 - q) / n)
    assert torch.equal(new[unmasked_now], target[unmasked_now])
    assert torch.equal(new[~masked], state[~masked])  # carry-over
    # A posterior that disagrees with the unmasked tokens must not move them either.
    flat = torch.zeros(batch, length, vocab, dtype=torch.float64)
    moved_mask = discrete_euler_step(state, flat, torch.full((batch,), s), torch.full((batch,), s_next), path,
                                     RandomSource(batch, _gen(11)))
    assert torch.equal(moved_mask[~masked], state[~masked])
    fresh = masked & (moved_mask != path.mask_id)
    assert abs(fresh.sum().item() / n - q) < 3 * math.sqrt(q * (1 - q) / n)
    # Uniform source, flat posterior: a token moves when it jumps (prob q) to a different draw.
    upath = MixtureTextPath(vocab, "uniform", kappa_exponent=exponent)
    ustate = upath.sample(target, torch.full((batch,), s), generator=_gen(5)).noisy
    unew = discrete_euler_step(ustate, flat, torch.full((batch,), s), torch.full((batch,), s_next), upath,
                               RandomSource(batch, _gen(6)))
    moved = unew != ustate
    p_move = q * (1 - 1 / vocab)
    total = moved.numel()
    assert abs(moved.sum().item() / total - p_move) < 3 * math.sqrt(p_move * (1 - p_move) / total)
    assert stats.chisquare(torch.bincount(unew[moved], minlength=vocab).numpy()).pvalue > 1e-3


def test_confidence_sampler_commits_per_kappa_schedule_in_confidence_order():
    length, steps, exponent = 24, 6, 2.0
    path = MixtureTextPath(VOCAB, "mask", SPECIALS, kappa_exponent=exponent)
    target = torch.randint(3, VOCAB, (1, length), generator=_gen(7))
    # Confidence rises with position: the right end must be committed first.
    peak = torch.linspace(1.0, 8.0, length)
    logits = torch.zeros(1, length, VOCAB).scatter(-1, target.unsqueeze(-1), peak.view(1, length, 1))
    masked_seen = []

    def model(video, text, vt, tt, cond):
        masked_seen.append(((text == path.mask_id).sum().item(), text.clone()))
        return None, logits

    out = sample_text(model, None, torch.zeros(1, 3, 4), path, length, eos_id=EOS,
                      options=TextSamplerOptions(steps=steps, sampler="confidence", temperature=0.0), generator=_gen(0))
    grid = sampling_grid(steps)
    expected = [round(length * (1 - (1 - float(s)) ** exponent)) for s in grid[:-1]]
    assert [m for m, _ in masked_seen] == expected
    assert torch.equal(out.tokens, target)
    for (_, before), (_, after) in zip(masked_seen, masked_seen[1:]):
        committed = ((before == path.mask_id) & (after != path.mask_id)).nonzero()[:, 1]
        still = (after == path.mask_id).nonzero()[:, 1]
        if len(committed) and len(still):
            assert committed.min() > still.max()



def test_categorical_draws_invert_the_cdf_and_never_pick_an_id_without_mass():
    # probs 0.1, 0.2, 0, 0.7, 0, 0: CDF 0.1, 0.3, 0.3, 1.0, 1.0, 1.0
    probs = torch.tensor([0.1, 0.2, 0.0, 0.7, 0.0, 0.0], dtype=torch.float64)
    log_probs = probs.log().expand(6, -1)
    uniforms = torch.tensor([0.0, 0.05, 0.15, 0.29, 0.31, 0.999], dtype=torch.float64)
    assert sample_categorical(log_probs, uniforms).tolist() == [0, 0, 1, 1, 3, 3]
    # u on the very top of the CDF (rounding can do this) falls back to the last id with mass,
    # not past the end nor onto the trailing zero-mass ids.
    assert sample_categorical(log_probs[:2], torch.ones(2, dtype=torch.float64)).tolist() == [3, 3]

@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_rescales_the_posterior(temperature):
    logits = torch.tensor([2.0, 0.0, -1.0, 1.0, 0.5])
    batch, length = 32, 1024

    def model(video, text, vt, tt, cond):
        return None, logits.expand(text.shape[0], text.shape[1], -1)

    path = MixtureTextPath(5, "mask")
    out = sample_text(model, None, torch.zeros(batch, 1, 1), path, length, eos_id=99,
                      options=TextSamplerOptions(steps=1, sampler="euler", temperature=temperature), generator=_gen(8))
    counts = torch.bincount(out.tokens.flatten(), minlength=5).numpy()
    expected = torch.softmax(logits.double() / temperature, -1).numpy() * batch * length
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    greedy = sample_text(model, None, torch.zeros(2, 1, 1), path, 8, eos_id=99,
                         options=TextSamplerOptions(steps=2, sampler="euler", temperature=0.0), generator=_gen(8))
    assert torch.all(greedy.tokens == 0)


def test_text_guidance_mixes_log_probabilities_against_the_no_video_branch():
    cond_logits = torch.tensor([1.0, 0.0, 0.5, -1.0])
    uncond_logits = torch.tensor([0.0, 1.0, 0.5, 0.0])
    scale = 2.0

    def model(video, text, vt, tt, c):
        chosen = cond_logits if video is not None else uncond_logits
        return None, chosen.expand(text.shape[0], text.shape[1], -1)

    path = MixtureTextPath(4, "mask")
    video = torch.zeros(16, 1, 1, 1, 1)
    out = sample_text(model, video, torch.zeros(16, 1, 1), path, 2048, eos_id=99,
                      options=TextSamplerOptions(steps=1, sampler="euler", guidance_scale=scale), generator=_gen(9))
    log_u, log_c = torch.log_softmax(uncond_logits.double(), -1), torch.log_softmax(cond_logits.double(), -1)
    mixed = (1 - scale) * log_u + scale * log_c
    expected = torch.softmax(mixed, -1).numpy() * out.tokens.numel()
    assert stats.chisquare(torch.bincount(out.tokens.flatten(), minlength=4).numpy(), expected).pvalue > 1e-3
    # Scale 1 is no guidance: same tokens with the same seed, half the model calls.
    a = sample_text(model, video, torch.zeros(16, 1, 1), path, 64, eos_id=99,
                    options=TextSamplerOptions(steps=3, sampler="euler", guidance_scale=1.0), generator=_gen(2))
    calls = []
    b = sample_text(lambda *args: (calls.append(1), model(*args))[1], video, torch.zeros(16, 1, 1), path, 64,
                    eos_id=99, options=TextSamplerOptions(steps=3, sampler="euler"), generator=_gen(2))
    assert torch.equal(a.tokens, b.tokens) and a.nfe == len(calls) == 3


def test_text_per_sample_seeds():
    path = MixtureTextPath(VOCAB, "uniform", SPECIALS)

    def model(video, text, vt, tt, cond):
        return None, torch.zeros(text.shape[0], text.shape[1], VOCAB)

    opts = TextSamplerOptions(steps=4, sampler="euler")
    both = sample_text(model, None, torch.zeros(2, 1, 1), path, 16, eos_id=EOS, options=opts, seeds=[5, 6]).tokens
    one = sample_text(model, None, torch.zeros(1, 1, 1), path, 16, eos_id=EOS, options=opts, seeds=[6]).tokens
    assert torch.equal(both[1], one[0]) and not torch.equal(both[0], both[1])


def test_decode_stops_at_the_first_eos():
    tokens = torch.tensor([[4, 5, EOS, 6, EOS, PAD], [4, PAD, 5, 6, 7, 8], [EOS, 3, 3, 3, 3, 3]])
    assert decode_tokens(tokens, EOS) == [[4, 5], [4, PAD, 5, 6, 7, 8], []]
    assert decode_tokens(tokens, EOS, skip_ids=[PAD]) == [[4, 5], [4, 5, 6, 7, 8], []]


def test_text_sampler_rejects_bad_options():
    uniform = MixtureTextPath(VOCAB, "uniform", SPECIALS)
    mask = MixtureTextPath(VOCAB, "mask", SPECIALS)
    model = AnalyticModel(target=TARGET)
    cond = torch.zeros(2, 3, 4)
    with pytest.raises(FlowError, match="mask source"):
        sample_text(model, None, cond, uniform, 10, eos_id=EOS, options=TextSamplerOptions(sampler="confidence"))
    with pytest.raises(FlowError, match="one step per block"):
        sample_text(model, None, cond, mask, 10, eos_id=EOS, options=TextSamplerOptions(steps=2, block_length=3))
    with pytest.raises(FlowError, match="needs a video"):
        sample_text(model, None, cond, mask, 10, eos_id=EOS, options=TextSamplerOptions(guidance_scale=2.0))
    with pytest.raises(FlowError, match="unknown text sampler"):
        TextSamplerOptions(sampler="beam")
    with pytest.raises(FlowError, match="expected"):  # canvas length 12 vs oracle's 10 tokens
        sample_text(lambda *a: (None, torch.zeros(2, 10, VOCAB)), None, cond, mask, 12, eos_id=EOS)
    with pytest.raises(FlowError, match="null_condition"):
        sample_video(AnalyticModel(), (2, 1, 1, 2, 2), cond, options=VideoSamplerOptions(guidance_scale=2.0))
    with pytest.raises(FlowError, match="NaN velocity"):
        sample_video(lambda v, *a: (torch.full_like(v, math.nan), None), (2, 1, 1, 2, 2), cond,
                     options=VideoSamplerOptions(guidance_scale=1.0))
    with pytest.raises(FlowError, match="velocity"):
        sample_video(lambda v, *a: (v[:, :, :1], None), (2, 1, 2, 2, 2), cond, options=VideoSamplerOptions(guidance_scale=1.0))
    with pytest.raises(FlowError, match="unknown video solver"):
        VideoSamplerOptions(solver="rk4")


def _full_vocabulary_step(tokens, log_probs, rng, temperature, path, q=None, commit=None):
    """Reference: draw a candidate at every position from its whole posterior, then keep the ones
    the step takes (Euler: masked positions that jump; confidence: the most probable masked ones)."""
    batch, length = tokens.shape
    probs = torch.softmax(log_probs.double() / (temperature or 1.0), -1)
    cdf = probs.cumsum(-1)
    u = rng.rand((batch, length)).double().unsqueeze(-1) * cdf[..., -1:]
    drawn = log_probs.argmax(-1) if temperature == 0 else torch.searchsorted(cdf, u, right=True).squeeze(-1)
    masked = tokens == path.mask_id
    if commit is None:
        jump = masked & (rng.rand((batch, length)) < q)
        return torch.where(jump, drawn, tokens)
    confidence = torch.softmax(log_probs.double(), -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
    confidence = torch.where(masked, confidence, -math.inf)
    out = tokens.clone()
    for b in range(batch):  # the commit[b] most confident masked positions, leftmost first on ties
        order = sorted(range(length), key=lambda i: (-confidence[b, i].item(), i))[: int(commit[b])]
        for i in order:
            if masked[b, i]:
                out[b, i] = drawn[b, i]
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_steps_draw_only_where_tokens_can_change_and_match_drawing_everywhere(temperature):
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=gen)
    tokens[torch.rand(3, 12, generator=gen) < 0.6] = path.mask_id
    log_probs = torch.log_softmax(2 * torch.randn(3, 12, VOCAB, generator=gen, dtype=torch.float64), -1)
    s, s_next = torch.full((3,), 0.8, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    q = path.commit_probability(s, s_next)[:, None]
    ours = discrete_euler_step(tokens, log_probs, s, s_next, path, RandomSource(3, seeds=[1, 2, 3]), temperature)
    reference = _full_vocabulary_step(tokens, log_probs, RandomSource(3, seeds=[1, 2, 3]), temperature, path, q=q)
    assert torch.equal(ours, reference) and not torch.equal(ours, tokens)
    commit = torch.tensor([1, 3, 0])
    ours = confidence_step(tokens, log_probs, commit, tokens == path.mask_id, RandomSource(3, seeds=[4, 5, 6]),
                           temperature)
    reference = _full_vocabulary_step(tokens, log_probs, RandomSource(3, seeds=[4, 5, 6]), temperature, path,
                                      commit=commit)
    assert torch.equal(ours, reference)
    assert ((ours != tokens).sum(dim=1) == commit).all()


def test_nan_check_flags_exactly_the_outputs_that_hold_a_nan():
    from univigu.flow.guidance import _has_nan

    x = torch.randn(3, 7, 50)
    assert not _has_nan(x)
    x[1, 4, 17] = math.nan
    assert _has_nan(x)
    both_infinities = torch.randn(2, 9)
    both_infinities[0, 1], both_infinities[1, 3] = math.inf, -math.inf  # their sum is NaN; no entry is
    assert not _has_nan(both_infinities)
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)

    def one_nan_logit(video, text, vt, tt, cond):
        logits = torch.zeros(*text.shape, VOCAB)
        logits[0, 0, 3] = math.nan
        return None, logits

    with pytest.raises(FlowError, match="NaN logits"):
        sample_text(one_nan_logit, None, torch.zeros(2, 3, 4), path, 10, eos_id=EOS)


def test_progress_bar_option_runs(capsys):
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    out = sample_text(AnalyticModel(target=TARGET), None, torch.zeros(2, 3, 4), path, 10, eos_id=EOS,
                      options=TextSamplerOptions(steps=3, progress=True), generator=_gen(0))
    assert torch.equal(out.tokens, TARGET)


# --------------------------------------------------------------------------------------------
# Joint T2VT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp2m"])
@pytest.mark.parametrize("text_grid", ["video", "linear"])
@pytest.mark.parametrize("text_sampler", ["euler", "confidence"])
def test_joint_sampler_recovers_both_targets(solver, text_grid, text_sampler):
    steps, mean, std = 24, 1.0, 0.5
    model = AnalyticModel(std=std, target=TARGET)
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    options = JointSamplerOptions(video=VideoSamplerOptions(steps=steps, solver=solver, shift=3.0, guidance_scale=1.0),
                                  text=TextSamplerOptions(sampler=text_sampler), text_grid=text_grid)
    out = sample_joint(model, (2, 1, 1, 4, 4), TARGET.shape[1], condition_with_mean([mean, mean]),
                       path=path, eos_id=EOS, options=options, generator=_gen(0))
    assert torch.equal(out.tokens, TARGET) and out.sequences == TARGET_TEXT
    noise = torch.randn((2, 1, 1, 4, 4), generator=_gen(0))
    tolerance = 0.3 if solver == "euler" else 0.05
    assert (out.video - exact_transport(noise, mean, std)).abs().max().item() < tolerance
    assert out.nfe == (2 * steps - 1 if solver == "heun" else steps)
    # Both modalities are noisy in every call and move on the chosen grids.
    video_grid = sampling_grid(steps, 3.0)
    text_levels = video_grid if text_grid == "video" else sampling_grid(steps, 1.0)
    first_evals = model.calls[::2] if solver == "heun" else model.calls
    for i, call in enumerate(first_evals[:steps]):
        # the model gets fp32 timesteps: 1000 s rounded once, at the size of the grid's first one (1000)
        assert_close_ordered(call["video_timestep"].double(), 1000 * video_grid[i].expand(2).double(), terms=1,
                             dtype=torch.float32, scale=1000.0)
        assert_close_ordered(call["text_timestep"].double(), 1000 * text_levels[i].expand(2).double(), terms=1,
                             dtype=torch.float32, scale=1000.0)


def test_joint_guidance_branches():
    model = AnalyticModel(target=TARGET, no_video_logits=torch.zeros(VOCAB))
    path = MixtureTextPath(VOCAB, "mask", SPECIALS)
    cond, null = condition_with_mean([1.0, 2.0]), torch.full((1, 3, 4), -3.0)
    options = JointSamplerOptions(video=VideoSamplerOptions(steps=4, solver="euler", guidance_scale=2.0),
                                  text=TextSamplerOptions(sampler="euler", guidance_scale=2.0))
    out = sample_joint(model, (2, 1, 1, 2, 2), 10, cond, null, path=path, eos_id=EOS, options=options,
                       generator=_gen(0))
    assert torch.equal(out.tokens, TARGET)
    assert out.nfe == 8  # per step: batched cond + uncond video branches, one no-video text branch
    batched = [c for c in model.calls if c["video"] is not None]
    no_video = [c for c in model.calls if c["video"] is None]
    assert len(batched) == len(no_video) == 4
    for call in batched:
        uncond_text, uncond_t, uncond_c = call["text"][2:], call["text_timestep"][2:], call["condition"][2:]
        assert torch.all(uncond_text == path.mask_id) and torch.all(uncond_t == 1000) and torch.all(uncond_c == -3.0)
        assert torch.equal(call["condition"][:2], cond)
    with pytest.raises(FlowError, match="blocks"):
        JointSamplerOptions(text=TextSamplerOptions(block_length=4))


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_draws_in_row_blocks_equal_drawing_all_rows_at_once(monkeypatch, temperature):
    """The categorical draw works through the rows in cache-sized blocks; the ids and confidences
    are the same as in one block, and an empty set of rows gives empty results."""
    from univigu.flow import categorical

    gen = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(7, 5, VOCAB, generator=gen)
    uniforms = torch.rand(7, 5, generator=gen, dtype=torch.float64)
    whole = categorical.draw_categorical(logits, uniforms, temperature, confidence=True)
    monkeypatch.setattr(categorical, "_DRAW_BLOCK_ELEMENTS", 3 * VOCAB)  # blocks of 3 rows
    blocked = categorical.draw_categorical(logits, uniforms, temperature, confidence=True)
    assert blocked[0].shape == (7, 5) and torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])
    expected = torch.softmax(logits.double(), -1).gather(-1, whole[0].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(whole[1], expected, rtol=1e-12, atol=0)  # the untempered probability
    empty = categorical.draw_categorical(logits[:0, 0], uniforms[:0, 0], temperature, confidence=True)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
