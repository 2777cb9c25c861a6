"""One validation of the whole config, run before anything is written: every rule a user's config must follow.

`validate(cfg)` raises ValueError with one line that names the key and says what to change; the CLI prints it as
`rlhf: error: ...`. Enum-like fields declare their allowed values once, next to the field (`rlhf.common.fields.one_of`),
and `check_choices` refuses anything else; every range and cross-field rule lives here, but those of the PPO settings
alone: `check_ppo` lives beside `PPOConfig` in `rlhf.ppo.config` (the trainer calls it too).

Adding a field: an enum-like one needs only `one_of(...)` in `rlhf/config.py`; a field with other rules gets a
`check_*(cfg, stages)` function here, listed in `CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.common.fields import at_least, check_choices, fraction, positive
from rlhf.common.stage_names import STAGES
from rlhf.config import RLHFConfig
from rlhf.ppo.config import check_ppo

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def validate(cfg: RLHFConfig, num_processes: int = 1) -> list[str]:
    """Check everything that needs no training, cheapest first; returns the stages to run, in pipeline order.

    `num_processes`: data-parallel processes of this run (torchrun's WORLD_SIZE), for the PPO batch rules.
    """
    check_missing(cfg)
    check_choices(cfg, RLHFConfig)
    stages = select_stages(cfg)
    check_ppo(cfg.ppo, num_processes if "ppo" in stages else 1)
    for check in CHECKS:
        check(cfg, stages)
    return stages


# ------------------------------------------------------------------------------------------------ generic rules


def check_missing(cfg: Any) -> None:
    """Required values (`MISSING`, `???`) left unset."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ValueError(
                f"missing required value: {', '.join(missing)}; set it on the command line ({missing[0]}=...)"
            )


def select_stages(cfg: RLHFConfig) -> list[str]:
    """`cfg.stages` checked and put in pipeline order."""
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {', '.join(map(str, unknown))}; choose from {', '.join(STAGES)}")
    if not stages:
        raise ValueError(f"stages is empty; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


# ---------------------------------------------------------------------------------------------------- sections


def check_numbers(cfg: RLHFConfig, stages: list[str]) -> None:
    """Ranges of the single-valued settings of every section but ppo (`check_ppo`)."""
    m = cfg.model
    at_least(m, "model", 1, "hidden_size", "num_layers", "num_heads", "intermediate_size")
    at_least(m, "model", 1, "max_position_embeddings")
    if not m.name_or_path and m.hidden_size % m.num_heads:
        raise ValueError(
            f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}"
        )
    if not m.name_or_path and (m.hidden_size // m.num_heads) % 2:
        raise ValueError(
            f"model.hidden_size / model.num_heads = {m.hidden_size // m.num_heads} must be even (rotary position "
            "embeddings rotate pairs of dimensions); change either"
        )
    at_least(m.lora, "model.lora", 0, "r")
    positive(m.lora, "model.lora", "alpha")
    fraction(m.lora, "model.lora", "dropout", closed=False)
    if m.lora.r > 0 and not m.lora.target_modules:
        raise ValueError(
            "model.lora.target_modules is empty; name the modules that get adapters, or set model.lora.r=0"
        )
    fraction(cfg.task, "task", "eval_fraction", closed=False)
    for stage, section, count in (
        ("sft", cfg.sft, "num_demonstrations"),
        ("reward", cfg.reward, "num_preferences"),
    ):
        positive(section, stage, "learning_rate", "num_train_epochs")
        at_least(section, stage, 1, "per_device_train_batch_size", "max_length", "logging_steps")
        n = getattr(cfg.task, count)
        if stage in stages and not section.dataset:
            at_least(cfg.task, "task", 1, count)
            if round(n * cfg.task.eval_fraction) >= n:
                raise ValueError(
                    f"task.eval_fraction={cfg.task.eval_fraction} holds out all {n} of task.{count}; lower it"
                )
    at_least(cfg.evaluate, "evaluate", 1, "num_prompts", "batch_size")
    at_least(cfg.evaluate, "evaluate", 0, "temperature", "num_samples")
    if cfg.num_threads < 0:
        raise ValueError(f"num_threads={cfg.num_threads} must be >= 0 (0 = automatic)")


def check_model_and_device(cfg: RLHFConfig, stages: list[str]) -> None:
    """model=hf needs a location; cuda needs a GPU; float16 needs a GPU (mixed precision with loss scaling);
    ppo.critic_process needs the CPU."""
    if cfg.model.kind == "hf" and not cfg.model.name_or_path:
        raise ValueError("model=hf needs model.name_or_path=<hub id or save_pretrained directory>")
    critic_process = "ppo" in stages and cfg.ppo.critic_process
    if cfg.device == "cuda" or cfg.model.dtype == "float16" or critic_process:  # these need torch to check
        from rlhf.models.loading import resolve_device

        device = resolve_device(cfg.device)
        if cfg.model.dtype == "float16" and device.type == "cpu":
            raise ValueError(
                "model.dtype=float16 needs a GPU (mixed precision with loss scaling); use bfloat16 on CPU"
            )
        if critic_process and device.type != "cpu":
            raise ValueError(
                f"ppo.critic_process overlaps the critic with the policy on CPU cores; on device={device.type} "
                "set ppo.critic_process=false"
            )


def check_logger(cfg: RLHFConfig, stages: list[str]) -> None:
    """Online W&B logging needs an API key: refuse before training rather than fail at the first stage's init."""
    from rlhf.tracking.wandb_run import wandb_api_key_available

    lg = cfg.logger
    if lg.backend == "wandb" and lg.mode == "online" and not wandb_api_key_available():
        raise ValueError(
            "logger.mode=online needs a W&B API key: set WANDB_API_KEY or run `wandb login`, "
            "or use logger.mode=offline (upload later with `wandb sync`)"
        )


def check_environment(cfg: RLHFConfig, stages: list[str]) -> None:
    """The environment id resolves whenever a stage (or the tiny tokenizer) needs the environment."""
    needs_env = (
        not cfg.model.name_or_path
        or ("sft" in stages and not cfg.sft.dataset)
        or ("reward" in stages and not cfg.reward.dataset)
        or bool({"ppo", "evaluate"} & set(stages))
    )
    if needs_env:
        from envs import env_class

        try:
            env_class(cfg.task.env_id)
        except Exception as e:  # gymnasium's NameNotFound, ImportError of a user's module, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"task.env_id={cfg.task.env_id}: {first}") from e


def check_task(cfg: RLHFConfig, stages: list[str]) -> None:
    """The environment made with `task.env_kwargs`, the offline data the stages need from it, the reward rubric."""
    from rlhf.task.environment import check

    check(cfg, stages)


def check_paths(cfg: RLHFConfig, stages: list[str]) -> None:
    """Dataset files exist with a known extension; model directories hold the right kind of model."""
    from rlhf.models.loading import check_model_location
    from rlhf.task.data import check_dataset_spec

    if "sft" in stages:
        check_dataset_spec(cfg.sft.dataset, "sft.dataset")
    if "reward" in stages:
        check_dataset_spec(cfg.reward.dataset, "reward.dataset")
    if cfg.model.name_or_path:
        check_model_location(cfg.model.name_or_path, "model.name_or_path", kind="causal")
    if "reward" in stages and cfg.reward.init_from:
        check_model_location(cfg.reward.init_from, "reward.init_from")
    if {"ppo", "evaluate"} & set(stages):
        if cfg.ppo.policy_path:
            check_model_location(cfg.ppo.policy_path, "ppo.policy_path", kind="causal")
        if cfg.ppo.reward_model_path:
            check_model_location(cfg.ppo.reward_model_path, "ppo.reward_model_path", kind="reward")


def check_user_data(cfg: RLHFConfig, stages: list[str]) -> None:
    """Load the user's datasets once, so that a bad file fails before the base model is even built."""
    from rlhf.task.data import (
        check_distinct_pairs,
        check_preference_columns,
        check_sft_columns,
        load_user_dataset,
    )

    if "sft" in stages and cfg.sft.dataset:
        check_sft_columns(load_user_dataset(cfg.sft.dataset, "sft.dataset")[0], "sft.dataset")
    if "reward" in stages and cfg.reward.dataset:
        train, test = load_user_dataset(cfg.reward.dataset, "reward.dataset")
        check_preference_columns(train, "reward.dataset")
        for part in (train, test):
            if part is not None:
                check_distinct_pairs(part, "reward.dataset")


def check_policy_tokens(cfg: RLHFConfig, stages: list[str]) -> None:
    """A reply fits the policy's context, and `ppo.stop_token` is one of its tokens, when that is cheap to know:
    the tiny model's settings, or a local model directory's config.json and tokenizer."""
    if not {"ppo", "evaluate"} & set(stages):
        return
    from rlhf.models.loading import model_context

    source = cfg.ppo.policy_path or cfg.model.name_or_path
    special_stop = cfg.ppo.stop_token not in (None, "eos")
    tokenizer: PreTrainedTokenizerBase | None = None
    if not source:  # the tiny model, built from config
        context = cfg.model.max_position_embeddings
        if special_stop and cfg.model.tokenizer == "word":
            from envs import env_class
            from rlhf.models.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(env_class(cfg.task.env_id).vocabulary())
    elif Path(source).is_dir():
        context = model_context(source)
        if special_stop:
            from rlhf.models.loading import load_tokenizer

            tokenizer = load_tokenizer(source)
    else:  # a hub id: its config is not cheap to read
        return
    if context is not None and cfg.ppo.response_length >= context:
        raise ValueError(
            f"ppo.response_length={cfg.ppo.response_length} leaves no room for a prompt in the policy's "
            f"{context}-token context; set it below {context}"
        )
    if tokenizer is not None:
        from rlhf.models.tokenizer import stop_token_ids

        stop_token_ids(tokenizer, cfg.ppo.stop_token)


def check_policy_architecture(cfg: RLHFConfig, stages: list[str]) -> None:
    """The ppo and evaluate stages sample the policy with a key/value cache: a local model whose layers keep a
    recurrent state (Mamba, LFM2, Qwen3-Next, ...) is refused here, before SFT or the reward model train for nothing.
    A hub id is not read here (the sampler refuses it at the first rollout)."""
    if not {"ppo", "evaluate"} & set(stages):
        return
    key = "ppo.policy_path" if cfg.ppo.policy_path else "model.name_or_path"
    source = cfg.ppo.policy_path or cfg.model.name_or_path
    if not source or not Path(source).is_dir():  # the tiny model is a Llama
        return
    from transformers import AutoConfig

    from rlhf.models.loading import check_sampler_support

    check_sampler_support(AutoConfig.from_pretrained(source), f"{key}={source}")


CHECKS: tuple[Callable[[RLHFConfig, list[str]], None], ...] = (
    check_numbers,
    check_model_and_device,
    check_logger,
    check_environment,
    check_task,
    check_paths,
    check_user_data,
    check_policy_tokens,
    check_policy_architecture,
)
"""Every rule after the generic ones, cheapest first: each takes (cfg, stages) and raises ValueError."""
