"""An update's per-episode metrics as local (sum, count) pairs, TRL's names where TRL has one; `distributed.gather_mean`
turns them into means over every process's episodes."""

from __future__ import annotations

import torch

from rlhf.ppo.rollout import Rollout
from rlhf.ppo.scoring import Scores


def episode_sums(
    ro: Rollout,
    scores: Scores,
    k1: torch.Tensor,
    non_score_reward: torch.Tensor,
    stats: dict[str, list[torch.Tensor]],
) -> dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]:
    """name -> (sum, count) of this process's B episodes: the objective (k1: (B,) sequence KL; non_score_reward:
    (B, R) -kl_coef * KL), the environment's reward, every rubric component (weight 0 included), the rollout's
    shape, the success rate over the episodes that report one, and the optimisation's `stats` (one value per step)."""
    n = len(ro)
    sums: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]] = {
        "objective/kl": (k1.sum(), n),
        "objective/entropy": ((-ro.logprobs).sum(), n),
        "objective/non_score_reward": (non_score_reward.sum(), n),  # -kl_coef * KL (reward or loss)
        "objective/rlhf_reward": (scores.scores.sum() + non_score_reward.sum(), n),
        "objective/scores": (scores.scores.sum(), n),
        "env/gold": (ro.env_rewards.sum(), n),
        "val/num_eos_tokens": (ro.ended_with_eos.sum(), n),
        "rollout/response_length": (ro.response_lengths.sum(), n),
        "rollout/turns": (ro.num_turns.sum(), n),
    }
    if scores.model_scores is not None:
        sums["reward/model_score"] = (scores.model_scores.sum(), n)
    for name, values in scores.components.items():
        sums[f"reward/{name}"] = (values.sum(), n)
    # over the episodes that report it, on any process (absent only when none anywhere does)
    success = [float(info["success"]) for info in ro.infos if "success" in info]
    sums["env/success_rate"] = (torch.tensor(sum(success)), len(success))
    for name, values in stats.items():
        sums[name] = (torch.stack([v.to(ro.action_mask.device) for v in values]).sum(), len(values))
    return sums
