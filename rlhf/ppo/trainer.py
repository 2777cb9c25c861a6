"""PPO against text environments on `accelerate`: rollout -> score -> advantages -> minibatch epochs.

One update (`PPOTrainer.step`) reads like the algorithm:

    1. rollout    each process plays batch_size / num_processes episodes with the current policy
    2. score      the rubric's weighted components (environment reward, reward-model score, ...; `rlhf.rewards`),
                  minus the missing-EOS penalty (`scoring`)
    3. ref + V    reference log-probabilities and the critic's values of the same tokens
    4. rewards    per token: score - kl_coef * kl (ppo.kl_in=reward), or the score alone (kl_in=loss)
    5. advantages GAE with the critic, or group baselines (GRPO / RLOO) of the scores over num_generations samples
                  per prompt, plus the per-token KL penalty (`advantages`)
    6. optimise   num_ppo_epochs x num_mini_batches of clipped policy and value losses (+ kl_coef * KL with
                  kl_in=loss), clipped gradients (`optimise`, `losses.ppo_loss`)

The critic has one interface for its three modes (none, in this process, in a second process: `critic`); call
`close()` when done (the PPO stage does). The math lives in `ops`, `advantages`, `kl` and `losses` (pure tensor
functions); this module only wires it. No Hydra, no console and no W&B here: `config` is any object with
`PPOConfig`'s fields, and metrics and progress leave through a `callbacks.Callback` (the PPO stage's drives the
console and the tracker) and `history.jsonl`.

Dropout is left off (models stay in eval mode), as in TRL: the rollout's log-probabilities must be those the
update recomputes, so the first PPO ratio is 1 (up to float rounding: the rollout's come from the KV-cached sampler).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import gymnasium
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn

from rlhf.models.tokenizer import stop_token_ids
from rlhf.ppo.advantages import advantages_and_returns
from rlhf.ppo.batch import Batch
from rlhf.ppo.callbacks import Callback
from rlhf.ppo.checkpoint import (
    check_settings,
    checkpoint_root,
    export_models,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from rlhf.ppo.config import check_models, check_ppo
from rlhf.ppo.critic import make_critic
from rlhf.ppo.distributed import check_finite, gather_mean, mean
from rlhf.ppo.history import append_row, history_path, truncate_history
from rlhf.ppo.kl import kl_penalty, make_kl_controller
from rlhf.ppo.metrics import episode_sums
from rlhf.ppo.optim import adamw, linear_decay, upcast_trainable
from rlhf.ppo.optimise import Optimiser
from rlhf.ppo.rollout import EnvFailure, Rollout, output_head, rollout, sequence_logprobs
from rlhf.ppo.scoring import RunningMoments, score
from rlhf.ppo.seeds import rollout_seeds
from rlhf.ppo.sharding import full_state_dict, gathered, shard_frozen
from rlhf.rewards import Component, build_rubric
from rlhf.rewards.reward_model import RewardScorer

log = logging.getLogger(__name__)


class PPOTrainer:
    """PPO (or GRPO/RLOO-style critic-free PPO) of a causal LM against Gymnasium text environments."""

    def __init__(
        self,
        config,
        policy: nn.Module,
        tokenizer,
        make_env: Callable[[], gymnasium.Env],
        *,
        output_dir: str | Path,
        ref_policy: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        reward_tokenizer=None,
        critic: nn.Module | None = None,
        accelerator: Accelerator | None = None,
        seed: int = 0,
        callback: Callback | None = None,
        run_id: str | None = None,
        stage_key: str | None = None,
        rubric: list[Component] | None = None,
    ) -> None:
        """policy: causal LM (a peft model with LoRA); ref_policy: frozen reference (None with LoRA: the policy with
        its adapters disabled); reward_model, critic: AutoModelForSequenceClassification; make_env: builds one env.
        reward_tokenizer: the reward model's tokenizer when it differs from the policy's (scored on the decoded text).
        callback: told of the resume, every update and the end (`callbacks.Callback`).
        run_id: the W&B run id stored in checkpoints. stage_key: the pipeline's key of this stage: stored in every
        checkpoint, and only a checkpoint of the same key is resumed (None: any).
        rubric: the score's components (`rlhf.rewards`); None builds the one of `config.reward_source`.
        """
        self.cfg = cfg = config
        self.acc = acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.callback = callback or Callback()
        self.run_id = run_id
        self.seed = seed
        self.stage_key = stage_key
        check_ppo(cfg, acc.num_processes)
        if rubric is None:
            rubric = build_rubric({}, cfg.reward_source, cfg.env_reward_weight, cfg.model_reward_weight)
        self.rubric = rubric
        sharded = acc.distributed_type == DistributedType.FSDP
        scaling = getattr(acc, "scaler", None) is not None
        check_models(
            cfg, self.rubric, policy, ref_policy, reward_model, critic, loss_scaling=scaling, sharded=sharded
        )
        self.local_batch_size = cfg.batch_size // acc.num_processes
        self.num_updates = cfg.total_episodes // cfg.batch_size
        self.group_size = cfg.num_generations if cfg.advantage in ("grpo", "rloo") else 1
        self.advantage_settings = {
            "estimator": cfg.advantage,
            "group_size": self.group_size,
            "gamma": cfg.gamma,
            "lam": cfg.lam,
            "whiten_rewards": cfg.whiten_rewards,
            "whiten_advantages": cfg.whiten_advantages,
        }
        # the EOS and every id of the policy's generation_config.eos_token_id (Qwen2.5: <|im_end|>, <|endoftext|>)
        self.stop_token_ids = stop_token_ids(
            tokenizer, cfg.stop_token, getattr(policy, "generation_config", None)
        )
        set_seed(seed + acc.process_index)

        # models: the policy (and critic) train, their weights and optimizer state in float32 (low precision only in
        # the forward, under the accelerator's autocast); reference and reward model are frozen
        policy.eval()
        upcast_trainable(policy, "policy")
        policy_opt = adamw(policy, cfg.learning_rate, cfg.weight_decay)
        self.policy_sched = linear_decay(policy_opt, self.num_updates)
        self.policy, self.policy_opt = acc.prepare(policy, policy_opt)
        self.critic = make_critic(critic, acc, cfg, self.num_updates)
        # the policy's LM head, applied a chunk of tokens at a time in the update (`rollout.response_logprobs`);
        # None scores from full logits: FSDP shards the head's weight outside the forward
        head = None if sharded else output_head(self.unwrapped_policy)
        self.optimiser = Optimiser(acc, self.policy, self.policy_opt, head, self.critic, cfg)
        self.ref_policy = self._freeze(ref_policy)
        self.reward_scorer = None
        if reward_model is not None:
            scorer_tokenizer = reward_tokenizer or tokenizer
            model = self._freeze(reward_model)
            self.reward_scorer = RewardScorer(model, scorer_tokenizer, tokenizer, cfg.forward_batch_size)
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = RunningMoments()
        for obj in (self.policy_sched, self.critic.scheduler, self.kl_ctl, self.score_moments):
            if obj is not None:  # the order names their files in a checkpoint
                acc.register_for_checkpointing(obj)

        self.envs = [make_env() for _ in range(self.local_batch_size)]
        self.update = 0
        self.episodes = 0
        self._start_time, self._start_episodes = time.perf_counter(), 0
        self.last_checkpoint: Path | None = None
        self.history_path = history_path(self.output_dir)

    def _freeze(self, model: nn.Module | None) -> nn.Module | None:
        """A frozen model (reference, reward model) on the device, in eval mode; under FSDP2 sharded like the trained
        ones (`sharding.shard_frozen`)."""
        if model is None:
            return None
        model.to(self.acc.device).eval()
        model.requires_grad_(False)
        return shard_frozen(self.acc, model)

    @property
    def unwrapped_policy(self) -> nn.Module:
        return self.acc.unwrap_model(self.policy)

    def close(self) -> None:
        """Stop the critic's process, if any (the models stay usable)."""
        self.critic.close()

    # ------------------------------------------------------------------ the loop
    def train(self, max_updates: int | None = None) -> dict[str, float]:
        """Run updates until total_episodes (or `max_updates` more); resume from the last checkpoint first.

        Returns the last update's metrics.
        """
        if self.update == 0 and not (self.cfg.resume and self.resume()):
            self._start_over()
        stop = self.num_updates if max_updates is None else min(self.num_updates, self.update + max_updates)
        main = self.acc.is_main_process
        if main:
            self.callback.on_train_start(self.update, self.num_updates)
        self._start_time, self._start_episodes = time.perf_counter(), self.episodes
        metrics: dict[str, float] = {}
        while self.update < stop:
            try:
                metrics, ro = self.step()
            except EnvFailure as e:
                kept = self.last_checkpoint or latest_checkpoint(self.output_dir)
                where = (
                    f"last checkpoint {kept} kept; rerun to resume from it" if kept else "no checkpoint yet"
                )
                raise EnvFailure(f"{e} [PPO update {self.update + 1}/{self.num_updates}; {where}]") from e
            self.update += 1
            if main:
                append_row(self.output_dir, self.update, metrics)
                self.callback.on_update(self.update, metrics, ro)
            save_every = self.cfg.save_every
            if self.update == self.num_updates or (save_every > 0 and self.update % save_every == 0):
                self.save()
        if main:
            self.callback.on_train_end()
        return metrics

    def step(self) -> tuple[dict[str, float], Rollout]:
        """One PPO update on a fresh batch of episodes. Returns the update's metrics and its rollout."""
        cfg, critic = self.cfg, self.critic
        t0 = time.perf_counter()
        # 1. rollout: this process's share of the batch, the policy's own tokens kept (token-in/token-out)
        ro = self.rollout()
        mask = ro.action_mask  # (B, R)
        t1 = time.perf_counter()
        critic.start_values(ro)  # a critic in its own process computes them while this one scores
        with critic.sharing_threads():
            # 2. score: the rubric's weighted components per token (env rewards at turn ends, the others at the last
            #    token), unweighted components kept for the metrics
            scores = self.score(ro)
            # 3. reference log-probabilities and values of the sampled tokens
            ref_logprobs = self.ref_logprobs(ro)  # (B, R)
            values = critic.values(ro)  # (B, R)
        t2 = time.perf_counter()
        # 4. rewards = score - kl_coef * kl, per token (ppo.kl_in=reward); with kl_in=loss the score alone, and
        #    kl_coef * KL is a term of the policy loss (step 6)
        kl = torch.where(mask, kl_penalty(ro.logprobs, ref_logprobs, cfg.kl_estimator), 0.0)  # (B, R)
        non_score_reward = -self.kl_ctl.value * kl  # (B, R)
        kl_reward = non_score_reward if cfg.kl_in == "reward" else torch.zeros_like(kl)  # (B, R)
        self._check_finite(
            "rewards",
            scores.token_scores.sum() + kl_reward.sum(),
            "check the environment's rewards, the reward model and the reference's log-probabilities",
        )
        # 5. advantages and returns: GAE over score + KL rewards, or the group advantage of the scores plus the
        #    per-token KL penalty (not divided by the group's std)
        advantages, returns = advantages_and_returns(
            scores.token_scores, kl_reward, values, mask, **self.advantage_settings
        )  # (B, R), (B, R)
        critic.set_targets(values, returns)
        # 6. num_ppo_epochs x num_mini_batches: clipped policy loss (+ KL with kl_in=loss), clipped value loss,
        #    clipped gradients, step
        batch = Batch(
            ro.query_responses, ro.attention_mask, mask, ro.logprobs, ref_logprobs, values, advantages, returns,
            ro.context_length,
        )  # fmt: skip
        with critic.sharing_threads():
            stats = self.optimiser.optimise(batch, self.kl_ctl.value, self.update + 1)
        t3 = time.perf_counter()

        k1 = torch.where(mask, ro.logprobs - ref_logprobs, 0.0).sum(1)  # (B,) sequence KL, TRL's objective/kl
        self.kl_ctl.update(mean(self.acc, k1.mean()), cfg.batch_size)
        self.policy_sched.step()
        critic.schedule()
        self.episodes += cfg.batch_size
        metrics = gather_mean(self.acc, episode_sums(ro, scores, k1, non_score_reward, stats))
        return {**metrics, **self._scalars(ro, t0, t1, t2, t3)}, ro

    def _scalars(self, ro: Rollout, t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
        """The update's metrics that are no episode means: KL coefficient, learning rate, progress, speed and the
        phases' times (t0..t3: the update's start, rollout done, scoring done, optimisation done)."""
        elapsed = time.perf_counter() - self._start_time
        generated = mean(self.acc, ro.response_lengths.float().sum()) * self.acc.num_processes
        return {
            "objective/kl_coef": self.kl_ctl.value,
            "lr": self.policy_sched.get_last_lr()[0],
            "episode": self.episodes,
            "eps": (self.episodes - self._start_episodes) / max(elapsed, 1e-9),
            "time/rollout": t1 - t0,
            "time/score": t2 - t1,
            "time/update": t3 - t2,
            "tokens_per_second": generated / max(t1 - t0, 1e-9),
        }

    # ------------------------------------------------------------------ the phases
    def rollout(self) -> Rollout:
        """Step 1: this process's episodes of the next update. Seeds follow the global episode index: process r plays
        [r * B_local, (r + 1) * B_local) of the update's batch."""
        first = self.episodes + self.acc.process_index * self.local_batch_size
        seeds = rollout_seeds(self.seed, first, self.local_batch_size, self.group_size)
        # FSDP: the whole weights, gathered once (no collective per generated token). Mixed precision samples from
        # the policy as the update computes it, under autocast (the sampler then keeps low-precision weight copies).
        with gathered(self.acc, self.policy) as policy, self.acc.autocast():
            return rollout(
                policy,
                self.tokenizer,
                self.envs,
                seeds,
                response_length=self.cfg.response_length,
                temperature=self.cfg.temperature,
                stop_token_ids=self.stop_token_ids,
            )

    def score(self, ro: Rollout):
        """Step 2: `scoring.score` of the episodes with this run's rubric, reward model and settings."""
        return score(
            ro,
            self.rubric,
            self.reward_scorer,
            # only a turn that ended on no stop id is penalised (none without stop ids)
            missing_eos_penalty=self.cfg.missing_eos_penalty if self.stop_token_ids else None,
            moments=self.score_moments if self.cfg.normalize_scores else None,
            gather=self.acc.gather,
        )

    @torch.no_grad()
    def ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        """Step 3: log-probabilities (B, R) under the frozen reference; with LoRA, the policy with its adapters
        disabled."""
        lora = self.ref_policy is None  # the reference: the policy (FSDP: gathered whole), adapters disabled
        with (
            gathered(self.acc, self.policy) if lora else nullcontext(self.ref_policy) as ref,
            ref.disable_adapter() if lora else nullcontext(),
        ):
            logprobs = sequence_logprobs(
                ref,
                ro.query_responses,
                ro.attention_mask,
                ro.context_length,
                self.cfg.temperature,
                self.cfg.forward_batch_size,
            )
        return logprobs.masked_fill(~ro.action_mask, 0.0)

    def _check_finite(self, what: str, value: torch.Tensor, advice: str) -> None:
        check_finite(self.acc, what, value, advice, self.update + 1)

    # ------------------------------------------------------------------ checkpoints
    def _trained_models(self) -> dict[str, tuple[nn.Module, dict | None]]:
        """The policy and the critic (when there is one): the model and, under FSDP, its whole state dict gathered
        onto the main process (every process takes part; None otherwise: the model's own is whole)."""
        return {
            "policy": (self.unwrapped_policy, full_state_dict(self.acc, self.policy)),
            **self.critic.saved(),
        }

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to continue exactly (all processes call this)."""
        pretrained = {
            name: (model, self.tokenizer, state) for name, (model, state) in self._trained_models().items()
        }
        meta = {
            "episodes": self.episodes,
            "num_updates": self.num_updates,
            "batch_size": self.cfg.batch_size,
            "num_processes": self.acc.num_processes,
            "mixed_precision": self.acc.mixed_precision,
            "seed": self.seed,
            "wandb_run_id": self.run_id,
            "stage_key": self.stage_key,
        }
        self.last_checkpoint = save_checkpoint(self.acc, self.output_dir, self.update, meta, pretrained)
        return self.last_checkpoint

    def export(self, directory: str | Path) -> None:
        """The trained models as plain `save_pretrained` directories (`checkpoint.export_models`): the policy (LoRA
        merged) with its tokenizer at `directory`, the critic at `directory/critic`. Every process calls it; call it
        once training is over."""
        export_models(self.acc, Path(directory), self._trained_models(), self.tokenizer)

    def _start_over(self) -> None:
        """A fresh start: no history rows and no checkpoints of an earlier run stay behind to be mistaken for ours."""
        if self.acc.is_main_process:
            self.history_path.unlink(missing_ok=True)
            shutil.rmtree(checkpoint_root(self.output_dir), ignore_errors=True)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the newest checkpoint in output_dir, if any (weights, optimizers, RNGs, counters).

        Only a whole checkpoint (its manifest verified) of this trainer's stage key is resumed. The history rows up
        to the checkpoint are kept and handed to the callback's `on_resume` (the PPO stage replays them into its
        tracker, which writes only the steps its W&B run does not hold yet: a killed process may not have flushed
        them); the rows after it are dropped, those updates are redone.
        """
        checkpoint = resumable_checkpoint(self.output_dir, self.stage_key)
        if checkpoint is None:
            return False
        meta = load_checkpoint(self.acc, checkpoint)
        check_settings(
            checkpoint,
            meta,
            batch_size=self.cfg.batch_size,
            num_processes=self.acc.num_processes,
            mixed_precision=self.acc.mixed_precision,
        )
        if meta.get("num_updates") != self.num_updates:
            log.warning(
                "resuming with %d updates in all (checkpoint: %s)", self.num_updates, meta.get("num_updates")
            )
        self.update, self.episodes = int(meta["update"]), int(meta["episodes"])
        self.critic.resumed()
        self.run_id = self.run_id or meta.get("wandb_run_id")
        self.last_checkpoint = checkpoint
        if self.acc.is_main_process:
            self.callback.on_resume(truncate_history(self.output_dir, self.update))
        log.info("resumed PPO from %s (update %d/%d)", checkpoint, self.update, self.num_updates)
        return True
