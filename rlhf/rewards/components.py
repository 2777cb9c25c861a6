"""Reward components as pure functions of one episode's text, numbers and info (no config, no tensors).

The environment's reward and the reward model's score are computed elsewhere (the rollout, `RewardScorer`); the
rubric only weights them. A user's function is any `pkg.module:function(prompt, completion, info) -> float`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from typing import Any

RewardFunction = Callable[[str, str, dict[str, Any]], float]


def format_reward(pattern: re.Pattern[str], completion: str) -> float:
    """1.0 when `pattern` is found in the completion (`re.search`), else 0.0."""
    return 1.0 if pattern.search(completion) else 0.0


def length_penalty(num_tokens: int, target_length: int) -> float:
    """Minus the tokens beyond `target_length` (0 up to it): -max(0, num_tokens - target_length)."""
    return -float(max(0, num_tokens - target_length))


def load_function(spec: str) -> RewardFunction:
    """The callable named `pkg.module:function` (the module is imported); ValueError saying what to fix."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r}: write it as pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"reward function {spec!r}: cannot import {module_name!r} ({e}); install your package or add it to "
            "PYTHONPATH"
        ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def call_function(fn: RewardFunction, name: str, prompt: str, completion: str, info: dict[str, Any]) -> float:
    """`fn(prompt, completion, info)` checked to be a finite number (a ValueError names the component)."""
    value = fn(prompt, completion, info)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"reward component {name!r}: the function returned {value!r}; it must return a finite float"
        )
    return float(value)
