"""PPO's own settings (`PPOConfig`, the `ppo` group of the Hydra schema, which composes it) and their checks.

`check_ppo` holds every rule of these settings alone (ranges, cross-field rules, the batch split over processes);
`check_models` the rules between them and the models handed to the trainer. `rlhf.run.validation` calls
`check_ppo` before anything runs, the trainer calls both when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlhf.common.fields import at_least, check_choices, fraction, one_of, positive

if TYPE_CHECKING:
    from torch import nn

    from rlhf.rewards import Component


@dataclass
class PPOConfig:
    policy_path: str | None = None
    """Policy (and frozen reference) to start from; unset uses the SFT stage's output."""
    reward_model_path: str | None = None
    """Reward model for `reward_source=model|both`; unset uses the reward stage's output."""
    critic_init: str = one_of("reward", "reward", "sft")
    """Critic initialisation: reward (the reward model) | sft (the policy's backbone)."""
    reward_source: str = one_of("model", "env", "model", "both")
    """Score of an episode: env (environment reward) | model (reward model) | both (weighted sum)."""
    env_reward_weight: float = 1.0
    """Weight of the environment's reward when `reward_source=both`."""
    model_reward_weight: float = 1.0
    """Weight of the reward model's score when `reward_source=both`."""
    advantage: str = one_of("gae", "gae", "grpo", "rloo")
    """Advantage estimator: gae (critic) | grpo | rloo (group baselines, no critic)."""
    num_generations: int = 4
    """Samples per prompt for grpo/rloo."""
    total_episodes: int = 4096
    """Episodes to train on in all."""
    batch_size: int = 64
    """Episodes per PPO update (global, across processes)."""
    response_length: int = 16
    """Most tokens the policy may generate in one turn."""
    num_ppo_epochs: int = 4
    """Passes over each batch."""
    num_mini_batches: int = 4
    """Minibatches per pass."""
    learning_rate: float = 1e-4
    """Policy and critic learning rate (AdamW, linear decay)."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: str = one_of("k1", "k1", "k2", "k3")
    """Per-token KL estimator: k1 (the only one allowed with `kl_in=reward`) | k2 | k3 (GRPO's, with `kl_in=loss`)."""
    adaptive_kl: bool = False
    """Adapt `kl_coef` towards `kl_target` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per episode for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    target_kl: float | None = None
    """Stop an update's epochs early when approx KL to the rollout policy exceeds this."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value clip around the rollout values."""
    vf_coef: float = 0.1
    """Value loss weight."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_rewards: bool = False
    """Whiten per-token rewards before GAE."""
    normalize_scores: bool = False
    """Normalise episode scores with a running mean and std."""
    temperature: float = 1.0
    """Sampling temperature during rollouts."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a turn that ends without the stop token."""
    stop_token: str | None = "eos"
    """Token that ends a turn: eos (the tokenizer's EOS and every id of the model's `generation_config.eos_token_id`,
    e.g. Qwen2.5's <|im_end|> and <|endoftext|>) | a token of the vocabulary (that one only) | null (the length
    limit only)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    save_every: int = 0
    """Updates between checkpoints; 0 only at the end."""
    resume: bool = True
    """Resume from the last checkpoint in the stage directory when there is one."""
    log_every: int = 1
    """Updates between rows of metrics in W&B (history.jsonl has every update; the console: console_every)."""
    console_every: int = 5
    """Updates between compact console lines (gold reward, score, KL, length, reward components, eps), plus the first
    and last update; 0 prints none. The default gives ~14 lines for 64 updates; the full set goes to W&B."""
    samples_every: int = 10
    """Updates between sample tables."""
    critic_learning_rate: float | None = None
    """Critic learning rate; unset uses `learning_rate`."""
    whiten_advantages: bool = True
    """Whiten GAE advantages over each batch's action tokens (TRL does); group advantages are never whitened."""
    forward_batch_size: int = 64
    """Episodes per no-grad forward pass (reference, critic and reward model scoring); bounds memory."""
    micro_batch_size: int | None = None
    """Episodes per forward/backward inside a minibatch, gradients accumulated to one optimizer step (the same
    step as the whole minibatch at once); bounds training memory whatever the batch size. None: the whole minibatch."""
    kl_in: str = one_of("reward", "reward", "loss")
    """Where the KL to the reference enters: reward (per-token penalty in the reward / advantage) | loss (a term of
    the policy loss, GRPO's beta)."""
    weight_decay: float = 0.0
    """AdamW weight decay of the policy and critic; 0 as TRL's PPO."""
    critic_process: bool = False
    """Train the critic (forward, backward, clipping, AdamW step) in a second process, in parallel with the policy
    (weights and optimizer state in shared memory; checkpoints and results as without it). The CPU threads are split
    between the two while it works, at least one each. CPU, single-process runs with ppo.advantage=gae."""


def check_ppo(p: Any, num_processes: int = 1) -> None:
    """PPO settings (`ppo.*`) on `num_processes` data-parallel processes: any object with PPOConfig's fields."""
    check_choices(p, PPOConfig, "ppo.")
    positive(p, "ppo", "learning_rate", "critic_learning_rate", "temperature", "cliprange", "cliprange_value")
    positive(p, "ppo", "max_grad_norm", "kl_target", "target_kl")
    at_least(p, "ppo", 1, "batch_size", "total_episodes", "response_length", "num_ppo_epochs")
    at_least(p, "ppo", 1, "num_mini_batches", "num_generations", "forward_batch_size", "micro_batch_size")
    at_least(p, "ppo", 1, "kl_horizon")
    at_least(
        p,
        "ppo",
        0,
        "kl_coef",
        "vf_coef",
        "weight_decay",
        "save_every",
        "log_every",
        "console_every",
        "samples_every",
    )
    fraction(p, "ppo", "gamma", "lam")
    if p.batch_size % num_processes:
        raise ValueError(f"ppo.batch_size={p.batch_size} must be divisible by the {num_processes} processes")
    local = p.batch_size // num_processes
    if local % p.num_mini_batches:
        raise ValueError(
            f"ppo.batch_size / processes = {local} must be divisible by ppo.num_mini_batches={p.num_mini_batches}"
        )
    if p.advantage in ("grpo", "rloo") and (p.num_generations < 2 or local % p.num_generations):
        raise ValueError(
            f"ppo.advantage={p.advantage} needs ppo.num_generations >= 2 dividing the per-process batch {local}"
        )
    if p.critic_process and num_processes > 1:
        raise ValueError(
            f"ppo.critic_process runs the critic beside this process; with {num_processes} processes DDP/FSDP "
            "reduces its gradients instead: set ppo.critic_process=false"
        )
    if p.total_episodes < p.batch_size:
        raise ValueError(f"ppo.total_episodes={p.total_episodes} must be >= ppo.batch_size={p.batch_size}")
    if p.kl_in == "reward" and p.kl_estimator != "k1":
        raise ValueError(
            f"ppo.kl_estimator={p.kl_estimator} is >= 0 on every token and biased as a reward; "
            "use ppo.kl_estimator=k1 or set ppo.kl_in=loss"
        )
    if p.kl_in == "loss" and p.kl_estimator == "k1":
        raise ValueError(
            "ppo.kl_in=loss with ppo.kl_estimator=k1 has a zero gradient in expectation; "
            "use ppo.kl_estimator=k3 (GRPO's) or k2"
        )


def check_models(
    p: Any,
    rubric: list[Component],
    policy: nn.Module,
    ref_policy: nn.Module | None,
    reward_model: nn.Module | None,
    critic: nn.Module | None,
    *,
    loss_scaling: bool,
    sharded: bool,
) -> None:
    """The models handed to the trainer fit the settings `p`: a reward model when the rubric needs one, a critic for
    GAE, a reference (or LoRA adapters to disable), no float16 loss scaling with a critic (`loss_scaling`: it scales
    one optimizer's loss at a time), adapters the sampler and the export handle (`sharded`: under FSDP)."""
    from rlhf.models.lora import check_adapters  # here: the schema (this module) imports no torch
    from rlhf.rewards import describe, needs_reward_model

    if needs_reward_model(rubric) and reward_model is None:
        raise ValueError(
            f"the reward {describe(rubric)} (ppo.reward_source={p.reward_source}) needs a reward model "
            "(ppo.reward_model_path)"
        )
    if p.advantage == "gae" and critic is None:
        raise ValueError("ppo.advantage=gae needs a critic; pass one or use ppo.advantage=grpo|rloo")
    if ref_policy is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("no reference policy: pass one, or train LoRA adapters (model.lora.r > 0)")
    if loss_scaling and p.advantage == "gae":
        raise ValueError(
            "float16 mixed precision (model.dtype=float16) scales the loss for one optimizer at a time and "
            "would mis-scale the critic's; use model.dtype=bfloat16 or float32, or ppo.advantage=grpo|rloo"
        )
    # adapters the sampler and the export cannot handle (aLoRA; LoRA variants merged from FSDP's state dict)
    for model in (policy, critic):
        if model is not None:
            check_adapters(model, sharded=sharded)
