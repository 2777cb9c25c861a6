"""The task as the stages see it: its environment (`task.env_id` made with `task.env_kwargs`) and its reward rubric
(`ppo.reward_source` plus `task.rubric`), and the checks of both that run before any training.

Any `gymnasium.Env[str, str]` with `spaces.Text` observation and action spaces is a task for PPO and evaluation.
The tiny tokenizer and the SFT / reward stages' own data need a `TextEnv` that provides them; with another
environment, use a pretrained model and your datasets, or skip those stages:
`rlhf stages=[ppo,evaluate] model=hf model.name_or_path=DIR ppo.policy_path=DIR ppo.reward_source=env ...`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from rlhf.config import RLHFConfig
from rlhf.rewards import Component, build_rubric

if TYPE_CHECKING:
    import gymnasium


def env_kwargs(cfg: RLHFConfig) -> dict[str, Any]:
    """`task.env_kwargs` as plain Python values (no OmegaConf containers reach the environment)."""
    kwargs = cfg.task.env_kwargs
    return dict(OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else kwargs or {})


def make_env(cfg: RLHFConfig) -> gymnasium.Env:
    """One environment of the task: `envs.make(task.env_id, **task.env_kwargs)`."""
    from envs import make

    return make(cfg.task.env_id, **env_kwargs(cfg))


def rubric(cfg: RLHFConfig) -> list[Component]:
    """The task's reward components: `ppo.reward_source` (and its weights) plus `task.rubric`."""
    components = cfg.task.rubric
    if OmegaConf.is_config(components):
        components = OmegaConf.to_container(components, resolve=True)
    return build_rubric(
        components or {}, cfg.ppo.reward_source, cfg.ppo.env_reward_weight, cfg.ppo.model_reward_weight
    )


def check(cfg: RLHFConfig, stages: list[str]) -> None:
    """Before any training: the rubric builds, the environment makes with its kwargs, and whatever the selected
    stages need from a non-TextEnv environment (a tokenizer, datasets) is given. ValueError says what to set."""
    from envs import offline_data

    if {"ppo", "evaluate"} & set(stages):
        rubric(cfg)
    env_id = cfg.task.env_id
    wanted = {
        "vocabulary": not cfg.model.name_or_path,
        "demonstrations": "sft" in stages and not cfg.sft.dataset,
        "preferences": "reward" in stages and not cfg.reward.dataset,
    }
    missing = {name for name, needed in wanted.items() if needed} - (
        offline_data(env_id) if any(wanted.values()) else set()
    )
    if missing:
        advice = {
            "vocabulary": "a tokenizer: model=hf model.name_or_path=<model dir or hub id> (or model=smollm2)",
            "demonstrations": "SFT data: sft.dataset=<file>, or stages=[ppo,evaluate] ppo.policy_path=<model dir>",
            "preferences": "preference pairs: reward.dataset=<file>, or leave the reward stage out "
            "(ppo.reward_source=env with ppo.critic_init=sft or ppo.advantage=grpo)",
        }
        raise ValueError(
            f"task.env_id={env_id} provides no {', '.join(sorted(missing))} (TextEnv classmethods); set "
            + "; ".join(advice[name] for name in sorted(missing))
        )
    if {"ppo", "evaluate"} & set(stages):
        make_env(cfg).close()  # its constructor with task.env_kwargs: a typo fails here, not after SFT
