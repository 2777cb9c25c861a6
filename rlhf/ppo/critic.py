"""The critic, behind one interface for its three modes: none (GRPO / RLOO), in this process, in a second process.

The trainer calls every method at its point of the update, whatever the mode; each mode does its part there:

    start_values(batch)   after the rollout       the worker starts its value pass (it overlaps the scoring)
    values(ro)            step 3                   V(s_t) of the response tokens, (B, R); zeros without a critic
    set_targets(...)      after step 5            the worker gets the update's old values and returns
    start_epoch(plan)     each epoch of step 6    the worker takes the epoch's steps beside the policy's
    predict(part)         each micro-batch        in-process: the values with grad, for the value term of the loss
    step()                each minibatch          in-process: clipped gradient step
    finish_epoch()        each epoch              the worker's stats of the epoch's minibatches
    schedule()            end of the update       the learning-rate decay

`model` is the critic (the sequence-classification model, unwrapped) and `module` the prepared `ValueHead` around
it (DDP / FSDP-wrapped), None without a critic.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from rlhf.ppo.batch import Batch
from rlhf.ppo.critic_process import CriticProcess
from rlhf.ppo.optim import adamw, linear_decay, upcast_trainable
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.sharding import full_state_dict, gathered
from rlhf.ppo.value_head import ValueHead, critic_values, predict_values

log = logging.getLogger(__name__)

Plan = list[tuple[torch.Tensor, list[tuple[slice, torch.Tensor]]]]
"""An epoch's minibatches in order: (episode indices, [(micro-batch slice, weight), ...]) each."""


class Critic:
    """No critic: values and returns stay 0 and nothing trains (GRPO / RLOO). The base of the two critics below."""

    module: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def model(self) -> nn.Module | None:
        return None

    def start_values(self, batch: Rollout) -> None:
        pass

    def values(self, ro: Rollout) -> torch.Tensor:
        return torch.zeros_like(ro.logprobs)

    def set_targets(self, values: torch.Tensor, returns: torch.Tensor) -> None:
        pass

    def start_epoch(self, plan: Plan) -> None:
        pass

    def predict(self, part: Batch) -> torch.Tensor | None:
        return None

    def step(self) -> None:
        pass

    def finish_epoch(self) -> list[dict[str, torch.Tensor]]:
        return []

    def schedule(self) -> None:
        pass

    def sharing_threads(self) -> contextlib.AbstractContextManager:
        """This process's CPU threads while the critic may work beside it (the scoring and the update)."""
        return nullcontext()

    def resumed(self) -> None:
        """Called once a checkpoint's state was loaded into `optimizer`."""

    def saved(self) -> dict[str, tuple[nn.Module, dict | None]]:
        """What checkpoints and the export save: {"critic": (model, whole state dict under FSDP or None)}, or {}.
        Every process calls it (under FSDP the state dict is gathered onto the main process)."""
        return {}

    def wait_ready(self) -> None:
        """Block until the critic can work (a worker process has started and answers); at once without one."""

    def close(self) -> None:
        pass


class LocalCritic(Critic):
    """The critic trained in this process: float32 weights, its own AdamW and decay, prepared by the accelerator
    (DDP / FSDP); its value loss is a term of the policy's, one backward for both."""

    def __init__(self, model: nn.Module, acc: Accelerator, p, num_updates: int) -> None:
        self.acc, self.p = acc, p
        model.eval()
        upcast_trainable(model, "critic")
        value_head = ValueHead(model)
        optimizer = adamw(value_head, p.critic_learning_rate or p.learning_rate, p.weight_decay)
        self.scheduler = linear_decay(optimizer, num_updates)
        self.module, self.optimizer = acc.prepare(value_head, optimizer)

    @property
    def model(self) -> nn.Module:
        return self.acc.unwrap_model(self.module).model

    @torch.no_grad()
    def values(self, ro: Rollout) -> torch.Tensor:
        with gathered(self.acc, self.module) as value_head:  # FSDP: whole weights
            return critic_values(
                value_head,
                ro.query_responses,
                ro.attention_mask,
                ro.action_mask,
                ro.context_length,
                self.p.forward_batch_size,
                nullcontext(),  # the prepared model's forward autocasts under mixed precision
            )

    def predict(self, part: Batch) -> torch.Tensor:
        return predict_values(
            self.module, part.query_responses, part.attention_mask, part.context_length, self.acc.autocast()
        )

    def step(self) -> None:
        self.acc.clip_grad_norm_(self.module.parameters(), self.p.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def schedule(self) -> None:
        self.scheduler.step()

    def saved(self) -> dict[str, tuple[nn.Module, dict | None]]:
        state = full_state_dict(self.acc, self.module)
        if state is not None:  # ValueHead's keys: "model." + the critic's
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return {"critic": (self.model, state)}


class ProcessCritic(LocalCritic):
    """`ppo.critic_process`: the critic's passes and steps run in a worker process (`critic_process.CriticProcess`)
    beside the policy's, on weights and optimizer state in shared memory that this process's optimizer also holds (its
    schedule, checkpoints and resume as in-process). The worker gets half of this process's CPU threads (at least
    one), and this process gives them up while the worker runs (`sharing_threads`)."""

    def __init__(self, model: nn.Module, acc: Accelerator, p, num_updates: int) -> None:
        if acc.device.type != "cpu":
            raise ValueError(
                f"ppo.critic_process overlaps the critic with the policy on CPU cores; on {acc.device.type} "
                "set ppo.critic_process=false"
            )
        super().__init__(model, acc, p, num_updates)
        threads = torch.get_num_threads()
        worker_threads = max(1, threads // 2)
        self.threads_here = max(1, threads - worker_threads)
        log.info(
            "[ppo] critic in its own process: %d CPU thread(s) there, %d here while it runs (%d otherwise)",
            worker_threads,
            self.threads_here,
            threads,
        )
        mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))
        self.worker: CriticProcess | None = CriticProcess(
            self.module,
            self.optimizer.optimizer,
            threads=worker_threads,
            cliprange_value=p.cliprange_value,
            max_grad_norm=p.max_grad_norm,
            forward_batch_size=p.forward_batch_size,
            autocast_dtype=mixed,
        )

    def start_values(self, ro: Rollout) -> None:
        self.worker.start_values(ro.query_responses, ro.attention_mask, ro.action_mask, ro.context_length)

    def values(self, ro: Rollout) -> torch.Tensor:
        return self.worker.result()  # asked for by start_values

    def set_targets(self, values: torch.Tensor, returns: torch.Tensor) -> None:
        self.worker.set_targets(values, returns)

    def start_epoch(self, plan: Plan) -> None:
        minibatches = [[(idx[part].tolist(), w.item()) for part, w in parts] for idx, parts in plan]
        self.worker.start_steps(minibatches, self.p.vf_coef)

    def predict(self, part: Batch) -> None:
        return None  # the worker computes the value loss

    def step(self) -> None:
        pass  # the worker steps

    def finish_epoch(self) -> list[dict[str, torch.Tensor]]:
        return self.worker.finish_steps()

    def schedule(self) -> None:
        with warnings.catch_warnings():
            # the worker steps the shared state; this optimizer only schedules it
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()

    @contextlib.contextmanager
    def sharing_threads(self):
        """This process's threads cut to its share while the worker works beside it (the scoring and the update);
        the rollout, where the worker idles, keeps them all."""
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads_here)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def resumed(self) -> None:
        self.worker.share_optimizer_state()

    def wait_ready(self) -> None:
        self.worker.wait_ready()

    def close(self) -> None:
        """Stop the worker (the models stay usable)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def make_critic(model: nn.Module | None, acc: Accelerator, p, num_updates: int) -> Critic:
    """The critic of the settings `p` (any object with `PPOConfig`'s fields): none without a model or with group
    advantages, else in this process or (ppo.critic_process) in a worker."""
    if model is None or p.advantage != "gae":
        return Critic()
    return (ProcessCritic if p.critic_process else LocalCritic)(model, acc, p, num_updates)
