"""Gymnasium text environments: the built-in tasks, adapters to other libraries, and the `TextEnv` contract.

Importing this package registers the built-in ids and the adapters' ids (string entry points, so importing is
cheap; an adapter's library is imported only when its environment is made). A user's environment lives in their
own package, registers its id when imported, and is selected as "their_pkg.module:MyEnv-v0": Gymnasium imports
the module, then finds the id. PPO and evaluation take any `gymnasium.Env[str, str]` with `spaces.Text`
observation and action spaces; only the tiny tokenizer and the SFT / reward stages' own data need a `TextEnv`
(its `vocabulary`, `demonstrations` and `preferences`).
"""

from __future__ import annotations

import importlib

import gymnasium
from gymnasium.envs.registration import load_env_creator

from envs.base import TextEnv

__all__ = ["ADAPTER_IDS", "BUILTIN_IDS", "TextEnv", "env_class", "make"]

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
ADAPTER_IDS: dict[str, str] = {
    "rlhf/ReasoningGym-v0": "reasoning-gym",
    "rlhf/TextArena-v0": "textarena",
    "rlhf/SkyRL-v0": "skyrl-gym",
}
"""Environments of other libraries, each behind an optional extra: id -> extra (`pip install -e ".[<extra>]"`; the
extra's name is its package's, so its module is the name with "_" for "-")."""
_ENTRY_POINTS |= {
    "rlhf/ReasoningGym-v0": "envs.reasoning_gym:ReasoningGymEnv",
    "rlhf/TextArena-v0": "envs.textarena:TextArenaEnv",
    "rlhf/SkyRL-v0": "envs.skyrl:SkyRLEnv",
}

for _id, _entry_point in _ENTRY_POINTS.items():
    if _id not in gymnasium.registry:
        # order_enforce=False: TextEnv's own "step before reset" error names the env id.
        gymnasium.register(id=_id, entry_point=_entry_point, order_enforce=False)


def env_class(env_id: str) -> type:
    """The class (or creator function) behind an id ("rlhf/Review-v0" or "my_pkg.module:MyEnv-v0"), not made.

    For a TextEnv it gives the classmethods (vocabulary, demonstrations, preferences, gold_reward) without an
    episode; `offline_data(env_id, ...)` says which of them exist.
    """
    spec = _spec(env_id)
    return load_env_creator(spec.entry_point) if isinstance(spec.entry_point, str) else spec.entry_point


def offline_data(env_id: str) -> set[str]:
    """Which of `vocabulary`, `demonstrations`, `preferences` the environment behind `env_id` provides.

    Only TextEnv subclasses that override them do; any other `gymnasium.Env` needs a pretrained model
    (`model.name_or_path`) and, for the SFT and reward stages, the user's datasets.
    """
    cls = env_class(env_id)
    if not (isinstance(cls, type) and issubclass(cls, TextEnv)):
        return set()
    names = ("vocabulary", "demonstrations", "preferences")
    return {n for n in names if getattr(cls, n).__func__ is not getattr(TextEnv, n).__func__}


def make(env_id: str, **kwargs) -> gymnasium.Env:
    """`gymnasium.make(env_id, **kwargs).unwrapped`, checked to have `spaces.Text` observation and action spaces.

    Any `gymnasium.Env[str, str]` is accepted; `kwargs` (`task.env_kwargs`) go to its constructor. The unwrapped
    environment is returned because trainers need its attributes (max_turns, the action space the trainer fits
    replies into); a TextEnv does its own input checks and truncation, so no wrapper is lost that matters.
    """
    _spec(env_id)
    try:
        env = gymnasium.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    except TypeError as e:  # an unknown or missing keyword argument of the environment's constructor
        raise ValueError(f"{env_id}: cannot make it with task.env_kwargs={kwargs}: {e}") from e
    for name in ("observation_space", "action_space"):
        space = getattr(env, name, None)
        if not isinstance(space, gymnasium.spaces.Text):
            raise ValueError(
                f"{env_id}: its {name} is {space!r}; text environments need gymnasium.spaces.Text observation and "
                "action spaces (observation = text the policy reads, action = its reply)"
            )
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
    """Registered ids under rlhf/ (built-ins and adapters)."""
    return [i for i in gymnasium.registry if i.startswith("rlhf/")]
