"""The critic's training in a process of its own, in parallel with the policy's (`ppo.critic_process`).

On a CPU the policy's and the critic's passes are small ops that each keep one core busy with per-op work; two
threads of one process barely overlap them (the GIL), two processes do. The split is the one OpenRLHF makes across
GPUs (actor and critic on workers of their own), at the level where it pays on one machine:

- the worker runs the critic's forward and backward passes, clips its gradients and takes its AdamW steps, while
  the main process does the same for the policy;
- the critic's parameters and AdamW state live in shared memory, held by the main process's optimizer too: its
  learning-rate schedule, checkpoints and resume work as without the worker, and a run takes the same steps with and
  without it (bit for bit at one thread each);
- per update the worker gets the rollout once (and computes its values while the main process scores it and runs the
  reference); per epoch only the minibatches' episode indices and the learning rate travel, and the worker takes the
  epoch's steps back to back while the main process takes the policy's;
- messages carry their tensors by value (numpy arrays); only the optimizer state travels as shared memory.

Single-process runs only: under DDP/FSDP the critic's gradients are all-reduced by its prepared module.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
import types

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

import rlhf.models.attention  # noqa: F401  (registers the attention the unpickled critic's config may name)
from rlhf.ppo.losses import critic_loss
from rlhf.ppo.value_head import critic_values, predict_values


class Shared:
    """A message part sent as torch.multiprocessing sends tensors: moved into shared memory, one storage for both
    processes (the optimizer state). Every other tensor travels by value (`_to_wire`)."""

    def __init__(self, value) -> None:
        self.value = value


def _to_wire(obj):
    """Tensors as numpy arrays, pickled by value: sent as tensors, torch.multiprocessing would move each one into
    shared memory, which costs far more than copying the few KB of a rollout or of the stats (BENCHMARKS.md,
    "Numbers that were code comments")."""
    if isinstance(obj, torch.Tensor):  # numpy has no bfloat16: such a tensor goes the shared way
        return obj if obj.dtype == torch.bfloat16 else obj.detach().numpy()
    if isinstance(obj, dict):
        return {k: _to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_wire(v) for v in obj)
    return obj


def _from_wire(obj):
    """`_to_wire`'s inverse: numpy arrays back to tensors (the same bytes), `Shared` parts unwrapped."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, Shared):
        return obj.value
    if isinstance(obj, dict):
        return {k: _from_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_wire(v) for v in obj)
    return obj


def _serve(conn, value_model: nn.Module, threads: int, settings: dict) -> None:
    """The worker's loop: one request in, one reply out, until the main process closes the pipe (or dies)."""
    torch.set_num_threads(threads)
    worker = _Worker(value_model, settings)
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if op == "close":
                conn.send(("ok", None))
                return
            conn.send(("ok", _to_wire(getattr(worker, op)(*_from_wire(args)))))
        except Exception:  # noqa: BLE001 - reported to the main process, which raises it
            conn.send(("error", traceback.format_exc()))


class _Worker:
    """The critic's side: its passes, gradient clipping and optimizer step, on parameters and optimizer state that
    live in shared memory (the main process checkpoints them)."""

    def __init__(self, value_model: nn.Module, settings: dict) -> None:
        self.model = value_model
        self.trainable = [p for p in value_model.parameters() if p.requires_grad]
        hyper = settings["optimizer"]
        self.optimizer = torch.optim.AdamW(self.trainable, fused=hyper.get("fused"))
        self.optimizer.param_groups[0].update(hyper)
        self.autocast = _autocast(settings["autocast_dtype"])
        self.settings = settings
        self.rollout: dict = {}
        self.state_shared = False  # the optimizer state is handed to the main process once it exists

    def values(self, rollout: dict) -> torch.Tensor:
        self.rollout = dict(rollout)
        return critic_values(
            self.model,
            rollout["query_responses"],
            rollout["attention_mask"],
            rollout["action_mask"],
            rollout["context_length"],
            self.settings["forward_batch_size"],
            self.autocast,
        )

    def targets(self, values: torch.Tensor, returns: torch.Tensor) -> None:
        self.rollout.update(values=values, returns=returns)

    def step(self, micro_batches: list[tuple[list[int], float]], vf_coef: float, lr: float) -> dict:
        """One optimizer step on a minibatch's value loss, accumulated a micro-batch at a time (each weighted by its
        share of the minibatch's action tokens), as the trainer steps in-process. Returns the weighted stats, or a
        non-finite loss (reported before its backward)."""
        ro, stats = self.rollout, {}
        for idx, weight in micro_batches:
            index = torch.tensor(idx)
            values = predict_values(
                self.model,
                ro["query_responses"][index],
                ro["attention_mask"][index],
                ro["context_length"],
                self.autocast,
            )
            loss, out = critic_loss(
                values,
                ro["values"][index],
                ro["returns"][index],
                ro["action_mask"][index],
                self.settings["cliprange_value"],
            )
            if not torch.isfinite(loss):
                return {"nonfinite": loss.detach()}
            (vf_coef * loss * weight).backward()
            for name, value in out.items():
                stats[name] = stats.get(name, 0.0) + value * weight
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["max_grad_norm"])
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def steps(self, minibatches: list[list[tuple[list[int], float]]], vf_coef: float, lr: float) -> dict:
        """`step` for each minibatch of an epoch, back to back; their stats in order (up to a non-finite loss) and,
        after the first steps ever, the optimizer's new state (shared by pickling) for the main process to hold."""
        done = []
        for micro_batches in minibatches:
            done.append(self.step(micro_batches, vf_coef, lr))
            if "nonfinite" in done[-1]:
                break
        reply = {"minibatches": done}
        if not self.state_shared and self.trainable and self.trainable[0] in self.optimizer.state:
            self.state_shared = True
            reply["optimizer_state"] = Shared([self.optimizer.state[p] for p in self.trainable])
        return reply

    def ready(self) -> None:
        """Answers once the worker is up (its imports and the critic's unpickling done)."""

    def optimizer_state(self, states: list[dict]) -> None:
        """The main process's (resumed) optimizer state, shared: the steps from here on update it in place."""
        for p, state in zip(self.trainable, states):
            self.optimizer.state[p] = state
        self.state_shared = True


def _autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
    """A worker process that trains the critic: its passes, clipping and AdamW steps, on shared parameters and a
    shared optimizer state that this process's `optimizer` (the trainer's, for checkpoints) also holds.

    `start_*` send a request and return at once; `result` waits for its reply, so this process works on the policy in
    between. One request is in flight at a time.
    """

    def __init__(
        self,
        value_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        threads: int,
        cliprange_value: float | None,
        max_grad_norm: float,
        forward_batch_size: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.optimizer = optimizer
        self.trainable = [p for p in value_model.parameters() if p.requires_grad]
        value_model.share_memory()
        settings = {
            "cliprange_value": cliprange_value,
            "max_grad_norm": max_grad_norm,
            "forward_batch_size": forward_batch_size,
            "autocast_dtype": autocast_dtype,
            "optimizer": {k: v for k, v in optimizer.param_groups[0].items() if k != "params"},
        }
        ctx = mp.get_context("spawn")  # not fork: a forked copy of a process with OpenMP threads can deadlock
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, value_model, threads, settings), daemon=True)
        with _main_module_hidden():
            self._process.start()
        child.close()
        self._pending = False

    def _send(self, op: str, *args) -> None:
        assert not self._pending, "one request at a time"
        try:
            self._conn.send((op, _to_wire(args)))
        except OSError:  # a broken pipe: the worker is gone
            raise self._died() from None
        self._pending = True

    def _died(self) -> RuntimeError:
        self._process.join(timeout=5)
        return RuntimeError(
            f"the critic process died (exit code {self._process.exitcode}); set ppo.critic_process=false"
        )

    def result(self):
        """The reply to the request in flight (raises the worker's error as a RuntimeError)."""
        self._pending = False
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        value = _from_wire(value)
        if status == "error":
            raise RuntimeError(f"the critic process failed:\n{value}")
        if isinstance(value, dict) and "optimizer_state" in value:
            for p, state in zip(self.trainable, value.pop("optimizer_state")):
                self.optimizer.state[p] = state
        return value

    def start_values(
        self,
        query_responses: torch.Tensor,
        attention_mask: torch.Tensor,
        action_mask: torch.Tensor,
        context_length: int,
    ) -> None:
        """V(s_t) of the rollout's response tokens, (B, R) with 0 off the action tokens: `result()`."""
        rollout = {
            "query_responses": query_responses,
            "attention_mask": attention_mask,
            "action_mask": action_mask,
            "context_length": context_length,
        }
        self._send("values", rollout)

    def set_targets(self, values: torch.Tensor, returns: torch.Tensor) -> None:
        """The update's old values and returns (B, R), for the minibatch steps that follow."""
        self._send("targets", values, returns)
        self.result()

    def start_steps(self, minibatches: list[list[tuple[list[int], float]]], vf_coef: float) -> None:
        """One clipped AdamW step of the critic per minibatch of an epoch, in order ((episode indices, weight) per
        micro-batch), at the optimizer's current learning rate: `finish_steps()` gives each minibatch's stats."""
        self._send("steps", minibatches, vf_coef, self.optimizer.param_groups[0]["lr"])

    def finish_steps(self) -> list[dict]:
        """The stats of the minibatches `start_steps` sent, in order (the last may hold a non-finite loss)."""
        return self.result()["minibatches"]

    def wait_ready(self) -> None:
        """Block until the worker is up. Optional: the first request waits for it anyway, while this process can
        already roll out; a benchmark that counts the worker's start as setup (like loading) calls this first."""
        self._send("ready")
        self.result()

    def share_optimizer_state(self) -> None:
        """After this process loaded the optimizer's state (a resume): the worker continues from it."""
        if self.trainable and self.trainable[0] in self.optimizer.state:
            self._send("optimizer_state", Shared([self.optimizer.state[p] for p in self.trainable]))
            self.result()

    def close(self) -> None:
        """Stop the worker, after the request in flight if any. Never raises: it runs while an error propagates."""
        if self._pending:
            with contextlib.suppress(RuntimeError):  # its failure is not this call's to report
                self.result()
        with contextlib.suppress(RuntimeError):  # a dead worker: nothing left to stop gracefully
            self._send("close")
            self.result()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
