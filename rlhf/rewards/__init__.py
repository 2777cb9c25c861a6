"""Reward rubrics: a task's score as a weighted sum of named components, each logged as `reward/<name>`.

components.py   the components as pure functions (format check, length penalty, a user's function)
rubric.py       a rubric from config, every component's per-episode values, their per-token placement
"""

from rlhf.rewards.rubric import (
    KINDS,
    Component,
    Episodes,
    build_rubric,
    component_values,
    describe,
    needs_reward_model,
    token_scores,
)

__all__ = [
    "KINDS",
    "Component",
    "Episodes",
    "build_rubric",
    "component_values",
    "describe",
    "needs_reward_model",
    "token_scores",
]
