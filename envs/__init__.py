"""Gymnasium text environments: the built-in tasks and the `TextEnv` contract for your own.

Importing this package registers the built-in ids (string entry points, so importing is cheap).
A user's environment lives in their own package, registers its id when imported, and is selected
as "their_pkg.module:MyEnv-v0": Gymnasium imports the module, then finds the id.
"""

from __future__ import annotations

import importlib

import gymnasium
from gymnasium.envs.registration import load_env_creator

from envs.base import TextEnv

__all__ = ["BUILTIN_IDS", "TextEnv", "env_class", "make"]

BUILTIN_IDS: tuple[str, ...] = (
    "rlhf/Review-v0",
    "rlhf/Review-v1",
    "rlhf/Arithmetic-v0",
    "rlhf/GuessNumber-v0",
)
_ENTRY_POINTS = {
    "rlhf/Review-v0": "envs.review:ReviewEnv",
    "rlhf/Review-v1": "envs.review:ReviewEnvV1",
    "rlhf/Arithmetic-v0": "envs.arithmetic:ArithmeticEnv",
    "rlhf/GuessNumber-v0": "envs.guess:GuessNumberEnv",
}

for _id, _entry_point in _ENTRY_POINTS.items():
    if _id not in gymnasium.registry:
        # order_enforce=False: TextEnv's own "step before reset" error names the env id.
        gymnasium.register(id=_id, entry_point=_entry_point, order_enforce=False)


def env_class(env_id: str) -> type[TextEnv]:
    """The TextEnv subclass behind an id ("rlhf/Review-v0" or "my_pkg.module:MyEnv-v0"), not instantiated.

    Gives the classmethods (vocabulary, demonstrations, preferences, gold_reward) without an episode.
    """
    spec = _spec(env_id)
    creator = load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point
    if not (isinstance(creator, type) and issubclass(creator, TextEnv)):
        raise ValueError(
            f"{env_id}: entry point {spec.entry_point!r} is not a TextEnv subclass; register the class itself "
            "(e.g. entry_point='my_pkg.module:MyEnv') and subclass envs.base.TextEnv"
        )
    return creator


def make(env_id: str, **kwargs) -> TextEnv:
    """`gymnasium.make(env_id, **kwargs).unwrapped`, checked to be a TextEnv.

    The unwrapped environment is returned because trainers need its attributes (charset, max_turns,
    vocabulary); TextEnv does its own input checks and truncation, so no wrapper is lost that matters.
    """
    _spec(env_id)
    env = gymnasium.make(env_id, **kwargs).unwrapped
    if not isinstance(env, TextEnv):
        raise ValueError(f"{env_id}: made a {type(env).__name__}, not a TextEnv; subclass envs.base.TextEnv")
    return env


def _spec(env_id: str) -> gymnasium.envs.registration.EnvSpec:
    """gymnasium.spec, also for "module:Name-v0" ids (imports the module, which registers the id)."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env id must be a non-empty str like 'rlhf/Review-v0', got {env_id!r}")
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ValueError(
                f"{env_id}: cannot import module {module!r} ({e}); install your package or add it to PYTHONPATH"
            ) from e
    try:
        return gymnasium.spec(name)
    except gymnasium.error.Error as e:
        raise ValueError(
            f"{env_id}: no environment registered as {name!r}; known: {sorted(_text_ids())}"
        ) from e


def _text_ids() -> list[str]:
    return [i for i in gymnasium.registry if i.startswith("rlhf/")]
