"""Collectives of the PPO loop over data-parallel processes (`accelerate`): means, finiteness checks, local steps.

With one process each is the local value (the reductions of a single process are the identity).
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn


def mean(acc: Accelerator, x: torch.Tensor) -> float:
    """Mean of a local scalar over processes."""
    return acc.reduce(x.detach().float().reshape(1), reduction="mean").item()


def gather_mean(
    acc: Accelerator, local: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]
) -> dict[str, float]:
    """Global means from local (sum, count) pairs, in one collective: sum(sums) / sum(counts) over processes.

    Every process must pass the same names; a name whose count is 0 on every process is left out.
    """
    names = sorted(local)
    sums = [torch.as_tensor(local[k][0]).detach().double().reshape(()) for k in names]
    counts = [torch.as_tensor(local[k][1]).detach().double().reshape(()) for k in names]
    stacked = torch.stack([torch.stack(sums), torch.stack(counts)]).to(acc.device)  # (2, K)
    total_sum, total_count = acc.reduce(stacked, reduction="sum").tolist()
    return {k: s / c for k, s, c in zip(names, total_sum, total_count) if c > 0}


def check_finite(acc: Accelerator, what: str, value: torch.Tensor, advice: str, update: int) -> None:
    """Raise the same FloatingPointError on every process when the local scalar `value` is NaN/inf on any, naming
    `update` (1-based).

    A collective (all processes call it at the same point): a process that raised alone would leave the others
    waiting in the next collective, e.g. DDP's gradient all-reduce in the backward.
    """
    values = acc.gather(value.detach().float().reshape(1).to(acc.device))  # (P,)
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise FloatingPointError(
            f"PPO {what} became {values[bad[0]].item()} at update {update} "
            f"(process {bad[0]} of {values.numel()}); {advice}"
        )


def no_sync(acc: Accelerator, *models: nn.Module | None) -> contextlib.AbstractContextManager:
    """Gradients accumulate locally (no all-reduce) in this backward: every micro-batch of a minibatch but the last."""
    stack = contextlib.ExitStack()
    if acc.num_processes > 1:
        for model in models:
            if model is not None:
                stack.enter_context(acc.no_sync(model))
    return stack
