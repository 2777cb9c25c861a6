"""Clipped policy and value losses against a hand-written per-element reference; masking of gradients."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo.losses import kl_loss, policy_loss, ppo_loss, value_loss
from rlhf.ppo.ops import masked_mean


def policy_reference(logp, old, adv, mask, c) -> tuple[float, float, float, float]:
    losses, clipped, kls, ratios = [], [], [], []
    for lp_row, old_row, a_row, m_row in zip(logp, old, adv, mask):
        for lp, o, a, m in zip(lp_row, old_row, a_row, m_row):
            if not m:
                continue
            ratio = math.exp(lp - o)
            unclipped = -a * ratio
            clip = -a * min(max(ratio, 1 - c), 1 + c)
            losses.append(max(unclipped, clip))
            clipped.append(1.0 if clip > unclipped else 0.0)
            kls.append(0.5 * (lp - o) ** 2)
            ratios.append(ratio)
    n = len(losses)
    return sum(losses) / n, sum(clipped) / n, sum(kls) / n, sum(ratios) / n


def value_reference(v, old, ret, mask, c) -> tuple[float, float]:
    losses, clipped = [], []
    for v_row, o_row, r_row, m_row in zip(v, old, ret, mask):
        for vi, o, r, m in zip(v_row, o_row, r_row, m_row):
            if not m:
                continue
            unclipped = (vi - r) ** 2
            vc = o + min(max(vi - o, -c), c)
            clip = (vc - r) ** 2
            losses.append(0.5 * max(unclipped, clip))
            clipped.append(1.0 if abs(vi - o) > c and clip > unclipped else 0.0)
    return sum(losses) / len(losses), sum(clipped) / len(clipped)


def _batch(seed: int, spread: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    logp = old + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[0, 0] = True
    return logp, old, adv, mask


@pytest.mark.parametrize(("seed", "spread"), [(0, 0.05), (1, 0.3), (2, 1.0)])
def test_policy_loss_matches_reference(seed: int, spread: float) -> None:
    logp, old, adv, mask = _batch(seed, spread)
    loss, stats = policy_loss(logp, old, adv, mask, cliprange=0.2)
    ref_loss, ref_clip, ref_kl, ref_ratio = policy_reference(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2
    )
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(ref_clip)
    assert stats["approxkl"].item() == pytest.approx(ref_kl, rel=1e-10)
    assert stats["ratio"].item() == pytest.approx(ref_ratio, rel=1e-10)
    assert set(stats) >= {"clipfrac", "approxkl", "ratio"}
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())


def test_policy_loss_on_policy_is_minus_mean_advantage_and_unclipped() -> None:
    logp, _, adv, mask = _batch(3, 0.0)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2)
    assert loss.item() == pytest.approx(-adv[mask].mean().item())
    assert stats["clipfrac"].item() == 0.0 and stats["approxkl"].item() == 0.0
    assert stats["ratio"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "clipped"),
    [
        (0.5, 1.0, True),  # ratio 1.65 > 1.2 with A > 0: clipped, no gradient
        (0.5, -1.0, False),  # ratio above range but A < 0: pessimistic unclipped term, gradient flows
        (-0.5, -1.0, True),  # ratio 0.61 < 0.8 with A < 0: clipped
        (-0.5, 1.0, False),  # ratio below range with A > 0: unclipped
        (0.1, 1.0, False),  # inside the range
    ],
)
def test_policy_loss_clipping_cases(log_ratio: float, adv: float, clipped: bool) -> None:
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old + log_ratio).requires_grad_(True)
    loss, stats = policy_loss(logp, old, torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1), 0.2)
    loss.backward()
    ratio = math.exp(log_ratio)
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)
    if clipped:
        assert logp.grad.item() == 0.0
        assert loss.item() == pytest.approx(-adv * min(max(ratio, 0.8), 1.2))
    else:
        assert logp.grad.item() == pytest.approx(-adv * ratio)  # d(-A r)/d logp = -A r
        assert loss.item() == pytest.approx(-adv * ratio)


def test_policy_loss_gradient_is_zero_on_masked_positions_even_with_garbage() -> None:
    logp, old, adv, mask = _batch(4, 0.3)
    dirty_logp = logp.clone()
    dirty_logp[~mask] = 50.0  # garbage that would dominate a naive (x * mask) mean
    dirty_old = old.clone()
    dirty_old[~mask] = float("nan")
    dirty_adv = adv.clone()
    dirty_adv[~mask] = float("inf")
    dirty_logp.requires_grad_(True)
    loss, stats = policy_loss(dirty_logp, dirty_old, dirty_adv, mask, 0.2)
    clean_loss, clean_stats = policy_loss(logp, old, adv, mask, 0.2)
    torch.testing.assert_close(loss, clean_loss)
    for key in clean_stats:
        torch.testing.assert_close(stats[key], clean_stats[key])
    loss.backward()
    assert torch.isfinite(dirty_logp.grad).all()
    assert (dirty_logp.grad[~mask] == 0).all()
    assert (dirty_logp.grad[mask] != 0).any()


def test_policy_loss_mean_is_over_tokens_of_the_minibatch() -> None:
    """Token-level mean: a long sequence weighs more than a short one (TRL's masked_mean convention)."""
    old = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    loss, _ = policy_loss(old.clone(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(4 * 1.0 - 2.0) / 5)


def test_policy_loss_refuses_bad_input() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="cliprange"):
        policy_loss(x, x, x, torch.ones(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, torch.zeros(2, 4), torch.ones(2, 3), 0.2)


@pytest.mark.parametrize(("seed", "spread"), [(0, 0.05), (1, 0.5), (2, 2.0)])
def test_value_loss_matches_reference(seed: int, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(4, 6, generator=g, dtype=torch.float64)
    values = old + spread * torch.randn(4, 6, generator=g, dtype=torch.float64)
    returns = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[0, 0] = True
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    ref_loss, ref_clip = value_reference(values.tolist(), old.tolist(), returns.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    assert stats["clipfrac"].item() == pytest.approx(ref_clip)
    assert stats["vpred"].item() == pytest.approx(values[mask].mean().item())
    if spread == 2.0:
        assert 0 < stats["clipfrac"].item() < 1


@pytest.mark.parametrize(
    ("old", "new", "ret", "clipped"),
    [
        (0.0, 1.0, 2.0, True),  # moved 1.0 towards the target: clipped at 0.2, larger error kept, no grad
        (0.0, 1.0, -2.0, False),  # moved away from the target: unclipped error is the larger
        (0.0, 0.1, 2.0, False),  # within the clip range
    ],
)
def test_value_loss_clipping_cases(old: float, new: float, ret: float, clipped: bool) -> None:
    values = torch.tensor([[new]], dtype=torch.float64, requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([[old]]), torch.tensor([[ret]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert stats["clipfrac"].item() == (1.0 if clipped else 0.0)
    if clipped:
        v_clipped = old + max(min(new - old, 0.2), -0.2)
        assert loss.item() == pytest.approx(0.5 * (v_clipped - ret) ** 2)
        assert values.grad.item() == 0.0
    else:
        assert loss.item() == pytest.approx(0.5 * (new - ret) ** 2)
        assert values.grad.item() == pytest.approx(new - ret)


def test_value_clipfrac_ignores_rounding_inside_the_clip_range() -> None:
    """|V - V_old| = 0.097 < 0.2: nothing is clipped, although in float32 old + (V - old) != V and its error is the
    larger by one rounding step (such tokens made FSDP's and DDP's clip fractions differ by a token)."""
    old, v, ret = (
        torch.tensor([[-0.01583387330174446]]),
        torch.tensor([[0.08113164454698563]]),
        torch.tensor([[-0.18570122122764587]]),
    )
    assert (old + (v - old)).item() != v.item()  # the rounding this test is about
    loss, stats = value_loss(v, old, ret, torch.ones(1, 1), cliprange_value=0.2)
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * (v - ret).square().item(), rel=1e-6)


def test_value_loss_without_clipping_and_masked_gradient() -> None:
    values = torch.tensor([[1.0, 5.0, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, float("nan"), 0.0]])
    returns = torch.tensor([[2.0, float("inf"), 0.0]])
    mask = torch.tensor([[1, 0, 1]])
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 9.0) / 2)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-0.5, 0.0, 1.5]]))
    with pytest.raises(ValueError, match="cliprange_value"):
        value_loss(values, old, returns, mask, cliprange_value=-1.0)


def kl_loss_reference(logp, ref, mask, estimator: str) -> float:
    values = []
    for lp_row, ref_row, m_row in zip(logp, ref, mask):
        for lp, q, m in zip(lp_row, ref_row, m_row):
            if not m:
                continue
            d = lp - q  # log p - log q
            values.append({"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[estimator])
    return sum(values) / len(values)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_loss_matches_reference(estimator: str) -> None:
    logp, ref, _, mask = _batch(5, 0.5)
    loss = kl_loss(logp, ref, mask, estimator)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(
        kl_loss_reference(logp.tolist(), ref.tolist(), mask.tolist(), estimator)
    )


def test_kl_loss_gradient_is_k3s_and_zero_on_masked_positions() -> None:
    """d k3 / d logp = 1 - exp(ref - logp) per token, over the number of action tokens; garbage off the mask ignored."""
    logp, ref, _, mask = _batch(6, 0.5)
    dirty_logp = torch.where(mask, logp, 40.0).requires_grad_(True)
    dirty_ref = torch.where(mask, ref, float("nan"))
    loss = kl_loss(dirty_logp, dirty_ref, mask, "k3")
    assert loss.item() == pytest.approx(kl_loss(logp, ref, mask, "k3").item())
    loss.backward()
    n = mask.sum().item()
    expected = torch.where(mask, (1 - torch.exp(ref - logp)) / n, 0.0)
    torch.testing.assert_close(dirty_logp.grad, expected)
    assert kl_loss(ref.clone(), ref, mask, "k3").item() == 0.0  # the reference itself: no penalty


def test_ppo_loss_is_the_sum_of_its_terms_and_reports_them_under_trl_names():
    torch.manual_seed(0)
    B, T = 4, 6
    logprobs = torch.randn(B, T, requires_grad=True)
    entropy, old, adv, ref = torch.rand(B, T), torch.randn(B, T), torch.randn(B, T), torch.randn(B, T)
    values, old_values, returns = torch.randn(B, T, requires_grad=True), torch.randn(B, T), torch.randn(B, T)
    mask = torch.rand(B, T) > 0.3
    loss, stats = ppo_loss(
        logprobs, entropy, old, adv, mask, cliprange=0.2, ent_coef=0.1, ref_logprobs=ref, kl_coef=0.5,
        kl_estimator="k3", values=values, old_values=old_values, returns=returns, cliprange_value=0.2, vf_coef=0.1,
    )  # fmt: skip
    pg, _ = policy_loss(logprobs, old, adv, mask, 0.2)
    vf, _ = value_loss(values, old_values, returns, mask, 0.2)
    expected = pg - 0.1 * masked_mean(entropy, mask) + 0.5 * kl_loss(logprobs, ref, mask, "k3") + 0.1 * vf
    torch.testing.assert_close(loss, expected)
    assert {
        "loss/policy_avg",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "val/ratio",
    } | {"loss/kl_avg", "loss/value_avg", "val/clipfrac_avg"} == set(stats)
    alone, alone_stats = ppo_loss(logprobs, entropy, old, adv, mask, cliprange=0.2)  # the policy's terms only
    torch.testing.assert_close(alone, pg)
    assert "loss/kl_avg" not in alone_stats and "loss/value_avg" not in alone_stats


def test_a_batch_selects_every_tensor_alike():
    from rlhf.ppo.batch import Batch

    t = torch.arange(12).reshape(4, 3)
    batch = Batch(t, t + 1, t > 5, t * 1.0, t * 2.0, t * 3.0, t * 4.0, t * 5.0, context_length=1)
    part = batch.select(torch.tensor([2, 0]))
    assert len(part) == 2 and part.context_length == 1
    assert torch.equal(part.returns, (t * 5.0)[[2, 0]]) and torch.equal(part.action_mask, (t > 5)[[2, 0]])
    assert torch.equal(batch.select(slice(1, 3)).query_responses, t[1:3])
