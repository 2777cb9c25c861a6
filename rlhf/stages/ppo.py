"""PPO stage: train the SFT policy against the task's environment with `rlhf.ppo.trainer.PPOTrainer`.

Inputs come from the upstream stages (policy and reference from `sft`, reward model from `reward`) or from
`ppo.policy_path` / `ppo.reward_model_path`, so PPO also runs alone on a user's own models. Writes the final
policy (`save_pretrained`, LoRA merged, with its tokenizer) at `ctx.output_dir`, the critic at
`ctx.output_dir/critic`, `history.jsonl` (metrics per update), checkpoints under `ctx.output_dir/checkpoints`,
and a plot of reward and KL over updates at `<run dir>/ppo_curves.png`.

Resume: with `ppo.resume=true` (default) a rerun in the same run directory continues from the newest checkpoint
when it is whole and carries this stage's key (`ctx.key`); the registry's resume hook hands its W&B run id to the
pipeline, so the resumed stage logs into the same run, and the trainer hands back the history up to the checkpoint,
which this stage replays into the tracker (the killed process may not have flushed it).

The trainer knows no console and no tracker: `ConsoleAndTracker`, its callback, draws the progress bar, prints a
compact line every `ppo.console_every` updates and sends the metrics (every `ppo.log_every`) and sample tables (every
`ppo.samples_every`) to the stage's W&B run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gymnasium
from accelerate import Accelerator

from rlhf.config import RLHFConfig
from rlhf.models.chat_format import ChatFormat, FormatMismatch
from rlhf.models.loading import (
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
)
from rlhf.ppo.callbacks import Callback
from rlhf.ppo.history import read_history
from rlhf.ppo.rollout import Rollout
from rlhf.rewards import describe, needs_reward_model
from rlhf.rewards.reward_model import same_vocabulary
from rlhf.stages import REGISTRY
from rlhf.stages.base import StageContext, StageResult, upstream_model
from rlhf.task import environment as task
from rlhf.tracking.console import ppo_line, progress

log = logging.getLogger("rlhf")

PLOT_NAME = "ppo_curves.png"
SUMMARY_KEYS = (
    "objective/scores",
    "objective/kl",
    "objective/rlhf_reward",
    "env/gold",
    "env/success_rate",
    "reward/model_score",
    "rollout/response_length",
)


def check_rollout_format(tokenizer, env: gymnasium.Env) -> None:
    """Refuse, before training, a tokenizer whose chat template the rollout would not reproduce token for token.

    The sample dialogue is the environment's own first message, twice, with a short reply after each.
    """
    obs, _ = env.reset(seed=0)
    reply = "ok"
    try:
        ChatFormat(tokenizer).check_consistency([obs, obs], [reply, reply])
    except FormatMismatch as e:
        raise ValueError(f"ppo: {e}") from e
    finally:
        env.close()


def run(cfg: RLHFConfig, ctx: StageContext) -> StageResult:
    from rlhf.ppo.trainer import PPOTrainer

    p = cfg.ppo
    reads = REGISTRY["ppo"].reads(cfg)
    policy_path = upstream_model(ctx, p.policy_path, "sft", "ppo", reads.get("sft"))
    reward_path = upstream_model(ctx, p.reward_model_path, "reward", "ppo", reads.get("reward"))
    rubric = task.rubric(cfg)
    if reward_path is None and needs_reward_model(rubric):
        raise ValueError(
            f"the reward {describe(rubric)} needs a reward model: run the reward stage, set "
            "ppo.reward_model_path=<dir>, or drop the kind=model component"
        )

    tokenizer = load_tokenizer(policy_path)
    check_rollout_format(tokenizer, task.make_env(cfg))
    reward_tokenizer = load_tokenizer(reward_path) if reward_path is not None else None
    if (
        reward_tokenizer is not None
        and p.advantage == "gae"
        and p.critic_init == "reward"
        and not same_vocabulary(tokenizer, reward_tokenizer)
    ):
        raise ValueError(
            f"ppo.critic_init=reward: the reward model {reward_path} has another tokenizer than the policy, so it "
            "cannot value the policy's tokens; set ppo.critic_init=sft (its score still comes from the decoded text)"
        )
    device = resolve_device(cfg.device)
    # model.dtype bfloat16/float16 is mixed precision: the trained policy and critic keep float32 weights and
    # optimizer state, their forward runs under autocast; the frozen reference (without LoRA: with LoRA it is the
    # adapter-disabled policy) and the reward model load in model.dtype
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision={"bfloat16": "bf16", "float16": "fp16"}.get(cfg.model.dtype, "no"),
    )
    lora = cfg.model.lora if cfg.model.lora.r > 0 else None
    policy = load_causal_lm(policy_path, "float32", lora=lora)
    # with LoRA the reference is the policy with its adapters disabled: no second copy in memory
    reference = None if lora else load_causal_lm(policy_path, cfg.model.dtype)
    reward_model = load_reward_model(reward_path, cfg.model.dtype) if reward_path is not None else None
    critic = None
    if p.advantage == "gae":
        critic_path = reward_path if p.critic_init == "reward" else policy_path
        critic = load_reward_model(critic_path, "float32", lora=lora)
    log.info(
        "[ppo] policy %s | reward model %s | critic %s | reward %s | advantage=%s",
        policy_path,
        reward_path,
        p.critic_init if critic is not None else "none",
        describe(rubric),
        p.advantage,
    )

    trainer = PPOTrainer(
        p,
        policy,
        tokenizer,
        lambda: task.make_env(cfg),
        output_dir=ctx.output_dir,
        ref_policy=reference,
        reward_model=reward_model,
        reward_tokenizer=reward_tokenizer,
        critic=critic,
        accelerator=accelerator,
        seed=ctx.seed,
        callback=ConsoleAndTracker(p, ctx.tracker),
        run_id=ctx.tracker.run_id,
        stage_key=ctx.key,
        rubric=rubric,
    )
    try:
        trainer.train()
    finally:
        trainer.close()

    history = read_history(ctx.output_dir)
    metrics = summarize(history)
    trainer.export(ctx.output_dir)  # every process: under FSDP the weights are gathered first
    if accelerator.is_main_process:
        plot = plot_history(history, ctx.run_dir / PLOT_NAME)
        if plot is not None:
            ctx.tracker.log_image("ppo/curves", plot)
    accelerator.wait_for_everyone()
    return StageResult(artifact=ctx.output_dir, metrics=metrics)


def summarize(history: list[dict]) -> dict[str, float]:
    """Stage metrics: each key's mean over the last tenth of the updates (the last one alone is noisy; the keys of
    SUMMARY_KEYS and every rubric component's `reward/<name>`), the first update's gold reward, and the number of
    updates and episodes."""
    if not history:
        return {}
    tail = history[-max(1, len(history) // 10) :]
    metrics = {"updates": float(history[-1]["update"]), "episodes": float(history[-1].get("episode", 0))}
    components = [k for k in history[-1] if k.startswith("reward/") and k not in SUMMARY_KEYS]
    for key in [*SUMMARY_KEYS, *components]:
        values = [
            row[key] for row in tail if key in row
        ]  # per-episode metrics may be missing in some updates
        if values:
            metrics[key] = sum(values) / len(values)
    if "env/gold" in history[0]:
        metrics["env/gold_first"] = history[0]["env/gold"]
    return metrics


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Reward (score, gold, proxy) and KL over PPO updates, as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    updates = [row["update"] for row in history]
    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label, style in (
        ("objective/scores", "score (trained on)", "-"),
        ("env/gold", "gold (environment)", "-"),
        ("reward/model_score", "proxy (reward model)", "--"),
        ("objective/rlhf_reward", "score - kl_coef * KL", "-"),
    ):
        if key in history[0]:
            ax_reward.plot(updates, [row[key] for row in history], style, label=label)
    ax_reward.set(xlabel="PPO update", ylabel="mean per episode", title="reward")
    ax_reward.legend(fontsize=8)
    ax_kl.plot(updates, [row["objective/kl"] for row in history], color="tab:red")
    ax_kl.set(xlabel="PPO update", ylabel="nats per episode", title="KL(policy || reference)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class ConsoleAndTracker(Callback):
    """The PPO trainer's callback in the stage: a progress bar, a compact console line every `console_every` updates
    (and the first and last), every metric to the tracker every `log_every` updates (and the last), a samples table
    every `samples_every` (and the first); on resume the history up to the checkpoint replayed into the tracker.

    p: the PPO settings (`PPOConfig`); tracker: anything with `log(metrics, step, console)` and
    `log_table(key, columns, rows, step)` (`rlhf.tracking.wandb_run.StageTracker`), or None (the console alone).
    """

    def __init__(self, p, tracker=None) -> None:
        self.p, self.tracker = p, tracker
        self.num_updates = p.total_episodes // p.batch_size
        self.bar = None

    def shown(self, update: int) -> bool:
        """Whether update `update` prints a console line (every console_every, the first and the last)."""
        every = self.p.console_every
        return every > 0 and (update % every == 0 or update in (1, self.num_updates))

    def tracked(self, update: int) -> bool:
        """Whether update `update`'s metrics go to the tracker (every log_every, and the last)."""
        every = self.p.log_every
        return every > 0 and (update % every == 0 or update == self.num_updates)

    def on_resume(self, history: list[dict]) -> None:
        if self.tracker is None:
            return
        for row in history:
            if self.tracked(row["update"]):
                metrics = {k: v for k, v in row.items() if k != "update"}
                self.tracker.log(metrics, step=row["update"], console=False)

    def on_train_start(self, update: int, num_updates: int) -> None:
        self.num_updates = num_updates
        self.bar = progress("ppo", total=num_updates, initial=update, unit="update")

    def on_update(self, update: int, metrics: dict[str, float], rollout: Rollout) -> None:
        if self.shown(update):
            log.info(ppo_line(metrics, update, self.num_updates))
        if self.tracker is not None:
            if self.tracked(update):
                self.tracker.log(metrics, step=update, console=False)
            every = self.p.samples_every
            if every > 0 and (update % every == 0 or update == 1):
                scores = rollout.env_rewards.tolist()
                rows = [[update, q, t, s] for q, t, s in zip(rollout.queries, rollout.transcripts, scores)][
                    :16
                ]
                self.tracker.log_table(
                    "samples", ["update", "query", "response", "env_reward"], rows, step=update
                )
        self.bar.update(1)
        self.bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")

    def on_train_end(self) -> None:
        self.bar.close()
