"""KL estimators against the closed-form KL of a categorical; the controllers' updates and state."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    kl_penalty,
    logprob_mismatch,
    make_kl_controller,
)


def _categoricals(seed: int, scale: float, vocab: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """log p (policy) and log q (reference), with q a perturbation of p of size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    logits_p = torch.randn(vocab, generator=g, dtype=torch.float64)
    logits_q = logits_p + scale * torch.randn(vocab, generator=g, dtype=torch.float64)
    return torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)


def test_estimators_exact_algebra() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -1.5, -2.5, -0.1]], dtype=torch.float64)
    d = logp - ref
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), d)
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * d**2)
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), (r - 1) - torch.log(r))
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(logp, ref, est)[0, 0].item() == 0.0  # identical policies: no penalty
    assert (kl_penalty(logp, ref, "k3") >= 0).all() and (kl_penalty(logp, ref, "k2") >= 0).all()
    assert kl_penalty(logp, ref, "k1")[0, 1].item() < 0  # k1 is negative where the policy is less likely


def test_k3_is_accurate_for_nearly_equal_policies() -> None:
    logp = torch.tensor([-1.0], dtype=torch.float32)
    ref = logp - 1e-4
    # (r - 1) - log r = x^2 / 2 + O(x^3) for log r = x; naive exp(x) - 1 - x loses it in float32
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5e-8, rel=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased_exactly_in_expectation(seed: int) -> None:
    """Sum over the vocabulary weighted by p: the exact expectation over tokens sampled from p."""
    logp, logq = _categoricals(seed, scale=1.0)
    p = logp.exp()
    kl = (p * (logp - logq)).sum()
    torch.testing.assert_close((p * kl_penalty(logp, logq, "k1")).sum(), kl)
    torch.testing.assert_close((p * kl_penalty(logp, logq, "k3")).sum(), kl)
    torch.testing.assert_close(
        kl,
        torch.distributions.kl_divergence(
            torch.distributions.Categorical(logits=logp), torch.distributions.Categorical(logits=logq)
        ),
    )
    # k2 is biased for a large KL
    assert abs((p * kl_penalty(logp, logq, "k2")).sum().item() - kl.item()) > 0.01 * kl.item()


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_estimates_match_closed_form_kl(seed: int) -> None:
    """Monte Carlo over tokens sampled from p, within 4 standard errors; k2 within 10% for a small KL."""
    logp, logq = _categoricals(seed, scale=0.2)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logp), torch.distributions.Categorical(logits=logq)
    ).item()
    n = 200_000
    tokens = torch.multinomial(logp.exp(), n, replacement=True, generator=torch.Generator().manual_seed(seed))
    sample_logp, sample_logq = logp[tokens], logq[tokens]
    for est in ("k1", "k3"):
        k = kl_penalty(sample_logp, sample_logq, est)
        stderr = k.std().item() / math.sqrt(n)
        assert abs(k.mean().item() - kl) < 4 * stderr, est
    k1 = kl_penalty(sample_logp, sample_logq, "k1")
    k3 = kl_penalty(sample_logp, sample_logq, "k3")
    assert k3.std() < k1.std()  # the reason to use k3
    assert kl_penalty(sample_logp, sample_logq, "k2").mean().item() == pytest.approx(kl, rel=0.1)


def test_kl_penalty_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(3, 2), "k1")


def test_fixed_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    state = ctl.state_dict()
    assert state == {"value": 0.05}
    other = FixedKLController(0.3)
    other.load_state_dict(state)
    assert other.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_controller_follows_ziegler() -> None:
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(7.5, 512)  # error 0.25 clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000))
    v = ctl.value
    ctl.update(torch.tensor(6.6), 1000)  # error 0.1, tensor input
    assert ctl.value == pytest.approx(v * (1 + 0.1 * 1000 / 10000))
    v = ctl.value
    ctl.update(0.0, 2000)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(v * (1 - 0.2 * 2000 / 10000))
    v = ctl.value
    ctl.update(6.0, 5000)  # on target: unchanged
    assert ctl.value == pytest.approx(v)


def test_adaptive_controller_converges_towards_target_kl() -> None:
    """With KL inversely proportional to the coefficient (a toy policy), the coefficient settles at target."""
    ctl = AdaptiveKLController(0.01, target=2.0, horizon=100)
    for _ in range(500):
        ctl.update(0.1 / ctl.value, 10)  # kl = 0.1 / beta, target reached at beta = 0.05
    assert ctl.value == pytest.approx(0.05, rel=0.02)


def test_adaptive_controller_state_round_trip() -> None:
    a = AdaptiveKLController(0.1, 6.0, 10000)
    for kl in (8.0, 9.0, 3.0):
        a.update(kl, 256)
    b = AdaptiveKLController(0.1, 6.0, 10000)
    b.load_state_dict(a.state_dict())
    for kl in (7.0, 1.0):
        a.update(kl, 256)
        b.update(kl, 256)
    assert a.value == b.value


@pytest.mark.parametrize(
    "kwargs", [{"init_kl_coef": 0.0}, {"target": 0.0}, {"horizon": 0}, {"init_kl_coef": -1.0}]
)
def test_adaptive_controller_refuses_bad_arguments(kwargs: dict) -> None:
    args = {"init_kl_coef": 0.1, "target": 6.0, "horizon": 10000} | kwargs
    with pytest.raises(ValueError):
        AdaptiveKLController(**args)


def test_make_kl_controller() -> None:
    fixed = make_kl_controller(0.05, adaptive=False)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    adaptive = make_kl_controller(0.05, adaptive=True, target=3.0, horizon=500)
    assert isinstance(adaptive, AdaptiveKLController) and isinstance(adaptive, KLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 3.0, 500.0)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller(0.05, adaptive=True, target=None, horizon=500)


def test_logprob_mismatch_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    sampler = -torch.rand(3, 5, generator=gen)
    trainer = sampler + 0.2 * torch.randn(3, 5, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.3
    gap, kl = logprob_mismatch(sampler, trainer, mask)
    pairs = [(sampler[i, t].item(), trainer[i, t].item()) for i in range(3) for t in range(5) if mask[i, t]]
    assert gap.item() == pytest.approx(sum(abs(b - a) for a, b in pairs) / len(pairs), rel=1e-6)
    expected = sum(math.exp(b - a) - 1 - (b - a) for a, b in pairs) / len(pairs)
    assert kl.item() == pytest.approx(expected, rel=1e-5) and kl.item() > 0
    zero_gap, zero_kl = logprob_mismatch(sampler, sampler.clone(), mask)
    assert zero_gap.item() == 0.0 and zero_kl.item() == 0.0
