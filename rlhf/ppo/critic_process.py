"""The critic's forward and backward passes in a process of their own, in parallel with the policy's (`ppo.critic_process`).

On a CPU the policy's and the critic's passes are small ops that each keep one core busy with per-op work; two
threads of one process barely overlap them (the GIL), two processes do. The split is the one OpenRLHF makes across
GPUs (actor and critic on workers of their own), at the level where it pays on one machine:

- the critic's parameters and gradients live in shared memory. The worker reads the weights and accumulates the
  gradients of the value loss into the shared `.grad` tensors;
- the main process keeps everything else: the critic's optimizer, its clipping, learning-rate schedule and
  checkpoints, exactly as without the worker. So a run with and without it takes the same steps (bit for bit at one
  thread each) and resumes from the same checkpoints;
- per update the worker gets the rollout once (and computes its values while the main process scores it and runs the
  reference); per minibatch only the episode indices travel.

Single-process runs only: under DDP/FSDP the critic's gradients are all-reduced by its prepared module.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import types

import torch
import torch.multiprocessing as mp
from torch import nn

from rlhf.ppo.losses import value_loss


def critic_micro_loss(
    value_model: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None,
    autocast: contextlib.AbstractContextManager,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped value loss of some episodes ((b, Q + R) ids and mask; (b, R) old values, returns, action mask)
    and its detached stats: what the trainer adds to the policy loss, in-process or in the worker."""
    with autocast:
        vpred = value_model(query_responses, attention_mask)[:, context_length - 1 : -1]  # (b, R)
    loss, stats = value_loss(vpred, old_values, returns, mask, cliprange_value)
    return loss, {"loss/value_avg": loss.detach(), "val/clipfrac_avg": stats["clipfrac"]}


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _serve(conn, value_model: nn.Module, grads: list[torch.Tensor], threads: int, settings: dict) -> None:
    """The worker's loop: one request in, one reply out, until the main process closes the pipe (or dies)."""
    torch.set_num_threads(threads)
    trainable = [p for p in value_model.parameters() if p.requires_grad]
    for p, g in zip(trainable, grads):
        p.grad = g  # shared: backward accumulates where the main process's optimizer reads
    autocast = _autocast(settings["autocast_dtype"])
    rollout: dict[str, torch.Tensor] = {}
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            if op == "values":
                rollout = dict(args)
                conn.send(("ok", _values(value_model, rollout, autocast, settings["forward_batch_size"])))
            elif op == "targets":
                rollout.update(args)
                conn.send(("ok", None))
            elif op == "step":
                conn.send(("ok", _step(value_model, rollout, *args, autocast, settings["cliprange_value"])))
        except Exception:  # noqa: BLE001 - reported to the main process, which raises it
            conn.send(("error", traceback.format_exc()))


@torch.no_grad()
def _values(
    value_model: nn.Module, rollout: dict, autocast: contextlib.AbstractContextManager, batch_size: int
) -> torch.Tensor:
    qr, mask, Q = rollout["query_responses"], rollout["attention_mask"], rollout["context_length"]
    parts = []
    for i in range(0, len(qr), batch_size):
        with autocast:
            parts.append(value_model(qr[i : i + batch_size], mask[i : i + batch_size])[:, Q - 1 : -1].float())
    return torch.cat(parts).masked_fill(~rollout["action_mask"], 0.0)


def _step(
    value_model: nn.Module,
    rollout: dict,
    micro_batches: list[tuple[list[int], float]],
    vf_coef: float,
    autocast: contextlib.AbstractContextManager,
    cliprange_value: float | None,
) -> dict:
    """Accumulate the gradients of one minibatch's value loss (a micro-batch at a time, each weighted by its share
    of the minibatch's action tokens) into the shared `.grad`s; returns the weighted stats and whether every
    micro-batch's loss was finite (a NaN is reported before its backward, as the trainer does in-process)."""
    stats: dict[str, torch.Tensor] = {}
    for idx, weight in micro_batches:
        index = torch.tensor(idx)
        loss, out = critic_micro_loss(
            value_model,
            rollout["query_responses"][index],
            rollout["attention_mask"][index],
            rollout["context_length"],
            rollout["values"][index],
            rollout["returns"][index],
            rollout["action_mask"][index],
            cliprange_value,
            autocast,
        )
        if not torch.isfinite(loss):
            return {"nonfinite": loss.detach()}
        (vf_coef * loss * weight).backward()
        for name, value in out.items():
            stats[name] = stats.get(name, 0.0) + value * weight
    return stats


@contextlib.contextmanager
def _main_module_hidden():
    """Spawn re-imports the parent's `__main__` in the child unless it is hidden: a user's training script without
    an `if __name__ == "__main__":` guard would run again there. The worker needs none of it."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class CriticProcess:
    """A worker process that runs the critic's passes on the critic's own (shared) parameters and gradients.

    `start_*` send a request and return at once; the matching `result` waits for the reply, so the main process
    works on the policy in between. One request is in flight at a time.
    """

    def __init__(
        self,
        value_model: nn.Module,
        *,
        threads: int,
        cliprange_value: float | None,
        forward_batch_size: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        trainable = [p for p in value_model.parameters() if p.requires_grad]
        value_model.share_memory()
        self.grads = [torch.zeros_like(p).share_memory_() for p in trainable]
        for p, g in zip(trainable, self.grads):
            p.grad = g
        settings = {
            "cliprange_value": cliprange_value,
            "forward_batch_size": forward_batch_size,
            "autocast_dtype": autocast_dtype,
        }
        ctx = mp.get_context("spawn")  # not fork: a forked copy of a process with OpenMP threads can deadlock
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(child, value_model, self.grads, threads, settings), daemon=True
        )
        with _main_module_hidden():
            self._process.start()
        child.close()
        self._pending = False

    def _send(self, op: str, args) -> None:
        assert not self._pending, "one request at a time"
        self._conn.send((op, args))
        self._pending = True

    def result(self):
        """The reply to the request in flight (raises the worker's error as a RuntimeError)."""
        self._pending = False
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the critic process died (exit code {self._process.exitcode}); set ppo.critic_process=false"
            ) from None
        if status == "error":
            raise RuntimeError(f"the critic process failed:\n{value}")
        return value

    def start_values(
        self,
        query_responses: torch.Tensor,
        attention_mask: torch.Tensor,
        action_mask: torch.Tensor,
        context_length: int,
    ) -> None:
        """V(s_t) of the rollout's response tokens, (B, R) with 0 off the action tokens: `result()`."""
        self._send(
            "values",
            {
                "query_responses": query_responses,
                "attention_mask": attention_mask,
                "action_mask": action_mask,
                "context_length": context_length,
            },
        )

    def set_targets(self, values: torch.Tensor, returns: torch.Tensor) -> None:
        """The update's old values and returns (B, R), for the minibatch steps that follow."""
        self._send("targets", {"values": values, "returns": returns})
        self.result()

    def start_step(self, micro_batches: list[tuple[list[int], float]], vf_coef: float) -> None:
        """Accumulate one minibatch's value-loss gradients (the grads must be zero, or hold what should be added):
        `result()` gives its stats."""
        self._send("step", (micro_batches, vf_coef))

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                if self._pending:
                    self.result()
                self._send("close", None)
                self.result()
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
