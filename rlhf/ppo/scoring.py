"""Step 2 of an update: each episode's score from the rubric (`rlhf.rewards`), placed on its tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.ppo.ops import last_true_index
from rlhf.ppo.rollout import Rollout
from rlhf.rewards import Component, Episodes, component_values
from rlhf.rewards import token_scores as rubric_token_scores
from rlhf.rewards.reward_model import RewardScorer


@dataclass
class Scores:
    """What the rubric made of a batch of episodes."""

    token_scores: torch.Tensor
    """(B, R) float32: the trained score on the action tokens (environment rewards at turn ends, the other
    components at the episode's last policy token), missing-EOS penalties and normalisation included."""
    model_scores: torch.Tensor | None
    """(B,) the reward model's raw scores; None without a reward model."""
    components: dict[str, torch.Tensor]
    """Every rubric component's unweighted values {name: (B,)}, weight 0 included (for the metrics)."""

    @property
    def scores(self) -> torch.Tensor:
        """(B,) each episode's score: its token scores summed."""
        return self.token_scores.sum(1)


class RunningMoments:
    """Running mean and std of episode scores (for `normalize_scores`); checkpointed with the trainer."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        mean, var = x.double().mean().item(), x.double().var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


@torch.no_grad()
def score(
    ro: Rollout,
    rubric: list[Component],
    reward_scorer: RewardScorer | None = None,
    *,
    missing_eos_penalty: float | None = None,
    moments: RunningMoments | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> Scores:
    """The rubric's weighted components per token, minus `missing_eos_penalty` at every turn that ended on no stop
    id; with `moments` (normalize_scores) standardised by the running mean and std of the episode scores of every
    process (`gather`: this process's (B,) -> all processes')."""
    mask = ro.action_mask
    model_scores = None
    if reward_scorer is not None:
        model_scores = reward_scorer.score(ro)  # (B,) as the reward stage scored its pairs
        if not torch.isfinite(model_scores).all():
            raise ValueError(
                "the reward model returned NaN/inf scores; check the reward model (training stopped)"
            )
    episodes = Episodes(
        prompts=ro.queries,
        completions=["\n".join(replies) for replies in ro.replies],
        infos=ro.infos,
        env_rewards=ro.env_rewards,
        lengths=ro.response_lengths,
        model_scores=model_scores,
    )
    components = component_values(rubric, episodes)  # {name: (B,)}
    last = last_true_index(mask)  # (B,) the episode's last policy token
    token_scores = rubric_token_scores(rubric, components, ro.turn_rewards, last)  # (B, R)
    if missing_eos_penalty is not None:
        token_scores -= missing_eos_penalty * (ro.turn_ends & ~ro.turn_eos).float()
    if moments is not None:
        moments.update(gather(token_scores.sum(1)))
        token_scores = token_scores / moments.std
        token_scores[torch.arange(len(ro)), last] -= moments.mean / moments.std
    return Scores(token_scores, model_scores, components)
