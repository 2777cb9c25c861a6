"""A rubric: named, weighted reward components; the trained score of an episode is sum(weight * value).

Kinds of component (`task.rubric.<name>.kind`):

    env       the environment's reward (its return; per turn, placed at the end of the turn that earned it)
    model     the learned reward model's score of the whole episode
    function  a user's `pkg.module:function(prompt, completion, info) -> float`
    length    minus the policy's tokens beyond `target_length` (a length penalty)
    format    1 when the regular expression `pattern` is found in the completion, else 0

`ppo.reward_source` is a shortcut for the first two: env -> {env: 1}, model -> {model: 1}, both -> {env:
ppo.env_reward_weight, model: ppo.model_reward_weight}; `task.rubric` adds components, and one named `env` or
`model` replaces the shortcut's. A component of weight 0 is computed and logged, not trained on.

For the text components, the prompt is the episode's first observation, the completion the policy's replies (as
given to the environment) joined by newlines, and info the environment's last info dict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.rewards.components import (
    RewardFunction,
    call_function,
    format_reward,
    length_penalty,
    load_function,
)

if TYPE_CHECKING:
    import torch

KINDS = ("env", "model", "function", "length", "format")
REWARD_SOURCES = ("env", "model", "both")


@dataclass(frozen=True)
class Component:
    """One named term of a rubric, ready to compute (its function imported, its pattern compiled)."""

    name: str
    kind: str
    weight: float = 1.0
    function: RewardFunction | None = None
    pattern: re.Pattern[str] | None = None
    target_length: int = 0


@dataclass
class Episodes:
    """What the components of a batch of B episodes are computed from."""

    prompts: list[str]
    completions: list[str]
    infos: list[dict[str, Any]]
    env_rewards: torch.Tensor
    """(B,) the environment's return of each episode."""
    lengths: torch.Tensor
    """(B,) policy tokens of each episode."""
    model_scores: torch.Tensor | None = None
    """(B,) the reward model's scores, when there is a reward model."""


def build_rubric(
    components: Mapping[str, Mapping[str, Any]],
    reward_source: str,
    env_weight: float = 1.0,
    model_weight: float = 1.0,
) -> list[Component]:
    """The rubric of `ppo.reward_source` (and its weights) plus `task.rubric`'s components, in that order.

    `components`: name -> {kind, weight, function, pattern, target_length} (the config's entries). Raises ValueError
    naming the key to change for an unknown kind, a missing function or pattern, a bad regex or an unimportable
    function.
    """
    shortcut = {
        "env": {"env": {"kind": "env", "weight": 1.0}},
        "model": {"model": {"kind": "model", "weight": 1.0}},
        "both": {
            "env": {"kind": "env", "weight": env_weight},
            "model": {"kind": "model", "weight": model_weight},
        },
    }
    if reward_source not in shortcut:
        raise ValueError(f"ppo.reward_source={reward_source!r} is not one of {', '.join(REWARD_SOURCES)}")
    merged = {**shortcut[reward_source], **components}
    return [_component(name, spec) for name, spec in merged.items()]


def _component(name: str, spec: Mapping[str, Any]) -> Component:
    key = f"task.rubric.{name}"
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{key}.kind={kind!r} is not one of {', '.join(KINDS)}")
    weight = float(spec.get("weight", 1.0))
    if not math.isfinite(weight):
        raise ValueError(f"{key}.weight={weight} must be a finite number")
    function = pattern = None
    if kind == "function":
        if not spec.get("function"):
            raise ValueError(f"{key}: kind=function needs {key}.function=pkg.module:function")
        function = load_function(str(spec["function"]))
    if kind == "format":
        if not spec.get("pattern"):
            raise ValueError(f"{key}: kind=format needs {key}.pattern=<regular expression>")
        try:
            pattern = re.compile(str(spec["pattern"]))
        except re.error as e:
            raise ValueError(f"{key}.pattern={spec['pattern']!r} is not a regular expression: {e}") from e
    target_length = int(spec.get("target_length") or 0)
    if target_length < 0:
        raise ValueError(f"{key}.target_length={target_length} must be >= 0")
    return Component(name, kind, weight, function, pattern, target_length)


def needs_reward_model(rubric: list[Component]) -> bool:
    """Whether a component is the reward model's score."""
    return any(c.kind == "model" for c in rubric)


def describe(rubric: list[Component]) -> str:
    """`1*env + 0.2*fmt (format) + 0*len (length, logged only)`: for the log."""
    parts = []
    for c in rubric:
        kind = "" if c.name == c.kind else f" ({c.kind})"
        parts.append(f"{c.weight:g}*{c.name}{kind}" + (" [logged only]" if c.weight == 0 else ""))
    return " + ".join(parts)


def component_values(rubric: list[Component], episodes: Episodes) -> dict[str, torch.Tensor]:
    """Every component's value per episode: name -> (B,) float32 (weight not applied)."""
    import torch

    device = episodes.env_rewards.device
    values = {}
    for c in rubric:
        if c.kind == "env":
            v = episodes.env_rewards.float()
        elif c.kind == "model":
            if episodes.model_scores is None:
                raise ValueError(f"reward component {c.name!r} (kind=model) needs a reward model")
            v = episodes.model_scores.float()
        elif c.kind == "length":
            v = torch.tensor([length_penalty(int(n), c.target_length) for n in episodes.lengths.tolist()])
        elif c.kind == "format":
            v = torch.tensor([format_reward(c.pattern, text) for text in episodes.completions])
        else:  # function
            v = torch.tensor(
                [
                    call_function(c.function, c.name, p, t, info)
                    for p, t, info in zip(episodes.prompts, episodes.completions, episodes.infos)
                ]
            )
        values[c.name] = v.to(device=device, dtype=torch.float32)
    return values


def token_scores(
    rubric: list[Component],
    values: dict[str, torch.Tensor],
    turn_rewards: torch.Tensor,
    last_index: torch.Tensor,
) -> torch.Tensor:
    """Per-token scores (B, R): sum over components of weight * value, weight-0 components left out.

    turn_rewards: (B, R) the environment's reward of each turn at the turn's last policy token; the `env` component
    is placed there (so each turn's reward stays with its turn). last_index: (B,) the episode's last policy token,
    where every other component's value goes.
    """
    import torch

    scores = torch.zeros_like(turn_rewards, dtype=torch.float32)  # (B, R)
    rows = torch.arange(scores.shape[0], device=scores.device)
    for c in rubric:
        if c.weight == 0:
            continue
        if c.kind == "env":
            scores += c.weight * turn_rewards
        else:
            scores[rows, last_index] += c.weight * values[c.name]
    return scores
