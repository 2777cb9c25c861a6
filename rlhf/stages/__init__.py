"""The stage registry: each stage's run function, artifact type, the config its output depends on, the upstream
stages it reads and how it resumes. The pipeline knows stages only through `REGISTRY`; stage modules never import
each other (what two share lives in `base.py`, `trl_common.py` or a module outside `stages/`).

A stage module `rlhf/stages/<name>.py` has `run(cfg, ctx: StageContext) -> StageResult`; it is imported only when
the stage runs, so reading this table stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.common.stage_names import STAGES

if TYPE_CHECKING:
    from rlhf.stages.base import StageContext, StageResult

BASE = "base"
"""The base model every stage starts from (the tiny model built from config, or `model.name_or_path`): the
pipeline's step before the stages, with a key of its own and the key `StageContext.upstream` holds it under."""
BASE_CONFIG = ("task", "model", "seed")
BASE_IGNORED = (
    "task.num_demonstrations",
    "task.num_preferences",
    "task.eval_fraction",
    "task.rubric",
    "model.dtype",
    "model.lora",
)
"""What the base model is built from: the task's vocabulary (and text, for BPE), the model's sizes, the seed."""


@dataclass(frozen=True)
class Stage:
    name: str
    artifact_type: str
    """W&B artifact type of the stage's output."""
    config: tuple[str, ...]
    """Config sections or dotted fields the stage's output depends on: its stage key hashes them."""
    ignored: tuple[str, ...]
    """Fields under `config` that change only logging or checkpoint cadence, never the output: not in the key."""
    reads: Callable[[Any], dict[str, str | None]]
    """cfg -> the upstream stages whose outputs the stage reads under that config; each maps to what to set
    instead when the stage cannot run without it, or None when it is optional."""
    resume: Callable[[Any, Path, str], str | None] | None = None
    """(cfg, stage dir, stage key) -> the W&B run id to continue when a killed run of the stage will be resumed
    (None: a fresh W&B run). Raises ValueError for a partial output that cannot be trusted."""

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        return importlib.import_module(f"rlhf.stages.{self.name}").run(cfg, ctx)


def _reward_reads(cfg: Any) -> dict[str, str | None]:
    return {} if cfg.reward.init_from else {"sft": None}  # without SFT it starts from the base model


def _ppo_reads(cfg: Any) -> dict[str, str | None]:
    p = cfg.ppo
    reads: dict[str, str | None] = {}
    if not p.policy_path:
        reads["sft"] = "set ppo.policy_path=<model dir>"
    if not p.reward_model_path:
        hint = None
        if p.reward_source in ("model", "both"):
            hint = "set ppo.reward_model_path=<model dir>, or use ppo.reward_source=env"
        elif p.advantage == "gae" and p.critic_init == "reward":
            hint = "set ppo.reward_model_path=<model dir>, or set ppo.critic_init=sft"
        reads["reward"] = hint  # also read when optional: the proxy score and the critic come from it
    return reads


def _evaluate_reads(cfg: Any) -> dict[str, str | None]:
    reads: dict[str, str | None] = {"ppo": None}  # the SFT policy, the PPO one when there is one
    if not cfg.ppo.policy_path:
        reads["sft"] = "set ppo.policy_path=<model dir>"
    if not cfg.ppo.reward_model_path:
        reads["reward"] = None
    return reads


def _ppo_resume(cfg: Any, stage_dir: Path, key: str) -> str | None:
    if not cfg.ppo.resume:
        return None
    from rlhf.ppo.checkpoint import read_meta, resumable_checkpoint

    checkpoint = resumable_checkpoint(stage_dir, key, quiet=True)
    return read_meta(checkpoint).get("wandb_run_id") if checkpoint is not None else None


_RUN_ENVIRONMENT = ("task", "model", "seed", "device")
_OTHER_DATA = {"sft": "task.num_preferences", "reward": "task.num_demonstrations"}
_PPO_ONLY = "task.rubric"
"""The reward rubric shapes PPO's score only: SFT and the reward model do not depend on it."""
_PPO_CADENCE = (
    "ppo.log_every",
    "ppo.console_every",
    "ppo.samples_every",
    "ppo.save_every",
    "ppo.resume",
    "ppo.critic_process",
)
"""PPO settings that change how often it logs or checkpoints, whether it resumes, or where the critic trains (the
same steps: bit for bit at one thread per process, as `num_threads` elsewhere): never its result."""

REGISTRY: dict[str, Stage] = {
    "sft": Stage(
        "sft",
        artifact_type="model",
        config=("sft", *_RUN_ENVIRONMENT),
        ignored=("sft.logging_steps", _OTHER_DATA["sft"], _PPO_ONLY),
        reads=lambda cfg: {},
    ),
    "reward": Stage(
        "reward",
        artifact_type="reward_model",
        config=("reward", *_RUN_ENVIRONMENT),
        ignored=("reward.logging_steps", _OTHER_DATA["reward"], _PPO_ONLY),
        reads=_reward_reads,
    ),
    "ppo": Stage(
        "ppo",
        artifact_type="model",
        config=("ppo", *_RUN_ENVIRONMENT),
        ignored=(*_PPO_CADENCE, *_OTHER_DATA.values()),
        reads=_ppo_reads,
        resume=_ppo_resume,
    ),
    "evaluate": Stage(
        "evaluate",
        artifact_type="evaluation",
        config=("evaluate", "ppo", *_RUN_ENVIRONMENT),  # rollouts use ppo's response length and stop token
        ignored=(*_PPO_CADENCE, *_OTHER_DATA.values()),
        reads=_evaluate_reads,
    ),
}
assert tuple(REGISTRY) == STAGES, (
    "the registry lists every stage of rlhf.common.stage_names.STAGES, in pipeline order"
)
