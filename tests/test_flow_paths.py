"""Paths of the unified flow: time conventions, the rectified-flow path and the text mixture path."""

import math

import pytest
import torch
from scipy import integrate, stats

from univigu.flow import paths as P
from univigu.flow.paths import FlowError, MixtureTextPath, NoiseLevelSampler, RectifiedFlowPath
from tolerances import assert_close_ordered


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Time conventions
# --------------------------------------------------------------------------------------------


def test_time_conversions_known_values():
    s = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert P.noise_level_to_timestep(s).tolist() == [0.0, 250.0, 1000.0]
    assert P.noise_level_to_fm_time(s).tolist() == [1.0, 0.75, 0.0]
    # shift 3 at s = 0.5: 1.5 / 2
    assert P.shift_noise_level(torch.tensor([0.5], dtype=torch.float64), 3.0).item() == pytest.approx(0.75)
    # kappa = (1 - s)^n, flow_matching's t^n with t = 1 - s
    assert P.kappa(torch.tensor([0.5], dtype=torch.float64), 2.0).item() == pytest.approx(0.25)
    # MDLM / LLaDA: with n = 1 their masking probability is our noise level
    assert torch.allclose(P.mask_probability(s, 1.0), s)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 5.0])
@pytest.mark.parametrize("exponent", [0.5, 1.0, 2.0, 3.0])
def test_every_time_conversion_round_trips(shift, exponent):
    s = torch.rand(1000, generator=_gen(1), dtype=torch.float64)
    s = torch.cat([s, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    tol = dict(atol=1e-12, rtol=0)
    assert torch.allclose(P.timestep_to_noise_level(P.noise_level_to_timestep(s)), s, **tol)
    assert torch.allclose(P.fm_time_to_noise_level(P.noise_level_to_fm_time(s)), s, **tol)
    assert torch.allclose(P.unshift_noise_level(P.shift_noise_level(s, shift), shift), s, **tol)
    assert torch.allclose(P.shift_noise_level(P.unshift_noise_level(s, shift), shift), s, **tol)
    assert torch.allclose(P.kappa_inverse(P.kappa(s, exponent), exponent), s, atol=1e-9, rtol=0)
    assert torch.allclose(P.kappa(P.kappa_inverse(s, exponent), exponent), s, atol=1e-12, rtol=0)


def test_shift_matches_diffusers_flow_match_scheduler():
    diffusers = pytest.importorskip("diffusers")
    # The training sigmas of diffusers' flow-matching scheduler: shifted 1..1/1000.
    plain = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas.double()
    shifted = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigmas = shifted.sigmas.double()
    # diffusers' sigmas are fp32: a linspace, a division by 1000 and the shift's 3 operations; ours fp64
    assert_close_ordered(P.shift_noise_level(plain, 3.0), sigmas, terms=5, dtype=torch.float32)
    assert_close_ordered(P.unshift_noise_level(sigmas, 3.0), plain, terms=5, dtype=torch.float32)
    # diffusers' timesteps are 1000 * sigma: our model timestep.
    assert_close_ordered(P.timestep_to_noise_level(shifted.timesteps.double()), sigmas, terms=2, dtype=torch.float32)


def test_sampling_grid_is_descending_from_one_to_zero():
    for shift in (1.0, 3.0):
        grid = P.sampling_grid(7, shift)
        assert grid.shape == (8,) and grid[0] == 1.0 and grid[-1] == 0.0
        assert torch.all(grid[1:] < grid[:-1])
    assert torch.allclose(P.sampling_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(FlowError, match="steps"):
        P.sampling_grid(0)


@pytest.mark.parametrize("exponent", [1.0, 2.0, 3.0])
def test_jump_rate_and_commit_probability_match_calculus(exponent):
    def kappa_t(t):  # flow_matching time
        return t ** exponent

    for s in (0.2, 0.5, 0.9):
        t, h = 1.0 - s, 1e-6
        derivative = (kappa_t(t + h) - kappa_t(t - h)) / (2 * h)
        st = torch.tensor([s], dtype=torch.float64)
        assert P.kappa_derivative(st, exponent).item() == pytest.approx(derivative, rel=1e-6)
        assert P.jump_rate(st, exponent).item() == pytest.approx(derivative / (1 - kappa_t(t)), rel=1e-6)
    # The exact step probability is 1 - exp(-integral of the jump rate).
    for s, s_next in ((1.0, 0.7), (0.6, 0.3), (0.3, 0.05)):
        rate = lambda t: exponent * t ** (exponent - 1) / (1 - t ** exponent)  # noqa: E731
        integral, _ = integrate.quad(rate, 1 - s, 1 - s_next)
        got = P.commit_probability(torch.tensor([s], dtype=torch.float64),
                                   torch.tensor([s_next], dtype=torch.float64), exponent).item()
        assert got == pytest.approx(1 - math.exp(-integral), rel=1e-7)
    final = P.commit_probability(torch.tensor([0.4], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    assert final.item() == 1.0


def test_bad_time_inputs_raise_one_clear_error():
    with pytest.raises(FlowError, match=r"\[0, 1\]"):
        P.noise_level_to_timestep(torch.tensor([1.5]))
    with pytest.raises(FlowError, match="timestep"):
        P.timestep_to_noise_level(torch.tensor([1200.0]))
    with pytest.raises(FlowError, match="shift"):
        P.shift_noise_level(torch.tensor([0.5]), 0.0)
    with pytest.raises(FlowError, match="float"):
        P.kappa(torch.tensor([1]))
    with pytest.raises(FlowError, match="s_next <= s"):
        P.commit_probability(torch.tensor([0.2]), torch.tensor([0.5]))


# --------------------------------------------------------------------------------------------
# Training noise levels
# --------------------------------------------------------------------------------------------


def test_noise_level_samplers_have_the_right_distributions():
    n = 20000
    uniform = NoiseLevelSampler("uniform")(n, _gen(0))
    assert stats.kstest(uniform.numpy(), "uniform").pvalue > 1e-3
    ln = NoiseLevelSampler("logit_normal", logit_normal_mean=0.5, logit_normal_std=0.8)(n, _gen(1)).double()
    logits = torch.log(ln) - torch.log1p(-ln)
    assert stats.kstest(logits.numpy(), "norm", args=(0.5, 0.8)).pvalue > 1e-3
    shifted = NoiseLevelSampler("shifted", shift=3.0)(n, _gen(2)).double()
    assert stats.kstest(P.unshift_noise_level(shifted, 3.0).numpy(), "uniform").pvalue > 1e-3
    assert shifted.mean() > 0.6  # a shift > 1 moves mass to high noise
    # Same generator seed, same draws.
    assert torch.equal(NoiseLevelSampler("logit_normal")(64, _gen(5)), NoiseLevelSampler("logit_normal")(64, _gen(5)))
    with pytest.raises(FlowError, match="sampling method"):
        NoiseLevelSampler("cosine")


def test_noise_level_sampler_from_config():
    from univigu.config import FlowConfig

    sampler = NoiseLevelSampler.from_config(FlowConfig(video_time_sampling="shifted", train_shift=2.0))
    assert sampler.method == "shifted" and sampler.shift == 2.0


# --------------------------------------------------------------------------------------------
# Video path
# --------------------------------------------------------------------------------------------


def test_rectified_flow_path_formulas():
    g = _gen(3)
    data = torch.randn(4, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    s = torch.tensor([0.0, 0.3, 0.8, 1.0], dtype=torch.float64)
    sample = RectifiedFlowPath().sample(data, s, noise=noise)
    assert torch.equal(sample.noisy[0], data[0]) and torch.equal(sample.noisy[3], noise[3])
    assert_close_ordered(sample.noisy[1], 0.7 * data[1] + 0.3 * noise[1], terms=2)
    assert torch.equal(sample.target, noise - data)
    # The target is d x_s / d s (finite difference of the path).
    h = 1e-6
    up = RectifiedFlowPath().sample(data, s.clamp(max=1 - h) + h, noise=noise).noisy
    down = RectifiedFlowPath().sample(data, s.clamp(max=1 - h), noise=noise).noisy
    # linear in s, so no truncation error: only the rounding of up and down, divided by h
    assert_close_ordered((up - down) / h, sample.target, terms=2, scale=up.abs().max().item() / h)
    assert_close_ordered(RectifiedFlowPath.velocity_to_data(sample.noisy, sample.target, s), data, terms=2,
                         scale=sample.target.abs().max().item())
    assert_close_ordered(RectifiedFlowPath.velocity_to_noise(sample.noisy, sample.target, s), noise, terms=2,
                         scale=sample.target.abs().max().item())
    assert sample.timestep.tolist() == [0.0, 300.0, 800.0, 1000.0]


def test_rectified_flow_path_checks_inputs():
    data = torch.zeros(2, 3)
    with pytest.raises(FlowError, match=r"shape \[2\]"):
        RectifiedFlowPath().sample(data, torch.tensor([0.5]))
    with pytest.raises(FlowError, match="noise shape"):
        RectifiedFlowPath().sample(data, torch.tensor([0.5, 0.5]), noise=torch.zeros(2, 4))
    # Seeded noise is reproducible.
    a = RectifiedFlowPath().sample(data, torch.tensor([0.5, 0.5]), generator=_gen(1)).noise
    b = RectifiedFlowPath().sample(data, torch.tensor([0.5, 0.5]), generator=_gen(1)).noise
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Text mixture path
# --------------------------------------------------------------------------------------------


def _three_sigma(count, total, p):
    frac = count / total
    sigma = math.sqrt(p * (1 - p) / total)
    return abs(frac - p) <= 3 * sigma + 1e-12, frac, sigma


@pytest.mark.parametrize("exponent", [1.0, 2.0])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9])
def test_mask_source_data_fraction_matches_kappa(exponent, s):
    path = MixtureTextPath(vocab_size=50, source="mask", special_ids=(0, 1, 2), kappa_exponent=exponent)
    batch, length = 400, 256  # 102,400 tokens
    data = torch.randint(0, 50, (batch, length), generator=_gen(7))
    sample = path.sample(data, torch.full((batch,), s), generator=_gen(8))
    kept = sample.noisy != path.mask_id
    ok, frac, sigma = _three_sigma(kept.sum().item(), kept.numel(), (1 - s) ** exponent)
    assert ok, f"data fraction {frac} vs kappa {(1 - s) ** exponent} (sigma {sigma})"
    assert torch.equal(kept, sample.from_data)
    assert torch.equal(sample.noisy[kept], data[kept])
    assert torch.all(sample.noisy[~kept] == 50)


@pytest.mark.parametrize("s", [0.3, 0.7])
def test_uniform_source_tracked_data_fraction_matches_kappa(s):
    specials = (0, 1, 2, 3)
    vocab = 12
    path = MixtureTextPath(vocab_size=vocab, source="uniform", special_ids=specials, kappa_exponent=1.5)
    allowed = path.source_ids()
    assert allowed.tolist() == list(range(4, vocab))
    batch, length = 500, 256
    data = allowed[torch.randint(0, len(allowed), (batch, length), generator=_gen(9))]
    sample = path.sample(data, torch.full((batch,), s), generator=_gen(10))
    k = (1 - s) ** 1.5
    ok, frac, sigma = _three_sigma(sample.from_data.sum().item(), data.numel(), k)
    assert ok, f"tracked data fraction {frac} vs kappa {k} (sigma {sigma})"
    assert torch.equal(sample.noisy[sample.from_data], data[sample.from_data])
    source = sample.noisy[~sample.from_data]
    assert not torch.isin(source, torch.tensor(specials)).any(), "a special token came from the source"
    # Source draws are uniform over the allowed ids.
    counts = torch.bincount(source - 4, minlength=len(allowed)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    # Counting tokens equal to the data overstates the fraction by the chance matches, 1 / |allowed|.
    naive = (sample.noisy == data).double().mean().item()
    expected_naive = k + (1 - k) / len(allowed)
    assert abs(naive - expected_naive) < 3 * math.sqrt(expected_naive * (1 - expected_naive) / data.numel())
    assert naive - k > 5 * sigma


def test_text_path_checks_inputs():
    with pytest.raises(FlowError, match="source"):
        MixtureTextPath(10, source="absorbing")
    with pytest.raises(FlowError, match="no ids left"):
        MixtureTextPath(2, source="uniform", special_ids=(0, 1))
    path = MixtureTextPath(10)
    assert path.mask_id == 10
    with pytest.raises(FlowError, match="outside"):
        path.sample(torch.tensor([[3, 10]]), torch.tensor([0.5]))
    with pytest.raises(FlowError, match=r"shape \[1\]"):
        path.sample(torch.tensor([[3, 4]]), torch.tensor([0.5, 0.1]))
    # s = 0 keeps every data token, s = 1 none.
    data = torch.randint(0, 10, (4, 64), generator=_gen(0))
    assert torch.equal(path.sample(data, torch.zeros(4)).noisy, data)
    assert torch.all(path.sample(data, torch.ones(4)).noisy == 10)
