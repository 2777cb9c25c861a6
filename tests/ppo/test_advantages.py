"""GAE against a plain Python loop (holes, padding, gamma/lam); group baselines against loops."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo.advantages import gae, group_advantages, group_token_advantages


def gae_loop(
    rewards: list[list[float]], values: list[list[float]], mask: list[list[int]], gamma: float, lam: float
) -> tuple[list[list[float]], list[list[float]]]:
    """Reference: per row, keep only the action tokens, run textbook GAE over them, scatter back."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        steps = [t for t, m in enumerate(m_row) if m]
        adv_row = [0.0] * len(m_row)
        ret_row = [0.0] * len(m_row)
        last = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = v_row[steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = r_row[t] + gamma * next_value - v_row[t]
            last = delta + gamma * lam * last
            adv_row[t] = last
            ret_row[t] = last + v_row[t]
        advantages.append(adv_row)
        returns.append(ret_row)
    return advantages, returns


def _episode_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding, multi-turn holes (environment tokens), right padding; KL-style reward on every action
    token plus a sparse score on each row's last action token."""
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1, 1, 0, 0],  # left and right padding
            [1, 1, 0, 0, 1, 1, 0, 1, 1, 0],  # two holes (environment messages) then padding
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # full row
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # empty row (e.g. a padded-out sample)
            [0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # a single action token
        ],
        dtype=torch.bool,
    )
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 0.1
    for i, row in enumerate(mask):
        idx = row.nonzero().flatten()
        if len(idx):
            rewards[i, idx[-1]] += torch.randn((), generator=g, dtype=torch.float64)
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    return rewards, values, mask


@pytest.mark.parametrize(
    ("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5), (0.5, 0.8)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_python_loop(gamma: float, lam: float, seed: int) -> None:
    rewards, values, mask = _episode_batch(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_loop(rewards.tolist(), values.tolist(), mask.int().tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(adv_ref, dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor(ret_ref, dtype=torch.float64))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(ret[mask], (adv + values)[mask])


def test_gae_hole_is_bridged_not_a_time_step() -> None:
    """Two action tokens separated by environment tokens behave exactly like two adjacent action tokens."""
    gamma, lam = 0.9, 0.8
    holed_mask = torch.tensor([[1, 0, 0, 0, 1]])
    holed = gae(
        torch.tensor([[0.0, 0, 0, 0, 1]]), torch.tensor([[0.5, 9, 9, 9, 0.2]]), holed_mask, gamma, lam
    )
    dense = gae(torch.tensor([[0.0, 1]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), gamma, lam)
    torch.testing.assert_close(holed[0][:, [0, 4]], dense[0])
    torch.testing.assert_close(holed[1][:, [0, 4]], dense[1])
    # by hand: delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72 * 0.8
    torch.testing.assert_close(dense[0], torch.tensor([[-0.32 + 0.72 * 0.8, 0.8]]))


def test_gae_sparse_terminal_reward_with_gamma_lam_one_is_reward_to_go() -> None:
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.3, -0.1, 0.7, 5.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 2.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.7, 2.1, 1.3, 0.0]]))


def test_gae_ignores_garbage_values_on_masked_positions_and_detaches() -> None:
    rewards, values, mask = _episode_batch(3)
    dirty = values.clone()
    dirty[~mask] = float("nan")
    dirty.requires_grad_(True)
    adv, ret = gae(rewards, dirty, mask, 0.99, 0.95)
    clean_adv, clean_ret = gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, clean_adv)
    torch.testing.assert_close(ret, clean_ret)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_refuses_reward_on_masked_position_and_bad_arguments() -> None:
    mask = torch.tensor([[1, 0, 1]])
    with pytest.raises(AssertionError, match="masked"):
        gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.zeros(1, 3), mask, 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 3), torch.zeros(1, 3), mask, 1.5, 0.95)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gae(torch.zeros(1, 3), torch.zeros(1, 4), mask, 1.0, 0.95)


def test_gae_float_mask_and_float32() -> None:
    rewards, values, mask = _episode_batch(4)
    adv64, _ = gae(rewards, values, mask, 0.99, 0.9)
    adv32, ret32 = gae(rewards.float(), values.float(), mask.float(), 0.99, 0.9)
    assert adv32.dtype == torch.float32 and ret32.dtype == torch.float32
    torch.testing.assert_close(adv32, adv64.float())


def group_loop(scores: list[float], g: int, method: str, scale_std: bool, eps: float) -> list[float]:
    out = []
    for start in range(0, len(scores), g):
        group = scores[start : start + g]
        mean = sum(group) / g
        std = (sum((s - mean) ** 2 for s in group) / (g - 1)) ** 0.5
        for s in group:
            if method == "rloo":
                out.append(s - (sum(group) - s) / (g - 1))
            elif scale_std:
                out.append((s - mean) / (std + eps))
            else:
                out.append(s - mean)
    return out


@pytest.mark.parametrize("method", ["grpo", "rloo"])
@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("group_size", [2, 4])
def test_group_advantages_match_loops(method: str, scale_std: bool, group_size: int) -> None:
    scores = torch.randn(
        3 * group_size, generator=torch.Generator().manual_seed(group_size), dtype=torch.float64
    )
    out = group_advantages(scores, group_size, method, scale_std=scale_std)
    expected = group_loop(scores.tolist(), group_size, method, scale_std, 1e-4)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # each group's advantages sum to zero: the baseline removes the prompt's difficulty
    torch.testing.assert_close(out.view(-1, group_size).sum(1), torch.zeros(3, dtype=torch.float64))


def test_group_advantages_are_per_group_not_global() -> None:
    scores = torch.tensor([0.0, 1.0, 10.0, 11.0])  # two prompts, one easy, one hard
    torch.testing.assert_close(group_advantages(scores, 2, "rloo"), torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    torch.testing.assert_close(
        group_advantages(scores, 2, "grpo", scale_std=False), torch.tensor([-0.5, 0.5, -0.5, 0.5])
    )


def test_group_advantages_equal_scores_give_zero_not_nan() -> None:
    out = group_advantages(torch.ones(6), 3, "grpo")
    assert torch.equal(out, torch.zeros(6))
    assert torch.equal(group_advantages(torch.ones(6, dtype=torch.long), 3, "rloo"), torch.zeros(6))


def test_group_advantages_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 2, "grpo")
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="one of"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2, "grpo")


def group_token_loop(
    scores: list[float], token_rewards: list[list[float]], mask: list[list[int]], g: int, method: str
) -> list[list[float]]:
    """Reference: the episode's group advantage on each of its action tokens, plus that token's own reward."""
    per_episode = group_loop(scores, g, method, scale_std=True, eps=1e-4)
    return [
        [a + r if m else 0.0 for r, m in zip(r_row, m_row)]
        for a, r_row, m_row in zip(per_episode, token_rewards, mask)
    ]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_token_advantages_match_loop(method: str) -> None:
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(8, 6, generator=g) > 0.3  # holes and padding anywhere
    scores = torch.randn(8, generator=g, dtype=torch.float64)
    kl = torch.where(mask, torch.randn(8, 6, generator=g, dtype=torch.float64), 0.0)
    token_rewards = -0.1 * kl
    out = group_token_advantages(scores, mask, 4, method, token_rewards=token_rewards)
    expected = group_token_loop(scores.tolist(), token_rewards.tolist(), mask.int().tolist(), 4, method)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert (out[~mask] == 0).all()
    # without token rewards: the group advantage alone, broadcast over the action tokens
    plain = group_token_advantages(scores, mask.float(), 4, method)
    torch.testing.assert_close(plain, torch.where(mask, group_advantages(scores, 4, method)[:, None], 0.0))


def test_group_token_advantages_keep_the_kl_penalty_unscaled_by_the_group_std() -> None:
    """Nearly equal scores (std 1e-3): the score part is normalised to O(1), the KL penalty keeps its own size."""
    scores = torch.tensor([1.0, 1.001, 1.002, 1.003], dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    token_rewards = torch.full((4, 3), -0.05, dtype=torch.float64)
    out = group_token_advantages(scores, mask, 4, "grpo", token_rewards=token_rewards)
    torch.testing.assert_close(out - group_advantages(scores, 4, "grpo")[:, None], token_rewards)


def test_group_token_advantages_refuse_bad_shapes() -> None:
    with pytest.raises(ValueError, match="mask"):
        group_token_advantages(torch.zeros(4), torch.ones(3, 2), 2, "grpo")
    with pytest.raises(ValueError, match="token_rewards"):
        group_token_advantages(torch.zeros(4), torch.ones(4, 2), 2, "grpo", token_rewards=torch.zeros(4, 3))


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_advantages_favour_the_best_sample_of_each_group(method: str) -> None:
    scores = torch.randn(5 * 4, generator=torch.Generator().manual_seed(3))
    adv = group_advantages(scores, 4, method).view(5, 4)
    grouped = scores.view(5, 4)
    best, worst = grouped.argmax(1), grouped.argmin(1)
    assert (adv[torch.arange(5), best] > 0).all() and (adv[torch.arange(5), worst] < 0).all()
    # the ordering within a group is the ordering of the scores
    assert torch.equal(adv.argsort(1), grouped.argsort(1))
