"""Step 6 of an update: num_ppo_epochs x num_mini_batches clipped gradient steps of the policy and the critic.

Each minibatch is one optimizer step. With ppo.micro_batch_size its forward/backward runs a micro-batch at a time,
each loss weighted by its share of the minibatch's action tokens, so the accumulated gradient (and every stat) is the
whole minibatch's masked mean: the same step in bounded memory.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from rlhf.ppo.batch import Batch
from rlhf.ppo.critic import Critic, Plan
from rlhf.ppo.distributed import check_finite, mean, no_sync
from rlhf.ppo.kl import logprob_mismatch
from rlhf.ppo.losses import ppo_loss
from rlhf.ppo.rollout import response_logprobs

LOSS_ADVICE = "lower ppo.learning_rate or check rewards"


def micro_batches(action_mask: torch.Tensor, size: int | None) -> list[tuple[slice, torch.Tensor]]:
    """A minibatch's micro-batches ((b, R) action mask): slices of `size` episodes (None: all of them) and the weight
    of each, its share of the minibatch's action tokens."""
    total = action_mask.sum().clamp(min=1)
    size = size or len(action_mask)
    return [
        (slice(s, s + size), action_mask[s : s + size].sum() / total)
        for s in range(0, len(action_mask), size)
    ]


class Optimiser:
    """The policy's optimisation (and through `critic` the critic's) on the batches of successive updates.

    policy: the prepared policy; head: its LM head for the chunked log-probabilities (`rollout.output_head`; None
    scores from full logits); p: any object with `PPOConfig`'s fields.
    """

    def __init__(
        self,
        acc: Accelerator,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        head: nn.Linear | None,
        critic: Critic,
        p,
    ) -> None:
        self.acc = acc
        self.policy = policy
        self.optimizer = optimizer
        self.head = head
        self.critic = critic
        self.p = p

    def optimise(self, batch: Batch, kl_coef: float, update: int) -> dict[str, list[torch.Tensor]]:
        """Every epoch's shuffled minibatches, stopping early above target_kl; each stat's values, one per step.
        `update` (1-based) names the update in errors."""
        p = self.p
        size = len(batch) // p.num_mini_batches
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for epoch in range(p.num_ppo_epochs):
            order = torch.randperm(len(batch)).to(batch.query_responses.device)
            plan: Plan = [
                (idx, micro_batches(batch.action_mask[idx], p.micro_batch_size))
                for idx in (order[start : start + size] for start in range(0, len(batch), size))
            ]
            self.critic.start_epoch(plan)  # a critic in its own process takes the epoch's steps beside these
            epoch_kl = []
            for i, (idx, parts) in enumerate(plan):
                mb = self.minibatch_step(
                    batch.select(idx), parts, kl_coef, update, first=epoch == 0 and i == 0
                )
                for name, value in mb.items():
                    stats[name].append(value)
                epoch_kl.append(mb["policy/approxkl_avg"])
            for mb in self.critic.finish_epoch():  # each minibatch's, in order
                if "nonfinite" in mb:
                    check_finite(self.acc, "loss", mb["nonfinite"], LOSS_ADVICE, update)
                for name, value in mb.items():
                    stats[name].append(value)
            if p.target_kl is not None and mean(self.acc, torch.stack(epoch_kl).mean()) > p.target_kl:
                stats["policy/early_stop"].append(torch.ones(()))
                break
        stats.setdefault("policy/early_stop", [torch.zeros(())])
        return stats

    def minibatch_step(
        self,
        mb: Batch,
        parts: list[tuple[slice, torch.Tensor]],
        kl_coef: float,
        update: int,
        first: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One gradient step on the minibatch `mb`, a micro-batch `parts` at a time; its stats. The update's `first`
        minibatch, seen before any step, also measures the sampler's mismatch."""
        stats: dict[str, torch.Tensor] = {}
        for k, (part, weight) in enumerate(parts):
            # gradients are all-reduced once, in the minibatch's last backward
            with nullcontext() if k == len(parts) - 1 else no_sync(self.acc, self.policy, self.critic.module):
                loss, out = self.loss(mb.select(part), kl_coef, first)
                # every process checks before the backward's gradient all-reduce, so a NaN on one stops all of them
                check_finite(self.acc, "loss", loss, LOSS_ADVICE, update)
                self.acc.backward(loss * weight)
            for name, value in out.items():
                stats[name] = stats.get(name, 0.0) + value * weight
        self.acc.clip_grad_norm_(self.policy.parameters(), self.p.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.critic.step()
        return stats

    def loss(
        self, part: Batch, kl_coef: float, mismatch: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`losses.ppo_loss` of the episodes `part` and its stats; with `mismatch` (no step taken yet) also how far the
        sampler's log-probabilities are from this forward's."""
        p = self.p
        with self.acc.autocast():  # low-precision forward under mixed precision; float32 weights
            logprobs, entropy = response_logprobs(
                self.policy,
                part.query_responses,
                part.attention_mask,
                part.context_length,
                p.temperature,
                self.head,
            )  # (b, R), (b, R) float32
        loss, out = ppo_loss(
            logprobs,
            entropy,
            part.logprobs,
            part.advantages,
            part.action_mask,
            cliprange=p.cliprange,
            ent_coef=p.ent_coef,
            ref_logprobs=part.ref_logprobs if p.kl_in == "loss" else None,
            kl_coef=kl_coef,
            kl_estimator=p.kl_estimator,
            values=self.critic.predict(part),  # None when no critic trains here
            old_values=part.values,
            returns=part.returns,
            cliprange_value=p.cliprange_value,
            vf_coef=p.vf_coef,
        )
        if mismatch:
            out["rollout/logprob_mismatch"], out["rollout/logprob_mismatch_kl"] = logprob_mismatch(
                part.logprobs, logprobs, part.action_mask
            )
        return loss, out
