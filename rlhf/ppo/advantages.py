"""Advantage estimators: GAE over action tokens (with a critic) and group baselines (GRPO, RLOO; no critic).

Pure tensor functions; mask convention as in ``rlhf.ppo.ops`` (bool or 0/1, nonzero = selected).
"""

from __future__ import annotations

import torch

from rlhf.ppo.ops import masked_whiten

GROUP_METHODS = ("grpo", "rloo")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the action tokens of each sequence.

    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T).

    ``mask`` is 1 on the policy's action (response) tokens and 0 on padding and, in multi-turn episodes, on the
    environment-message tokens between the policy's turns. Time steps are the action tokens only: the recursion
    bridges over masked positions, so for an action token t the next value is the value at the next action
    token of the same row (gamma and lam apply once per action token, however many environment tokens lie in
    between), and 0 after the row's last action token (the episode ends there: no bootstrap).

        delta_t = r_t + gamma * V(next(t)) - V(t)
        A_t     = delta_t + gamma * lam * A(next(t))

    Rewards must be 0 on masked positions (put an environment reward on the last action token of the turn
    that earned it; a sparse sequence score on the last action token; per-token KL penalties on every action
    token). ``values`` on masked positions are ignored (may be anything, even NaN).
    Returns: advantages, and returns = advantages + values, both on action tokens and exactly 0 elsewhere;
    detached (they are targets; no gradient flows into the critic or the policy through them).
    Not whitened: whiten the advantages afterwards with ``masked_whiten`` if wanted.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must all be (B, T)"
        )
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask if mask.dtype == torch.bool else mask != 0  # (B, T)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    r = rewards.detach().to(dtype)  # (B, T)
    assert not torch.any(r[~m] != 0), "gae: nonzero reward on a masked (non-action) position"
    zero = torch.zeros((), dtype=dtype, device=r.device)
    v = torch.where(m, values.detach().to(dtype), zero)  # (B, T); garbage on masked positions dropped

    B, T = r.shape
    advantages = torch.zeros_like(r)  # (B, T)
    next_value = torch.zeros(B, dtype=dtype, device=r.device)  # (B,) value at the next action token
    next_adv = torch.zeros(B, dtype=dtype, device=r.device)  # (B,) advantage at the next action token
    for t in reversed(range(T)):
        m_t = m[:, t]  # (B,)
        delta = r[:, t] + gamma * next_value - v[:, t]  # (B,)
        adv_t = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = torch.where(m_t, adv_t, zero)
        # masked positions are not time steps: carry the next action token's value and advantage over them
        next_value = torch.where(m_t, v[:, t], next_value)
        next_adv = torch.where(m_t, adv_t, next_adv)
    returns = torch.where(m, advantages + v, zero)  # (B, T)
    return advantages, returns


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    method: str = "grpo",
    scale_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Critic-free advantages from a group of samples per prompt: one scalar per sequence.

    scores: (N,) with N = num_prompts * group_size, each prompt's samples adjacent
    (``[p0 s0, p0 s1, ..., p0 s{G-1}, p1 s0, ...]``, i.e. ``repeat_interleave`` order) -> (N,), detached.

    - ``"grpo"`` (Shao et al. 2024): score - group mean, divided by (group std + eps) when ``scale_std``
      (unbiased std, as TRL's GRPOTrainer; a group of equal scores gives 0, not NaN).
    - ``"rloo"`` (Ahmadian et al. 2024): score - mean of the *other* G - 1 scores of its group
      (= G / (G - 1) * (score - group mean)). ``scale_std`` does not apply to RLOO and is ignored.

    The trainer broadcasts the result over the sequence's action tokens (as in TRL's GRPO).
    Raises ValueError unless scores is 1-D, group_size >= 2 (one sample has no baseline) and N is a
    multiple of group_size.
    """
    if method not in GROUP_METHODS:
        raise ValueError(f"group advantage method must be one of {GROUP_METHODS}, got {method!r}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (N,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(
            f"{method} needs group_size (ppo.num_generations) >= 2 samples per prompt, got {group_size}"
        )
    n = scores.shape[0]
    if n % group_size != 0:
        raise ValueError(
            f"number of scores {n} is not a multiple of group_size {group_size}: "
            "the batch must hold whole groups (num_prompts * group_size samples)"
        )
    s = scores.detach()
    if not s.is_floating_point():
        s = s.float()
    grouped = s.view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (P, 1)
    if method == "grpo":
        adv = grouped - mean  # (P, G)
        if scale_std:
            adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    else:
        others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (P, G)
        adv = grouped - others_mean
    return adv.reshape(n)


def group_token_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    method: str = "grpo",
    token_rewards: torch.Tensor | None = None,
    scale_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-token advantages of a critic-free group baseline: the score's group advantage plus per-token rewards.

    scores: (B,) episode scores, groups adjacent as in ``group_advantages``; mask: (B, T) action tokens;
    token_rewards: (B, T) or None, rewards that are not part of the score (e.g. the KL penalty -kl_coef * kl_t)
    -> (B, T), detached, exactly 0 off the action tokens.

        A_t = group_advantages(scores)[b] + token_rewards[b, t]     on action tokens t of episode b

    Only the scores are normalised by the group (GRPO's std): a per-token penalty keeps its own scale, so the
    KL's weight does not depend on how spread out a group's scores happen to be.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    if m.dim() != 2 or m.shape[0] != scores.shape[0]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must be (B, T) with B = number of scores {tuple(scores.shape)}"
        )
    adv = group_advantages(scores, group_size, method, scale_std=scale_std, eps=eps)  # (B,)
    per_token = adv[:, None].expand(m.shape)  # (B, T)
    if token_rewards is not None:
        if token_rewards.shape != m.shape:
            raise ValueError(
                f"token_rewards {tuple(token_rewards.shape)} must have the mask's shape {tuple(m.shape)}"
            )
        per_token = per_token + token_rewards.detach().to(adv.dtype)
    return torch.where(m, per_token, torch.zeros((), dtype=adv.dtype, device=adv.device))


def advantages_and_returns(
    token_scores: torch.Tensor,
    kl_reward: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    estimator: str,
    group_size: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_rewards: bool = False,
    whiten_advantages: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5 of a PPO update: token_scores, kl_reward (-kl_coef * kl, or 0 with the KL in the loss), values, mask
    (B, R) -> advantages, returns (B, R).

    estimator gae: GAE over score + KL rewards (optionally whitened before, the advantages whitened after);
    grpo | rloo: the group advantage of each episode's score on its action tokens (groups of `group_size`
    consecutive episodes) plus the token's KL penalty, not divided by the group's std; returns are 0 (no critic).
    """
    if estimator == "gae":
        rewards = token_scores + kl_reward  # (B, R), zero off the action tokens
        if whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        if whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return advantages, returns
    advantages = group_token_advantages(
        token_scores.sum(1), mask, group_size, estimator, token_rewards=kl_reward
    )  # (B, R)
    return advantages, torch.zeros_like(advantages)
