"""Losses of the unified flow against direct formulas on hand-built inputs."""

import math

import pytest
import torch

from univigu.flow.losses import (
    apply_carry_over,
    count_loss_terms,
    generalized_kl,
    joint_loss,
    text_cross_entropy,
    velocity_mse,
)
from univigu.flow.paths import FlowError, MixtureTextPath
from tolerances import assert_close_ordered, ordered_tolerance


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _log_softmax_row(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


LOGITS = [  # [B=2, L=3, V=4], by hand
    [[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [-3.0, 1.0, 1.0, 0.0]],
    [[0.0, 0.0, 0.0, 0.0], [5.0, -5.0, 1.0, 2.0], [1.5, -0.5, 0.25, 3.0]],
]
TARGET = [[0, 3, 1], [2, 0, 3]]


def test_velocity_mse_is_per_sample_mean():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).view(2, 1, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).view(2, 1, 1, 2, 2)
    assert velocity_mse(pred, target).tolist() == [(0 + 4 + 0 + 16) / 4, 1.0]
    with pytest.raises(FlowError, match="does not match"):
        velocity_mse(pred, target[:, :, :, :1])


def test_cross_entropy_matches_direct_formula():
    got = text_cross_entropy(torch.tensor(LOGITS), torch.tensor(TARGET))
    for b in range(2):
        for i in range(3):
            expected = -_log_softmax_row(LOGITS[b][i])[TARGET[b][i]]
            assert got[b, i].item() == pytest.approx(expected, abs=ordered_tolerance(expected, terms=4))  # 4 logits


@pytest.mark.parametrize("exponent", [1.0, 2.0])
def test_generalized_kl_matches_direct_formula(exponent):
    vocab = 4
    mask = vocab
    # Position kinds: masked (noisy = mask id), a wrong uniform-source token, a source token that
    # equals the data token by chance.
    noisy = [[mask, 2, 1], [2, mask, 0]]
    s = [0.3, 0.8]
    path = MixtureTextPath(vocab_size=vocab, source="uniform", kappa_exponent=exponent)
    got = generalized_kl(torch.tensor(LOGITS), torch.tensor(TARGET), torch.tensor(noisy),
                         torch.tensor(s), path, min_noise_level=0.0)
    for b in range(2):
        t = 1 - s[b]
        weight = exponent * t ** (exponent - 1) / (1 - t ** exponent)
        for i in range(3):
            log_p = _log_softmax_row(LOGITS[b][i])
            y, y_s = TARGET[b][i], noisy[b][i]
            p_noisy = math.exp(log_p[y_s]) if y_s < vocab else 0.0
            same = 1.0 if y_s == y else 0.0
            expected = -weight * (p_noisy - same + (1 - same) * log_p[y])
            terms_size = weight * (1 + abs(log_p[y]))  # the sum may cancel: the size of its terms
            assert got[b, i].item() == pytest.approx(expected, abs=ordered_tolerance(
                expected, terms=4, dtype=torch.float32, scale=terms_size))


@pytest.mark.parametrize("exponent", [1.0, 3.0])
def test_generalized_kl_with_carry_over_is_weighted_masked_cross_entropy(exponent):
    path = MixtureTextPath(vocab_size=7, source="mask", kappa_exponent=exponent)
    g = _gen(4)
    target = torch.randint(0, 7, (6, 20), generator=g)
    s = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    sample = path.sample(target, s, generator=g)
    logits = torch.randn(6, 20, 7, generator=g) * 2
    carried = apply_carry_over(logits, sample.noisy, path.mask_id)
    gkl = generalized_kl(carried, target, sample.noisy, s, path, min_noise_level=0.0)
    masked = sample.noisy == path.mask_id
    ce = text_cross_entropy(logits, target)
    t = 1 - s.double()
    weight = (exponent * t ** (exponent - 1) / (1 - t ** exponent)).float()[:, None]
    expected = torch.where(masked, weight * ce, torch.zeros_like(ce))
    assert_close_ordered(gkl, expected, terms=7)  # a log-softmax over 7 logits
    assert masked.any() and (~masked).any()


def test_carry_over_copies_unmasked_positions_and_blocks_their_gradient():
    mask = 5
    logits = torch.randn(2, 4, 5, generator=_gen(1), requires_grad=True)
    noisy = torch.tensor([[mask, 3, mask, 0], [1, 1, mask, 4]])
    out = apply_carry_over(logits, noisy, mask)
    unmasked = noisy != mask
    probs = out.softmax(-1)
    assert torch.equal(probs[unmasked].argmax(-1), noisy[unmasked])
    assert torch.all(probs[unmasked].max(-1).values == 1.0)
    assert torch.equal(out[~unmasked], logits[~unmasked])
    loss = text_cross_entropy(out, torch.where(unmasked, noisy, 2)).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[unmasked] == 0) and torch.any(logits.grad[~unmasked] != 0)


def _batch(seed, batch=6, length=8, vocab=9, video_shape=(2, 3, 4, 4)):
    g = _gen(seed)
    path = MixtureTextPath(vocab_size=vocab, source="mask", special_ids=(0, 1), kappa_exponent=1.0)
    text = torch.randint(2, vocab, (batch, length), generator=g)
    text[:, -3] = 1  # EOS
    text[:, -2:] = 0  # PAD tail
    s_text = torch.rand(batch, generator=g)
    s_video = torch.rand(batch, generator=g)
    s_text[0] = 0.0  # T2V sample: clean text
    s_video[1] = 0.0  # V2T sample: clean video
    noisy = path.sample(text, s_text, generator=g).noisy
    return dict(
        velocity=torch.randn(batch, *video_shape, generator=g),
        video_target=torch.randn(batch, *video_shape, generator=g),
        video_noise_level=s_video,
        logits=torch.randn(batch, length, vocab, generator=g),
        text_target=text,
        text_noisy=noisy,
        text_noise_level=s_text,
    ), path


def test_joint_loss_leaves_out_clean_modalities_and_covers_eos_and_pad():
    inputs, path = _batch(0)
    out = joint_loss(**inputs, path=path, text_weight=0.2)
    # Direct computation: video MSE over noisy-video samples; carried-over CE over every canvas
    # position of noisy-text samples (masked positions, EOS and PAD included; unmasked positions 0).
    video_rows = [b for b in range(6) if inputs["video_noise_level"][b] > 0]
    video = sum(((inputs["velocity"][b] - inputs["video_target"][b]) ** 2).mean() for b in video_rows) / len(video_rows)
    text_rows = [b for b in range(6) if inputs["text_noise_level"][b] > 0]
    total = 0.0
    for b in text_rows:
        for i in range(8):
            if inputs["text_noisy"][b, i] == path.mask_id:
                total += -torch.log_softmax(inputs["logits"][b, i], -1)[inputs["text_target"][b, i]]
    text = total / (len(text_rows) * 8)
    expected = (video + 0.2 * text).item()
    terms = inputs["velocity"].numel() + inputs["logits"].numel()  # every element is summed once
    assert out.loss.item() == pytest.approx(expected, abs=ordered_tolerance(expected, terms=terms, dtype=torch.float32))
    assert out.video_count.item() == 5 and out.text_count.item() == 5 * 8
    # A clean modality's prediction does not matter.
    changed = dict(inputs, velocity=inputs["velocity"].clone(), logits=inputs["logits"].clone())
    changed["velocity"][1] += 100.0
    changed["logits"][0] += torch.randn(8, 9, generator=_gen(9)) * 100
    assert_close_ordered(joint_loss(**changed, path=path, text_weight=0.2).loss, out.loss, terms=terms)
    # PAD positions are targets: a wrong prediction there (when masked) raises the loss.
    pad_masked = (inputs["text_target"] == 0) & (inputs["text_noisy"] == path.mask_id)
    pad_masked[0] = False
    assert pad_masked.any()
    wrong = dict(inputs, logits=inputs["logits"].clone())
    wrong["logits"][pad_masked] = torch.tensor([-20.0] + [20.0] * 8)
    assert joint_loss(**wrong, path=path, text_weight=0.2).loss > out.loss + 1.0


def test_joint_loss_generalized_kl_form():
    inputs, path = _batch(1)
    out = joint_loss(**inputs, path=path, text_loss="generalized_kl", text_weight=1.0)
    carried = apply_carry_over(inputs["logits"], inputs["text_noisy"], path.mask_id)
    per_token = generalized_kl(carried, inputs["text_target"], inputs["text_noisy"], inputs["text_noise_level"], path)
    active = inputs["text_noise_level"] > 0
    assert_close_ordered(out.text_loss, per_token[active].mean(), terms=per_token.numel())


def test_split_batch_normalisation_equals_whole_batch():
    inputs, path = _batch(2, batch=8)
    whole = joint_loss(**inputs, path=path, text_weight=0.5)
    whole_gkl = joint_loss(**inputs, path=path, text_weight=0.5, text_loss="generalized_kl")
    # Shards as processes would see them, with unequal numbers of active samples.
    shards = [slice(0, 1), slice(1, 5), slice(5, 8)]
    counts = [count_loss_terms(inputs["video_noise_level"][sh], inputs["text_noise_level"][sh], 8) for sh in shards]
    video_total = sum(c[0] for c in counts)  # what an all-reduce would give
    text_total = sum(c[1] for c in counts)
    for loss_kind, reference in (("cross_entropy", whole), ("generalized_kl", whole_gkl)):
        pieces = []
        for sh in shards:
            part = {k: v[sh] for k, v in inputs.items()}
            out = joint_loss(**part, path=path, text_weight=0.5, text_loss=loss_kind,
                             video_normalizer=video_total, text_normalizer=text_total)
            pieces.append(out)
        terms = inputs["velocity"].numel() + inputs["logits"].numel()
        assert_close_ordered(sum(p.loss for p in pieces), reference.loss, terms=terms)
        assert_close_ordered(sum(p.video_sum for p in pieces), reference.video_sum, terms=terms)
    # Averaging per-shard means instead would be wrong here (unequal active counts).
    naive = sum(joint_loss(**{k: v[sh] for k, v in inputs.items()}, path=path, text_weight=0.5).loss
                for sh in shards) / len(shards)
    assert abs(naive.item() - whole.loss.item()) > 1e-3


def test_joint_loss_gradients_are_finite_and_skip_clean_samples():
    inputs, path = _batch(3)
    velocity = inputs["velocity"].clone().requires_grad_(True)
    logits = inputs["logits"].clone().requires_grad_(True)
    out = joint_loss(**dict(inputs, velocity=velocity, logits=logits), path=path, text_loss="generalized_kl")
    out.loss.backward()
    assert torch.isfinite(velocity.grad).all() and torch.isfinite(logits.grad).all()
    assert torch.all(velocity.grad[1] == 0) and torch.all(logits.grad[0] == 0)
    # Video-only and text-only batches.
    v_only = joint_loss(velocity=inputs["velocity"], video_target=inputs["video_target"],
                        video_noise_level=inputs["video_noise_level"])
    assert v_only.text_count.item() == 0 and v_only.loss.item() == pytest.approx(v_only.video_loss.item())
    t_only = joint_loss(logits=inputs["logits"], text_target=inputs["text_target"], text_noisy=inputs["text_noisy"],
                        text_noise_level=torch.zeros(6), path=path)
    assert t_only.loss.item() == 0.0  # every text sample clean: nothing to learn


def test_joint_loss_rejects_bad_input():
    inputs, path = _batch(4)
    with pytest.raises(FlowError, match="together"):
        joint_loss(velocity=inputs["velocity"], video_target=inputs["video_target"])
    with pytest.raises(FlowError, match="unknown text loss"):
        joint_loss(**inputs, path=path, text_loss="mse")
    with pytest.raises(FlowError, match="text path"):
        joint_loss(**inputs)
    uniform = MixtureTextPath(vocab_size=9, source="uniform", special_ids=(0, 1))
    with pytest.raises(FlowError, match="carry-over"):
        joint_loss(**inputs, path=uniform, carry_over=True)
    bad = dict(inputs, text_target=inputs["text_target"].clone())
    bad["text_target"][0, 0] = 9  # the mask id is never a target
    with pytest.raises(FlowError, match="targets must lie"):
        joint_loss(**bad, path=path)
