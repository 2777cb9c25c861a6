"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

These dataclasses are the only schema: YAML files under `conf/` select groups and set values.
Each field is documented once, in the docstring line under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from rlhf.common.fields import one_of
from rlhf.common.stage_names import STAGES
from rlhf.models.config import DEVICES, ModelConfig
from rlhf.ppo.config import PPOConfig


@dataclass
class RubricComponentConfig:
    kind: str = MISSING
    """env (the environment's reward) | model (the reward model's score) | function (a user's `function`) | length
    (minus the policy's tokens beyond `target_length`) | format (1 when `pattern` matches the reply, else 0)."""
    weight: float = 1.0
    """Weight in the trained score; 0 computes and logs the component without training on it."""
    function: str | None = None
    """kind=function: `pkg.module:function`, called as function(prompt, completion, info) -> float per episode."""
    pattern: str | None = None
    """kind=format: a regular expression searched in the reply (re.search; anchor it with ^ and $)."""
    target_length: int = 0
    """kind=length: policy tokens per episode before the penalty (1 per token) starts."""


@dataclass
class TaskConfig:
    env_id: str = MISSING
    """Gymnasium id of the environment: `rlhf/Review-v1`, or a user's `my_pkg.module:MyEnv-v0`."""
    num_demonstrations: int = 2000
    """SFT demonstrations drawn from the environment's offline data (when `sft.dataset` is unset)."""
    num_preferences: int = 2000
    """Preference pairs drawn from the environment's offline data (when `reward.dataset` is unset)."""
    eval_fraction: float = 0.1
    """Fraction of the SFT and preference data held out for evaluation."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of `gymnasium.make(env_id, ...)`, e.g. `+task.env_kwargs.max_turns=4` (a key a task preset
    sets: `task.env_kwargs.dataset=basic_arithmetic`)."""
    rubric: dict[str, RubricComponentConfig] = field(default_factory=dict)
    """Named reward components (`rlhf.rewards`) added to those of `ppo.reward_source` (`env` and/or `model`; one of
    the same name replaces it): PPO trains on their weighted sum; each is logged as `reward/<name>`. Add components
    in a task preset (YAML); `task.rubric.<name>.weight=...` changes one from the command line."""


@dataclass
class SFTConfig:
    dataset: str | None = None
    """Local jsonl/parquet/csv file or hub dataset name in TRL's formats; unset uses the task's demonstrations."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW, linear decay)."""
    num_train_epochs: float = 3.0
    """Passes over the training data."""
    per_device_train_batch_size: int = 32
    """Sequences per device per optimizer step."""
    max_length: int = 128
    """Longest training sequence in tokens."""
    logging_steps: int = 10
    """Optimizer steps between logged lines."""


@dataclass
class RewardConfig:
    dataset: str | None = None
    """Preference dataset (prompt/chosen/rejected) path or hub name; unset uses the task's pairs."""
    init_from: str | None = None
    """Backbone to start from: a model directory; unset uses the SFT stage's output."""
    learning_rate: float = 5e-4
    """Peak learning rate (AdamW, linear decay)."""
    num_train_epochs: float = 3.0
    """Passes over the training pairs."""
    per_device_train_batch_size: int = 32
    """Pairs per device per optimizer step."""
    max_length: int = 128
    """Longest sequence (prompt + response) in tokens."""
    logging_steps: int = 10
    """Optimizer steps between logged lines."""


@dataclass
class EvaluateConfig:
    num_prompts: int = 256
    """Held-out prompts (environment episodes) per policy."""
    batch_size: int = 64
    """Episodes generated at once."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy."""
    num_samples: int = 16
    """Rows in the samples table."""


@dataclass
class LoggerConfig:
    backend: str = one_of("wandb", "wandb", "none")
    """wandb | none."""
    mode: str = one_of("offline", "offline", "online", "disabled")
    """W&B mode: offline (no network, no account) | online | disabled."""
    project: str = "rlhf"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); unset uses the account's default."""
    group: str | None = None
    """W&B group; unset uses the pipeline run (or the sweep) name."""
    tags: list[str] = field(default_factory=list)
    """W&B tags on every stage's run."""
    log_artifacts: bool = True
    """Log each stage's output directory as a W&B artifact."""


@dataclass
class RLHFConfig:
    task: TaskConfig = MISSING
    """The environment and its offline data."""
    model: ModelConfig = MISSING
    """The base model every stage starts from."""
    sft: SFTConfig = MISSING
    """Supervised warm start."""
    reward: RewardConfig = MISSING
    """Reward model on preference pairs."""
    ppo: PPOConfig = MISSING
    """PPO against the environment."""
    evaluate: EvaluateConfig = MISSING
    """Gold and proxy reward, KL and samples of the SFT and PPO policies."""
    logger: LoggerConfig = MISSING
    """Experiment tracking."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, in pipeline order: any of sft, reward, ppo, evaluate."""
    seed: int = 0
    """Root seed; every stage derives its own from it."""
    device: str = one_of("auto", *DEVICES)
    """auto (cuda when available, else cpu) | cpu | cuda."""
    num_threads: int = 0
    """CPU threads for torch; 0 picks 1 for a tiny model (its ops are too small to split) and torch's default
    otherwise. More threads than free cores slows training down many times over."""
    cache: bool = True
    """Reuse a stage's output from the stage cache when its key (config, upstream keys, package version and
    source) matches, and publish each finished stage there (`rlhf.run.stage_cache`); false: train every stage."""
    cache_dir: str | None = None
    """The stage cache's directory. Unset: `<sweep dir>/.stage_cache` in a multirun (shared by the sweep's jobs)
    and none for a single run; set it (e.g. ~/.cache/rlhf) to share stages across runs and sweeps."""
    objective: str = "stages.evaluate.metrics.ppo/gold_reward"
    """The summary.json value a run returns to Hydra: what the Optuna sweeper optimises (dotted path into
    summary.json; a metric's own name may contain '/')."""


def register_configs() -> None:
    """Register the schemas so YAML files validate against them (unknown keys and wrong types fail)."""
    cs = ConfigStore.instance()
    cs.store(name="rlhf_schema", node=RLHFConfig)
    for group, node in [
        ("task", TaskConfig),
        ("model", ModelConfig),
        ("sft", SFTConfig),
        ("reward", RewardConfig),
        ("ppo", PPOConfig),
        ("evaluate", EvaluateConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
