"""PPO against text environments on `accelerate`: rollout -> score -> advantages -> minibatch epochs.

One update (`PPOTrainer.step`) reads like the algorithm:

    1. rollout    each process plays batch_size / num_processes episodes with the current policy
    2. score      the rubric's weighted components (environment reward, reward-model score, ...; `rlhf.rewards`),
                  minus the missing-EOS penalty
    3. ref + V    reference log-probabilities and the critic's values of the same tokens
    4. rewards    per token: score - kl_coef * kl (ppo.kl_in=reward), or the score alone (kl_in=loss)
    5. advantages GAE with the critic, or group baselines (GRPO / RLOO) of the scores over num_generations samples
                  per prompt, plus the per-token KL penalty
    6. optimise   num_ppo_epochs x num_mini_batches of clipped policy and value losses (+ kl_coef * KL with
                  kl_in=loss), clipped gradients

With ppo.critic_process the critic's passes and steps (3 and 6) run in a second process beside the policy's
(`critic_process`); call `close()` when done (the PPO stage does).

The math lives in `ops`, `advantages`, `kl` and `losses` (pure tensor functions); this module only wires it.
No Hydra and no W&B here: `config` is any object with `PPOConfig`'s fields and `tracker` anything with
`log(metrics, step, console)` and `log_table(key, columns, rows, step)` (`rlhf.tracking.wandb_run.StageTracker`).

Dropout is left off (models stay in eval mode), as in TRL: the rollout's log-probabilities must be those the
update recomputes, so the first PPO ratio is 1 (up to float rounding: the rollout's come from the KV-cached sampler).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import gymnasium
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn

from rlhf.models.lora import check_adapters, merge_lora, merged_state_dict
from rlhf.models.tokenizer import stop_token_ids
from rlhf.ppo.advantages import gae, group_token_advantages
from rlhf.ppo.checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from rlhf.ppo.config import check_ppo
from rlhf.ppo.critic_process import CriticProcess, critic_micro_loss, critic_values
from rlhf.ppo.kl import kl_penalty, logprob_mismatch, make_kl_controller
from rlhf.ppo.losses import kl_loss, policy_loss
from rlhf.ppo.ops import (
    last_true_index,
    masked_mean,
    masked_whiten,
)
from rlhf.ppo.rollout import (
    EnvFailure,
    Rollout,
    output_head,
    position_ids,
    response_logprobs,
    rollout,
    sequence_logprobs,
)
from rlhf.ppo.sharding import full_state_dict, gathered, shard_frozen
from rlhf.rewards import Component, Episodes, build_rubric, component_values, describe, needs_reward_model
from rlhf.rewards import token_scores as rubric_token_scores
from rlhf.rewards.reward_model import RewardScorer
from rlhf.tracking.console import ppo_line, progress

log = logging.getLogger(__name__)

SEED_SPACE = 2**31
"""Training episodes use seeds in [0, 2**31); evaluation uses EVAL_SEED_OFFSET + i, so they never overlap."""
EVAL_SEED_OFFSET = 2**31


def train_episode_seed(seed: int, index: int) -> int:
    """Seed of the index-th training prompt of a run seeded `seed` (disjoint from evaluation seeds)."""
    return (seed * 1_000_003 + index) % SEED_SPACE


class ValueHead(nn.Module):
    """Per-token scalars from a sequence-classification model: its backbone's hidden states through its head.

    The critic (values of every prefix) and the reward model (the score at the last real token) both use it.
    A module of its own so that DDP sees one forward for the critic's gradients.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, L) float32 values."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        backbone = getattr(base, base.base_model_prefix)
        head = getattr(base, "score", None) or getattr(base, "classifier", None)
        if head is None:
            raise ValueError(
                f"{type(base).__name__} has no `score` head; use an AutoModelForSequenceClassification"
            )
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        return head(hidden).squeeze(-1).float()  # (B, L)


class RunningMoments:
    """Running mean and std of episode scores (for `normalize_scores`); checkpointed with the trainer."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        n = x.numel()
        if n == 0:
            return
        mean, var = x.double().mean().item(), x.double().var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-8))

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


class PPOTrainer:
    """PPO (or GRPO/RLOO-style critic-free PPO) of a causal LM against Gymnasium text environments."""

    def __init__(
        self,
        config: Any,
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
        tracker: Any = None,
        run_id: str | None = None,
        stage_key: str | None = None,
        rubric: list[Component] | None = None,
    ) -> None:
        """policy: causal LM (a peft model with LoRA); ref_policy: frozen reference (None with LoRA: the policy with
        its adapters disabled); reward_model, critic: AutoModelForSequenceClassification; make_env: builds one env.
        reward_tokenizer: the reward model's tokenizer when it differs from the policy's (scored on the decoded text).
        stage_key: the pipeline's key of this stage (`rlhf.run.stage_keys`): stored in every checkpoint, and only a
        checkpoint of the same key is resumed (None: any).
        rubric: the score's components (`rlhf.rewards`); None builds the one of `config.reward_source`.
        """
        self.cfg = cfg = config
        self.acc = acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.tracker = tracker
        self.run_id = run_id
        self.seed = seed
        self.stage_key = stage_key
        check_ppo(cfg, acc.num_processes)
        self.rubric = rubric
        if rubric is None:
            self.rubric = build_rubric({}, cfg.reward_source, cfg.env_reward_weight, cfg.model_reward_weight)
        self._check_inputs(policy, ref_policy, reward_model, critic)
        self.local_batch_size = cfg.batch_size // acc.num_processes
        self.mini_batch_size = self.local_batch_size // cfg.num_mini_batches
        self.num_updates = cfg.total_episodes // cfg.batch_size
        self.group_size = cfg.num_generations if cfg.advantage in ("grpo", "rloo") else 1
        # the EOS and every id of the policy's generation_config.eos_token_id (Qwen2.5: <|im_end|>, <|endoftext|>)
        self.stop_token_ids = stop_token_ids(
            tokenizer, cfg.stop_token, getattr(policy, "generation_config", None)
        )
        set_seed(seed + acc.process_index)

        # models: the policy (and critic) train, their weights and optimizer state in float32 (low precision only in
        # the forward, under the accelerator's autocast); reference and reward model are frozen
        device = acc.device
        policy.eval()
        self._upcast_trainable(policy, "policy")
        policy_opt = self._adamw(policy, cfg.learning_rate)
        self.policy_sched = torch.optim.lr_scheduler.LambdaLR(policy_opt, self._lr_lambda)
        self.policy, self.policy_opt = acc.prepare(policy, policy_opt)
        self.value_model = self.critic_opt = self.critic_sched = None
        if critic is not None and cfg.advantage == "gae":
            critic.eval()
            self._upcast_trainable(critic, "critic")
            value_model = ValueHead(critic)
            lr = cfg.critic_learning_rate or cfg.learning_rate
            critic_opt = self._adamw(value_model, lr)
            self.critic_sched = torch.optim.lr_scheduler.LambdaLR(critic_opt, self._lr_lambda)
            self.value_model, self.critic_opt = acc.prepare(value_model, critic_opt)
        self.critic = critic if self.value_model is not None else None
        self.critic_process = self._start_critic_process() if self.value_model is not None else None
        # the policy's LM head, applied a chunk of tokens at a time in the update (`rollout.response_logprobs`);
        # None scores from full logits: FSDP shards the head's weight outside the forward
        self.policy_head = (
            None if acc.distributed_type == DistributedType.FSDP else output_head(self.unwrapped_policy)
        )
        self.ref_policy = self._freeze(ref_policy, device)
        self.reward_scorer = None
        if reward_model is not None:
            self.reward_scorer = RewardScorer(
                self._freeze(reward_model, device),
                reward_tokenizer or tokenizer,
                tokenizer,
                cfg.forward_batch_size,
            )
        self.kl_ctl = make_kl_controller(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
        self.score_moments = RunningMoments()
        for obj in (self.policy_sched, self.critic_sched, self.kl_ctl, self.score_moments):
            if obj is not None:
                acc.register_for_checkpointing(obj)

        self.envs = [make_env() for _ in range(self.local_batch_size)]
        self.update = 0
        self.episodes = 0
        self._start_time, self._start_episodes = time.perf_counter(), 0
        self.last_checkpoint: Path | None = None
        self.history_path = self.output_dir / "history.jsonl"

    # ------------------------------------------------------------------ setup
    def _check_inputs(self, policy, ref_policy, reward_model, critic) -> None:
        """The models passed in fit the config (the config itself is checked by `rlhf.run.validation.check_ppo`)."""
        cfg = self.cfg
        if needs_reward_model(self.rubric) and reward_model is None:
            raise ValueError(
                f"the reward {describe(self.rubric)} (ppo.reward_source={cfg.reward_source}) needs a reward model "
                "(ppo.reward_model_path)"
            )
        if cfg.advantage == "gae" and critic is None:
            raise ValueError("ppo.advantage=gae needs a critic; pass one or use ppo.advantage=grpo|rloo")
        if ref_policy is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("no reference policy: pass one, or train LoRA adapters (model.lora.r > 0)")
        if getattr(self.acc, "scaler", None) is not None and cfg.advantage == "gae" and critic is not None:
            raise ValueError(
                "float16 mixed precision (model.dtype=float16) scales the loss for one optimizer at a time and "
                "would mis-scale the critic's; use model.dtype=bfloat16 or float32, or ppo.advantage=grpo|rloo"
            )
        # adapters the sampler and the export cannot handle (aLoRA; LoRA variants merged from FSDP's state dict)
        for model in (policy, critic):
            if model is not None:
                check_adapters(model, sharded=self.acc.distributed_type == DistributedType.FSDP)

    def _start_critic_process(self) -> CriticProcess | None:
        """With ppo.critic_process, the worker that trains the critic. It gets half of this process's CPU threads (at
        least one), and this process gives them up while the worker runs (`_sharing_threads`)."""
        if not self.cfg.critic_process:
            return None
        if self.acc.device.type != "cpu":
            raise ValueError(
                f"ppo.critic_process overlaps the critic with the policy on CPU cores; on {self.acc.device.type} "
                "set ppo.critic_process=false"
            )
        threads = torch.get_num_threads()
        worker_threads = max(1, threads // 2)
        self._threads_shared = max(1, threads - worker_threads)
        log.info(
            "[ppo] critic in its own process: %d CPU thread(s) there, %d here while it runs (%d otherwise)",
            worker_threads,
            self._threads_shared,
            threads,
        )
        mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.acc.mixed_precision))
        return CriticProcess(
            self.value_model,
            self.critic_opt.optimizer,
            threads=worker_threads,
            cliprange_value=self.cfg.cliprange_value,
            max_grad_norm=self.cfg.max_grad_norm,
            forward_batch_size=self.cfg.forward_batch_size,
            autocast_dtype=mixed,
        )

    def close(self) -> None:
        """Stop the critic process, if any (the models stay usable)."""
        if self.critic_process is not None:
            self.critic_process.close()
            self.critic_process = None

    @contextlib.contextmanager
    def _sharing_threads(self):
        """This process's CPU threads cut to its share while the critic process works beside it (the scoring and the
        update); the rollout, where the worker idles, keeps them all."""
        if self.critic_process is None:
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(self._threads_shared)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _adamw(self, model: nn.Module, lr: float) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; the fused kernel (one op per step, not ~10 per tensor) on CPU/CUDA."""
        params = [p for p in model.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params) or None
        return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=self.cfg.weight_decay, fused=fused)

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """Gradients accumulate locally (no all-reduce) in this backward: every micro-batch of a minibatch but the
        last."""
        stack = contextlib.ExitStack()
        if self.acc.num_processes > 1:
            for model in (self.policy, self.value_model):
                if model is not None:
                    stack.enter_context(self.acc.no_sync(model))
        return stack

    def _lr_lambda(self, update: int) -> float:
        """Linear decay to 0 over the run, stepped once per update."""
        return max(0.0, 1.0 - update / self.num_updates)

    @staticmethod
    def _upcast_trainable(model: nn.Module, name: str) -> None:
        """Trainable float16/bfloat16 parameters -> float32, in place (frozen ones, e.g. a LoRA base, stay low).

        bf16 keeps 8 significant bits: an AdamW step of ~lr (1e-5) on a weight of ~0.02 rounds away. Training
        keeps float32 master weights and optimizer state; the accelerator's autocast runs the forward in low
        precision (Accelerator(mixed_precision="bf16"|"fp16")).
        """
        low = [
            p for p in model.parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)
        ]
        if low:
            log.info("%s: %d trainable low-precision tensors kept in float32 for training", name, len(low))
            for p in low:
                p.data = p.data.float()

    def _freeze(self, model: nn.Module | None, device: torch.device) -> nn.Module | None:
        """A frozen model (reference, reward model) on the device, in eval mode; under FSDP2 sharded like the trained
        ones (`sharding.shard_frozen`)."""
        if model is None:
            return None
        model.to(device).eval()
        model.requires_grad_(False)
        return shard_frozen(self.acc, model)

    @property
    def unwrapped_policy(self) -> nn.Module:
        return self.acc.unwrap_model(self.policy)

    @property
    def unwrapped_critic(self) -> nn.Module | None:
        return None if self.value_model is None else self.acc.unwrap_model(self.value_model).model

    # ------------------------------------------------------------------ the loop
    def train(self, max_updates: int | None = None) -> dict[str, float]:
        """Run updates until total_episodes (or `max_updates` more); resume from the last checkpoint first.

        Returns the last update's metrics.
        """
        if self.update == 0 and not (self.cfg.resume and self.resume()):
            self._start_over()
        stop = self.num_updates if max_updates is None else min(self.num_updates, self.update + max_updates)
        bar = progress(
            "ppo",
            total=self.num_updates,
            initial=self.update,
            unit="update",
            disable=not self.acc.is_main_process,
        )
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
            self._record(metrics, ro)
            bar.update(1)
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            save_every = self.cfg.save_every
            if self.update == self.num_updates or (save_every > 0 and self.update % save_every == 0):
                self.save()
        bar.close()
        return metrics

    def step(self) -> tuple[dict[str, float], Rollout]:
        """One PPO update on a fresh batch of episodes. Returns the update's metrics and its rollout."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # 1. rollout: this process's share of the batch, the policy's own tokens kept (token-in/token-out)
        ro = self._rollout()
        mask = ro.action_mask  # (B, R)
        t1 = time.perf_counter()
        if self.critic_process is not None:  # values computed there while this process scores
            self.critic_process.start_values(
                ro.query_responses, ro.attention_mask, ro.action_mask, ro.context_length
            )
        # 2. score: the rubric's weighted components per token (env rewards at turn ends, the others at the last
        #    token); components: {name: (B,)} unweighted, for the metrics
        with self._sharing_threads():
            token_scores, scores, model_scores, components = self._score(ro)  # (B, R), (B,), (B,) | None
            # 3. reference log-probabilities and values of the sampled tokens
            ref_logprobs = self._ref_logprobs(ro)  # (B, R)
            values = self._values(ro)  # (B, R)
        t2 = time.perf_counter()
        # 4. rewards = score - kl_coef * kl, per token (ppo.kl_in=reward); with kl_in=loss the score alone, and
        #    kl_coef * KL is a term of the policy loss (step 6)
        kl = torch.where(mask, kl_penalty(ro.logprobs, ref_logprobs, cfg.kl_estimator), 0.0)  # (B, R)
        non_score_reward = -self.kl_ctl.value * kl  # (B, R)
        kl_reward = non_score_reward if cfg.kl_in == "reward" else torch.zeros_like(kl)  # (B, R)
        self._check_finite(
            "rewards",
            token_scores.sum() + kl_reward.sum(),
            "check the environment's rewards, the reward model and the reference's log-probabilities",
        )
        # 5. advantages and returns: GAE over score + KL rewards, or the group advantage of the scores plus the
        #    per-token KL penalty (not divided by the group's std)
        advantages, returns = self._advantages(token_scores, kl_reward, values, mask)  # (B, R), (B, R)
        if self.critic_process is not None:
            self.critic_process.set_targets(values, returns)
        # 6. num_ppo_epochs x num_mini_batches: clipped policy loss (+ KL with kl_in=loss), clipped value loss,
        #    clipped gradients, step
        with self._sharing_threads():
            stats = self._optimize(ro, advantages, returns, values, ref_logprobs)
        t3 = time.perf_counter()

        k1 = torch.where(mask, ro.logprobs - ref_logprobs, 0.0).sum(1)  # (B,) sequence KL, TRL's objective/kl
        self.kl_ctl.update(self._mean(k1.mean()), cfg.batch_size)
        self.policy_sched.step()
        if self.critic_sched is not None:
            with warnings.catch_warnings():
                # with a critic process the worker steps the shared state; this optimizer only schedules it
                if self.critic_process is not None:
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
                self.critic_sched.step()
        self.episodes += cfg.batch_size
        # metrics: (sum, count) per name, so the reduced value is the mean over every process's episodes
        n = len(ro)
        local = {
            "objective/kl": (k1.sum(), n),
            "objective/entropy": ((-ro.logprobs).sum(), n),
            "objective/non_score_reward": (non_score_reward.sum(), n),  # -kl_coef * KL (reward or loss)
            "objective/rlhf_reward": (scores.sum() + non_score_reward.sum(), n),
            "objective/scores": (scores.sum(), n),
            "env/gold": (ro.env_rewards.sum(), n),
            "val/num_eos_tokens": (ro.ended_with_eos.sum(), n),
            "rollout/response_length": (ro.response_lengths.sum(), n),
            "rollout/turns": (ro.num_turns.sum(), n),
        }
        if model_scores is not None:
            local["reward/model_score"] = (model_scores.sum(), n)
        for name, values_ in components.items():  # every component, weight 0 included
            local[f"reward/{name}"] = (values_.sum(), n)
        # over the episodes that report it, on any process (absent only when none anywhere does)
        success = [float(info["success"]) for info in ro.infos if "success" in info]
        local["env/success_rate"] = (torch.tensor(sum(success)), len(success))
        for name, values_ in stats.items():
            local[name] = (torch.stack([v.to(mask.device) for v in values_]).sum(), len(values_))
        metrics = self._gather_mean(local)
        elapsed = time.perf_counter() - self._start_time
        generated = self._mean(ro.response_lengths.float().sum()) * self.acc.num_processes
        metrics.update(
            {
                "objective/kl_coef": self.kl_ctl.value,
                "lr": self.policy_sched.get_last_lr()[0],
                "episode": self.episodes,
                "eps": (self.episodes - self._start_episodes) / max(elapsed, 1e-9),
                "time/rollout": t1 - t0,
                "time/score": t2 - t1,
                "time/update": t3 - t2,
                "tokens_per_second": generated / max(t1 - t0, 1e-9),
            }
        )
        return metrics, ro

    # ------------------------------------------------------------------ 1. rollout
    def _rollout(self) -> Rollout:
        """Episode seeds follow the global episode index: process r plays [r * B_local, (r + 1) * B_local)."""
        first = self.episodes + self.acc.process_index * self.local_batch_size
        prompt_index = [(first + j) // self.group_size for j in range(self.local_batch_size)]
        seeds = [train_episode_seed(self.seed, i) for i in prompt_index]
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

    # ------------------------------------------------------------------ 2. score
    @torch.no_grad()
    def _score(
        self, ro: Rollout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Token scores (B, R) on action tokens, their per-episode sums (B,), the raw reward-model scores (B,) (None
        without a reward model) and every rubric component's values {name: (B,)}, weight 0 included."""
        cfg = self.cfg
        mask = ro.action_mask
        model_scores = None
        if self.reward_scorer is not None:
            model_scores = self.reward_scorer.score(ro)  # (B,) as the reward stage scored its pairs
            if not torch.isfinite(model_scores).all():
                raise ValueError(
                    "the reward model returned NaN/inf scores; check the reward model (training stopped)"
                )
        episodes = Episodes(
            prompts=ro.queries,
            completions=["\n".join(replies) for replies in ro.replies],
            infos=ro.infos,
            env_rewards=ro.env_rewards,
            lengths=ro.response_lengths,
            model_scores=model_scores,
        )
        components = component_values(self.rubric, episodes)  # {name: (B,)}
        last = last_true_index(mask)  # (B,) the episode's last policy token
        token_scores = rubric_token_scores(self.rubric, components, ro.turn_rewards, last)  # (B, R)
        if cfg.missing_eos_penalty is not None and self.stop_token_ids:  # a turn that ended on no stop id
            token_scores -= cfg.missing_eos_penalty * (ro.turn_ends & ~ro.turn_eos).float()
        if cfg.normalize_scores:
            scores = token_scores.sum(1)
            self.score_moments.update(self.acc.gather(scores))
            token_scores = token_scores / self.score_moments.std
            token_scores[torch.arange(len(ro)), last] -= self.score_moments.mean / self.score_moments.std
        return token_scores, token_scores.sum(1), model_scores, components

    # ------------------------------------------------------------------ 3. reference and values
    @torch.no_grad()
    def _ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        """Log-probabilities under the frozen reference; with LoRA, the policy with its adapters disabled."""
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

    @torch.no_grad()
    def _values(self, ro: Rollout) -> torch.Tensor:
        """V(s_t) for each response token t: the critic's output at the position that predicts it. (B, R)."""
        if self.value_model is None:
            return torch.zeros_like(ro.logprobs)
        if self.critic_process is not None:
            return self.critic_process.result()  # asked for after the rollout
        with gathered(self.acc, self.value_model) as critic:  # FSDP: whole weights
            return critic_values(
                critic,
                ro.query_responses,
                ro.attention_mask,
                ro.action_mask,
                ro.context_length,
                self.cfg.forward_batch_size,
                nullcontext(),  # the prepared model's forward autocasts under mixed precision
            )

    # ------------------------------------------------------------------ 5. advantages
    def _advantages(
        self, token_scores: torch.Tensor, kl_reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """token_scores, kl_reward (-kl_coef * kl, or 0 with kl_in=loss), values, mask: (B, R) -> advantages,
        returns: (B, R)."""
        cfg = self.cfg
        if cfg.advantage == "gae":
            rewards = token_scores + kl_reward  # (B, R), zero off the action tokens
            if cfg.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
            return advantages, returns
        # GRPO / RLOO: the group advantage of each episode's score on its action tokens, plus the token's KL penalty
        advantages = group_token_advantages(
            token_scores.sum(1), mask, self.group_size, cfg.advantage, token_rewards=kl_reward
        )  # (B, R)
        return advantages, torch.zeros_like(advantages)

    # ------------------------------------------------------------------ 6. optimise
    def _optimize(
        self,
        ro: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        values: torch.Tensor,
        ref_logprobs: torch.Tensor,
    ) -> dict[str, list[torch.Tensor]]:
        """num_ppo_epochs passes of num_mini_batches shuffled minibatches; stops early above target_kl."""
        cfg = self.cfg
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for epoch in range(cfg.num_ppo_epochs):
            order = torch.randperm(self.local_batch_size).to(ro.query_ids.device)
            minibatches = [
                order[start : start + self.mini_batch_size]
                for start in range(0, self.local_batch_size, self.mini_batch_size)
            ]
            # the critic's steps of the epoch run in its process, beside the policy's below
            if self.critic_process is not None:
                plan = [
                    [(idx[part].tolist(), w.item()) for part, w in self._micro_parts(ro, idx)]
                    for idx in minibatches
                ]
                self.critic_process.start_steps(plan, cfg.vf_coef)
            epoch_kl = []
            for i, idx in enumerate(minibatches):
                first = epoch == 0 and i == 0
                mb = self._minibatch_step(
                    ro, idx, advantages[idx], returns[idx], values[idx], ref_logprobs[idx], first
                )
                for name, value in mb.items():
                    stats[name].append(value)
                epoch_kl.append(mb["policy/approxkl_avg"])
            if self.critic_process is not None:
                for mb in self.critic_process.finish_steps():  # each minibatch's, in order
                    if "nonfinite" in mb:
                        self._check_finite(
                            "loss", mb["nonfinite"], "lower ppo.learning_rate or check rewards"
                        )
                    for name, value in mb.items():
                        stats[name].append(value)
            if cfg.target_kl is not None and self._mean(torch.stack(epoch_kl).mean()) > cfg.target_kl:
                stats["policy/early_stop"].append(torch.ones(()))
                break
        stats.setdefault("policy/early_stop", [torch.zeros(())])
        return stats

    def _minibatch_step(
        self,
        ro: Rollout,
        idx: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        old_values: torch.Tensor,
        ref_logprobs: torch.Tensor,
        first: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One gradient step of the policy (and the in-process critic) on the episodes `idx`; tensors (b, R). Returns
        its stats; the update's `first` minibatch, seen before any step, also measures the sampler's mismatch.

        With ppo.micro_batch_size the minibatch's forward/backward runs a micro-batch at a time, each loss weighted
        by its share of the minibatch's action tokens, so the accumulated gradient (and every stat) is the whole
        minibatch's masked mean: the same step in bounded memory.
        """
        cfg = self.cfg
        stats: dict[str, torch.Tensor] = {}
        parts = self._micro_parts(ro, idx)
        for k, (part, weight) in enumerate(parts):
            # gradients are all-reduced once, in the minibatch's last backward
            with nullcontext() if k == len(parts) - 1 else self._no_sync():
                loss, out = self._micro_loss(
                    ro,
                    idx[part],
                    advantages[part],
                    returns[part],
                    old_values[part],
                    ref_logprobs[part],
                    first,
                )
                # every process checks before the backward's gradient all-reduce, so a NaN on one stops all of them
                self._check_finite("loss", loss, "lower ppo.learning_rate or check rewards")
                self.acc.backward(loss * weight)
            for name, value in out.items():
                stats[name] = stats.get(name, 0.0) + value * weight
        self.acc.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
        self.policy_opt.step()
        self.policy_opt.zero_grad(set_to_none=True)
        if self.value_model is not None and self.critic_process is None:
            self.acc.clip_grad_norm_(self.value_model.parameters(), cfg.max_grad_norm)
            self.critic_opt.step()
            self.critic_opt.zero_grad(set_to_none=True)
        return stats

    def _micro_parts(self, ro: Rollout, idx: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
        """The micro-batches of minibatch `idx` (ppo.micro_batch_size episodes each, or the whole minibatch) and the
        weight of each: its share of the minibatch's action tokens."""
        mask = ro.action_mask[idx]  # (b, R)
        total = mask.sum().clamp(min=1)
        size = self.cfg.micro_batch_size or len(idx)
        return [(slice(s, s + size), mask[s : s + size].sum() / total) for s in range(0, len(idx), size)]

    def _micro_loss(
        self,
        ro: Rollout,
        idx: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        old_values: torch.Tensor,
        ref_logprobs: torch.Tensor,
        mismatch: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The PPO loss of the episodes `idx` (masked means over their action tokens) and its detached stats; with
        `mismatch` (no step taken yet) also how far the sampler's log-probabilities are from this forward's."""
        cfg = self.cfg
        Q = ro.context_length
        query_responses, attention_mask = ro.query_responses[idx], ro.attention_mask[idx]
        mask = ro.action_mask[idx]  # (b, R)
        with self.acc.autocast():  # low-precision forward under mixed precision; float32 weights
            logprobs, entropy = response_logprobs(
                self.policy, query_responses, attention_mask, Q, cfg.temperature, self.policy_head
            )  # (b, R), (b, R) float32
        pg_loss, pg_stats = policy_loss(logprobs, ro.logprobs[idx], advantages, mask, cfg.cliprange)
        entropy_avg = masked_mean(entropy if cfg.ent_coef else entropy.detach(), mask)
        loss = pg_loss - cfg.ent_coef * entropy_avg if cfg.ent_coef else pg_loss
        out = {
            "loss/policy_avg": pg_loss.detach(),
            "policy/approxkl_avg": pg_stats["approxkl"],
            "policy/clipfrac_avg": pg_stats["clipfrac"],
            "policy/entropy_avg": entropy_avg.detach(),
            "val/ratio": pg_stats["ratio"],
        }
        if mismatch:
            gap, gap_kl = logprob_mismatch(ro.logprobs[idx], logprobs, mask)
            out["rollout/logprob_mismatch"], out["rollout/logprob_mismatch_kl"] = gap, gap_kl
        if cfg.kl_in == "loss":  # GRPO's beta term: the KL to the reference of the current policy
            kl = kl_loss(logprobs, ref_logprobs, mask, cfg.kl_estimator)
            loss = loss + self.kl_ctl.value * kl
            out["loss/kl_avg"] = kl.detach()
        if self.value_model is not None and self.critic_process is None:
            vf_loss, vf_stats = critic_micro_loss(
                self.value_model,
                query_responses,
                attention_mask,
                Q,
                old_values,
                returns,
                mask,
                cfg.cliprange_value,
                self.acc.autocast(),
            )
            loss = loss + cfg.vf_coef * vf_loss
            out.update(vf_stats)
        return loss, out

    # ------------------------------------------------------------------ metrics, logging, checkpoints
    def _mean(self, x: torch.Tensor) -> float:
        """Mean of a local scalar over processes."""
        return self.acc.reduce(x.detach().float().reshape(1), reduction="mean").item()

    def _gather_mean(
        self, local: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]
    ) -> dict[str, float]:
        """Global means from local (sum, count) pairs, in one collective: sum(sums) / sum(counts) over processes.

        Every process must pass the same names; a name whose count is 0 on every process is left out.
        """
        names = sorted(local)
        sums = [torch.as_tensor(local[k][0]).detach().double().reshape(()) for k in names]
        counts = [torch.as_tensor(local[k][1]).detach().double().reshape(()) for k in names]
        stacked = torch.stack([torch.stack(sums), torch.stack(counts)]).to(self.acc.device)  # (2, K)
        total_sum, total_count = self.acc.reduce(stacked, reduction="sum").tolist()
        return {k: s / c for k, s, c in zip(names, total_sum, total_count) if c > 0}

    def _check_finite(self, what: str, value: torch.Tensor, advice: str) -> None:
        """Raise the same FloatingPointError on every process when the local scalar `value` is NaN/inf on any.

        A collective (all processes call it at the same point): a process that raised alone would leave the others
        waiting in the next collective, e.g. DDP's gradient all-reduce in the backward.
        """
        values = self.acc.gather(value.detach().float().reshape(1).to(self.acc.device))  # (P,)
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise FloatingPointError(
                f"PPO {what} became {values[bad[0]].item()} at update {self.update + 1} "
                f"(process {bad[0]} of {values.numel()}); {advice}"
            )

    def _record(self, metrics: dict[str, float], ro: Rollout) -> None:
        """history.jsonl every update, a compact console line every console_every, the tracker (every metric)
        every log_every, a samples table every samples_every."""
        if not self.acc.is_main_process:
            return
        row = {"update": self.update, **metrics}
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._shown(self.update):
            log.info(ppo_line(metrics, self.update, self.num_updates))
        if self.tracker is None:
            return
        if self._tracked(self.update):
            self.tracker.log(metrics, step=self.update, console=False)
        if self.cfg.samples_every > 0 and (self.update % self.cfg.samples_every == 0 or self.update == 1):
            scores = ro.env_rewards.tolist()
            rows = [[self.update, q, t, s] for q, t, s in zip(ro.queries, ro.transcripts, scores)][:16]
            self.tracker.log_table(
                "samples", ["update", "query", "response", "env_reward"], rows, step=self.update
            )

    def save(self) -> Path:
        """Write an atomic checkpoint of everything needed to continue exactly (all processes call this)."""
        policy_state, critic_state = self._full_states()
        pretrained = {"policy": (self.unwrapped_policy, self.tokenizer, policy_state)}
        if self.value_model is not None:
            pretrained["critic"] = (self.unwrapped_critic, self.tokenizer, critic_state)
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

    def _full_states(self) -> tuple[dict | None, dict | None]:
        """Under FSDP the whole state dicts of the policy and the critic, gathered onto the main process (every
        process takes part); None for each otherwise (the model's own `state_dict` is whole)."""
        policy_state = full_state_dict(self.acc, self.policy)
        critic_state = None
        if self.value_model is not None:
            # ValueHead's keys: "model." + the critic's
            critic_state = full_state_dict(self.acc, self.value_model)
            if critic_state is not None:
                critic_state = {k.removeprefix("model."): v for k, v in critic_state.items()}
        return policy_state, critic_state

    def export(self, directory: str | Path) -> None:
        """The trained models as plain `save_pretrained` directories a user loads with `transformers` alone: the
        policy (LoRA merged) with its tokenizer at `directory`, the critic at `directory/critic`.

        Every process calls it: under FSDP the whole weights are gathered onto the main process first (the module's
        own parameters are shards) and merged from that state dict; otherwise peft merges the module in place, so
        call it once training is over.
        """
        directory = Path(directory)
        policy_state, critic_state = self._full_states()
        models = {directory: (self.unwrapped_policy, policy_state)}
        if self.value_model is not None:
            models[directory / "critic"] = (self.unwrapped_critic, critic_state)
        if self.acc.is_main_process:
            for path, (model, state) in models.items():
                if state is None:
                    merge_lora(model).save_pretrained(path)
                else:
                    base = model.get_base_model() if hasattr(model, "get_base_model") else model
                    base.save_pretrained(path, state_dict=merged_state_dict(model, state))
                self.tokenizer.save_pretrained(path)
        self.acc.wait_for_everyone()

    def _shown(self, update: int) -> bool:
        """Whether update `update` prints a console line (every console_every, the first and the last)."""
        every = self.cfg.console_every
        return every > 0 and (update % every == 0 or update in (1, self.num_updates))

    def _tracked(self, update: int) -> bool:
        """Whether update `update`'s metrics go to the tracker (every log_every, and the last)."""
        every = self.cfg.log_every
        return every > 0 and (update % every == 0 or update == self.num_updates)

    def _start_over(self) -> None:
        """A fresh start: no history rows and no checkpoints of an earlier run stay behind to be mistaken for ours."""
        if self.acc.is_main_process:
            self.history_path.unlink(missing_ok=True)
            shutil.rmtree(checkpoint_root(self.output_dir), ignore_errors=True)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the newest checkpoint in output_dir, if any (weights, optimizers, RNGs, counters).

        Only a whole checkpoint (its manifest verified) of this trainer's stage key is resumed. The history rows up
        to the checkpoint are replayed into the tracker, which writes only the steps its W&B run does not hold yet
        (a killed process may not have flushed them), so the run's history has every update exactly once.
        """
        checkpoint = resumable_checkpoint(self.output_dir, self.stage_key)
        if checkpoint is None:
            return False
        meta = load_checkpoint(self.acc, checkpoint)
        settings = (
            ("batch_size", self.cfg.batch_size),
            ("num_processes", self.acc.num_processes),
            ("mixed_precision", self.acc.mixed_precision),
        )
        for key, mine in settings:
            if meta.get(key, mine) != mine:  # checkpoints from before mixed_precision was recorded: no claim
                raise ValueError(
                    f"checkpoint {checkpoint} was written with {key}={meta.get(key)}, this run has {mine}; "
                    "use the same settings or set ppo.resume=false"
                )
        if meta.get("num_updates") != self.num_updates:
            log.warning(
                "resuming with %d updates in all (checkpoint: %s)", self.num_updates, meta.get("num_updates")
            )
        self.update, self.episodes = int(meta["update"]), int(meta["episodes"])
        if self.critic_process is not None:
            self.critic_process.share_optimizer_state()
        self.run_id = self.run_id or meta.get("wandb_run_id")
        self.last_checkpoint = checkpoint
        if self.acc.is_main_process and self.history_path.exists():
            # updates logged after the checkpoint are redone: drop them from the history
            rows = [json.loads(ln) for ln in self.history_path.read_text().splitlines() if ln.strip()]
            kept = [row for row in rows if row["update"] <= self.update]
            self.history_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
            if self.tracker is not None:
                for row in kept:
                    if self._tracked(row["update"]):
                        metrics = {k: v for k, v in row.items() if k != "update"}
                        self.tracker.log(metrics, step=row["update"], console=False)
        log.info("resumed PPO from %s (update %d/%d)", checkpoint, self.update, self.num_updates)
        return True
