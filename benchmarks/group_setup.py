"""What benchmarks/grpo_vs_trl.py and benchmarks/time_to_quality.py share: one group-baseline setting, and how our
`PPOTrainer` (`ppo.advantage=grpo`) and TRL 1.16's `GRPOTrainer` are built from it, on the same start model, prompts
and environment reward.

Both sides get:
- the same start: one `save_pretrained` directory (weights, tokenizer, chat template), loaded by each side;
- the same prompts: `env.reset(seed=s)` with our trainer's episode seeds (`train_episode_seed(seed, i)`, prompt i
  in update u for i in [u * num_prompts, (u + 1) * num_prompts)), fed to TRL in that order (`shuffle_dataset=False`)
  as conversational prompts, which TRL renders with the same chat template our rollout uses;
- the same reward: the environment's reward for the reply. Ours steps the episode's env (`reward_source=env`); TRL
  calls `EnvReward`, which resets a fresh env with the prompt's seed and steps it with the decoded completion;
- the same algorithm settings: num_prompts x num_generations completions per update, response length, plain
  sampling (temperature, top-k 0, top-p 1, KV cache), one epoch of one minibatch (TRL: num_iterations=1, one
  optimizer step per generation batch), advantages (r - group mean) / (group std + 1e-4), clipped ratio 0.2, loss
  averaged over all completion tokens of the batch (TRL `loss_type="dapo"`), KL to the reference as `beta * k3` in
  the loss, AdamW (eps 1e-5, no weight decay), gradient clipping 1.0, linear learning-rate decay over `updates`,
  float32, `torch.set_num_threads(threads)`, no checkpoints, no evaluation, no tracker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class GroupSetup:
    """One group-baseline training setting, turned into our PPOConfig (`ours_config`) and TRL's GRPOConfig
    (`trl_config`)."""

    env_id: str = "rlhf/Review-v0"
    num_prompts: int = 8
    """Prompts per update."""
    num_generations: int = 4
    """Completions per prompt (the group)."""
    response_length: int = 16
    """Most tokens per completion."""
    learning_rate: float = 1e-4
    """AdamW learning rate at the first update."""
    beta: float = 0.04
    """KL coefficient of the k3 term in the loss."""
    temperature: float = 1.0
    updates: int = 10
    """Updates the learning rate decays over (linearly to 0)."""
    seed: int = 0

    @property
    def batch_size(self) -> int:
        """Completions per update."""
        return self.num_prompts * self.num_generations


def set_threads(threads: int, seed: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- start model, prompts


def save_fresh_model(out_dir: Path, env_id: str, seed: int) -> Path:
    """The project's tiny Llama (rlhf.models.config.ModelConfig defaults) with fresh weights from `seed` and the word-level
    tokenizer over the task's vocabulary, saved with `save_pretrained` into `out_dir`."""
    import torch
    from transformers.utils import logging as hf_logging

    import envs
    from rlhf.models.config import ModelConfig
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_tokenizer

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(envs.env_class(env_id).vocabulary())
    model = build_tiny_model(ModelConfig(), tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def prompt_dataset(setup: GroupSetup, updates: int):
    """TRL's train dataset: the prompts our trainer plays in its first `updates` updates, in its order, as
    conversations (TRL applies the chat template with the generation prompt, as our rollout does), with the seed
    each prompt came from (TRL passes dataset columns to reward functions)."""
    from datasets import Dataset

    import envs
    from rlhf.ppo.seeds import train_episode_seed

    env = envs.make(setup.env_id)
    seeds = [train_episode_seed(setup.seed, i) for i in range(updates * setup.num_prompts)]
    prompts = [[{"role": "user", "content": env.reset(seed=s)[0]}] for s in seeds]
    return Dataset.from_dict({"prompt": prompts, "seed": seeds})


class EnvReward:
    """TRL reward function: the environment's reward for each completion, from a fresh reset with the prompt's seed
    (what our rollout does for a single-turn task: reset(seed), step(decoded reply))."""

    __name__ = "env"

    def __init__(self, env_id: str) -> None:
        import envs

        self.env = envs.make(env_id)

    def __call__(self, prompts: list, completions: list, seed: list[int], **_: Any) -> list[float]:
        rewards = []
        for completion, s in zip(completions, seed):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            self.env.reset(seed=int(s))
            rewards.append(float(self.env.step(text)[1]))
        return rewards


# ---------------------------------------------------------------------------------------------- our side


def ours_config(setup: GroupSetup, advantage: str = "grpo", **overrides: Any):
    """Our PPOConfig for `setup`. advantage=grpo: the group-baseline mode matched to TRL's GRPO; the other fields of
    PPOConfig keep their schema defaults unless `overrides` sets them (e.g. the GAE side's epochs and KL)."""
    from rlhf.ppo.config import PPOConfig

    fields: dict[str, Any] = {
        "reward_source": "env",
        "advantage": advantage,
        "num_generations": setup.num_generations if advantage != "gae" else 1,
        "batch_size": setup.batch_size,
        "total_episodes": setup.updates * setup.batch_size,
        "response_length": setup.response_length,
        "num_ppo_epochs": 1,
        "num_mini_batches": 1,
        "learning_rate": setup.learning_rate,
        "kl_coef": setup.beta,
        "kl_in": "loss",
        "kl_estimator": "k3",
        "temperature": setup.temperature,
        "cliprange": 0.2,
        "max_grad_norm": 1.0,
        "stop_token": "eos",
        "save_every": 0,
        "samples_every": 0,
        "console_every": 0,
        "resume": False,
    }
    fields.update(overrides)
    return PPOConfig(**fields)


def build_ours(model_dir: Path, setup: GroupSetup, cfg, output_dir: Path):
    """Our PPOTrainer on the start model in `model_dir`: policy and frozen reference from it, and with GAE a critic
    from it too (a fresh scalar head on its backbone, as `ppo.critic_init=sft`)."""
    import envs
    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer

    critic = load_reward_model(model_dir) if cfg.advantage == "gae" else None
    return PPOTrainer(
        cfg,
        load_causal_lm(model_dir),
        load_tokenizer(model_dir),
        lambda: envs.make(setup.env_id),
        output_dir=output_dir,
        ref_policy=load_causal_lm(model_dir),
        critic=critic,
        seed=setup.seed,
    )


# ---------------------------------------------------------------------------------------------- TRL's side


def trl_config(setup: GroupSetup, output_dir: Path, **overrides: Any):
    """TRL 1.16 GRPOConfig for `setup` (field names from trl/trainer/grpo_config.py)."""
    from trl import GRPOConfig

    fields: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "bf16": False,  # float32 like ours (GRPOConfig defaults bf16 on)
        "gradient_checkpointing": False,  # defaults on: slower for a tiny model
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,  # a log per update, as ours writes a history row per update (the reward is read from it)
        "log_completions": False,
        "seed": setup.seed,
        "max_steps": setup.updates,
        "per_device_train_batch_size": setup.batch_size,  # one generation batch = one optimizer step
        "gradient_accumulation_steps": 1,
        "num_generations": setup.num_generations,
        "num_iterations": 1,
        "shuffle_dataset": False,
        "max_completion_length": setup.response_length,
        "temperature": setup.temperature,
        "top_k": 0,
        "top_p": 1.0,
        "use_vllm": False,
        "beta": setup.beta,
        "epsilon": 0.2,
        "scale_rewards": "group",
        "loss_type": "dapo",
        "learning_rate": setup.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "adam_epsilon": 1e-5,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "dataloader_num_workers": 0,
    }
    fields.update(overrides)
    return GRPOConfig(**fields)


def build_trl(model_dir: Path, setup: GroupSetup, args, callbacks: list):
    """TRL's GRPOTrainer on the start model in `model_dir`, passed as a path: TRL loads the policy from it and, with
    beta > 0, the reference too (it reloads the reference from the policy's `_name_or_path`)."""
    from trl import GRPOTrainer

    from rlhf.models.loading import load_tokenizer

    return GRPOTrainer(
        model=str(model_dir),
        reward_funcs=EnvReward(setup.env_id),
        args=args,
        train_dataset=prompt_dataset(setup, args.max_steps),
        processing_class=load_tokenizer(model_dir),
        callbacks=callbacks,
    )


def trl_callback(on_step_begin: Callable | None = None, on_step_end: Callable | None = None, on_log=None):
    """A transformers TrainerCallback from plain functions (each gets (state, control, logs?))."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if on_step_begin is not None:
                on_step_begin(state, control)

        def on_step_end(self, args, state, control, **kwargs):
            if on_step_end is not None:
                on_step_end(state, control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if on_log is not None:
                on_log(state, control, logs or {})

    return _Callback()


def versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}
