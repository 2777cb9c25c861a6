"""PPO's clipped policy and value losses (Schulman et al. 2017), averaged over the masked tokens.

Pure tensor functions; mask convention as in ``rlhf.ppo.ops``. Masked positions contribute nothing to the
loss nor to its gradient, even where their inputs are garbage (NaN/inf on padding): inputs are replaced
before any nonlinearity, not multiplied by the mask afterwards.
Stats are detached 0-dim tensors (gather/average them across processes before ``.item()``).
The entropy bonus is ``ops.entropy_from_logits`` + ``ops.masked_mean``; ``kl_loss`` is the KL-to-reference term
of GRPO-style training (the KL in the loss rather than in the reward). ``ppo_loss`` is a whole minibatch's loss
(policy, entropy, KL and value terms), what the trainer's update and the benchmarks compute.
"""

from __future__ import annotations

import torch

from rlhf.ppo.kl import kl_penalty
from rlhf.ppo.ops import masked_mean


def _check_shapes(**tensors: torch.Tensor) -> torch.Tensor:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"loss inputs must share one shape (B, T), got {shapes}")
    mask = tensors["mask"]
    return mask if mask.dtype == torch.bool else mask != 0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, as a loss to minimise.

    logprobs: (B, T) current policy log-probabilities of the taken tokens (with grad);
    old_logprobs: (B, T) those recorded at rollout; advantages: (B, T); mask: (B, T) action tokens.
    ratio = exp(logprobs - old_logprobs);
    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange))).
    Stats: ``clipfrac`` = fraction of tokens where the clipped term is the active (larger) one,
    ``approxkl`` = 0.5 * masked_mean((logprobs - old_logprobs) ** 2) (TRL's), ``ratio`` = masked mean ratio.
    ``old_logprobs`` and ``advantages`` are treated as constants (detached).
    """
    m = _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not cliprange > 0:
        raise ValueError(f"cliprange must be > 0, got {cliprange}")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)  # (B, T); 0 on masked positions
    adv = torch.where(m, advantages.detach().to(logprobs.dtype), zero)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -adv * ratio  # (B, T)
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(logprobs.dtype), m),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), m),
            "ratio": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (V_clipped - R)^2)).

    values: (B, T) current critic predictions (with grad); old_values: (B, T) those recorded at rollout;
    returns: (B, T) targets (e.g. from ``gae``); mask: (B, T) action tokens.
    V_clipped = old_values + clip(values - old_values, -cliprange_value, cliprange_value); ``None`` (or inf)
    disables clipping (plain 0.5 * squared error). Stats: ``clipfrac`` = fraction of tokens where the clip is
    active and the clipped error is the larger one, ``vpred`` = masked mean of ``values``.
    """
    m = _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    if cliprange_value is not None and not cliprange_value > 0:
        raise ValueError(f"cliprange_value must be > 0 (or None for no clipping), got {cliprange_value}")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)  # (B, T)
    old = torch.where(m, old_values.detach().to(values.dtype), zero)  # (B, T)
    ret = torch.where(m, returns.detach().to(values.dtype), zero)  # (B, T)
    vf_losses = (v - ret).square()  # (B, T)
    if cliprange_value is None:
        vf_losses_clipped = vf_losses
        clipped = torch.zeros_like(m)
    else:
        delta = v - old  # (B, T)
        v_clipped = old + torch.clamp(delta, -cliprange_value, cliprange_value)  # (B, T)
        vf_losses_clipped = (v_clipped - ret).square()  # (B, T)
        # where the clamp is inactive old + (v - old) can still differ from v by rounding: not a clipped token
        clipped = (delta.abs() > cliprange_value) & (vf_losses_clipped > vf_losses)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.to(values.dtype), m),
            "vpred": masked_mean(v, m),
        }
    return loss, stats


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """KL(policy || reference) as a loss term: masked_mean(estimator(logprobs, ref_logprobs)), 0-dim.

    logprobs: (B, T) current policy log-probabilities of the taken tokens (with grad); ref_logprobs: (B, T) the
    frozen reference's (a constant, detached); mask: (B, T) action tokens. The loss is ``kl_coef * kl_loss``
    (GRPO's beta term, Shao et al. 2024, with k3). Estimators as in ``rlhf.ppo.kl.kl_penalty``; k3 (GRPO's) and
    k2 give a useful gradient; k1's gradient is zero in expectation on on-policy samples (the trainer refuses it).
    """
    m = _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    lp = torch.where(m, logprobs, zero)  # (B, T); masked positions give a log-ratio of 0, so a KL of 0
    ref = torch.where(m, ref_logprobs.detach().to(logprobs.dtype), zero)  # (B, T)
    return masked_mean(kl_penalty(lp, ref, estimator), m)


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`value_loss` with its stats under TRL's metric names (`loss/value_avg`, `val/clipfrac_avg`); tensors (B, T)."""
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value)
    return loss, {"loss/value_avg": loss.detach(), "val/clipfrac_avg": stats["clipfrac"]}


def ppo_loss(
    logprobs: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    ent_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    values: torch.Tensor | None = None,
    old_values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
    cliprange_value: float | None = None,
    vf_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one PPO minibatch and its detached stats (TRL's metric names), every term a masked mean over the
    action tokens:

        loss = policy_loss - ent_coef * entropy [+ kl_coef * kl_loss] [+ vf_coef * critic_loss]

    logprobs, entropy: (B, T) the current policy's, with grad (`rollout.response_logprobs`); old_logprobs,
    advantages, mask: (B, T). The KL term (GRPO's beta, `ppo.kl_in=loss`) comes in with `ref_logprobs`; the value
    term with `values` (the critic's current predictions, with grad), `old_values` and `returns`. The entropy gets a
    gradient only when `ent_coef` is set.
    """
    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
    entropy_avg = masked_mean(entropy if ent_coef else entropy.detach(), mask)
    loss = pg_loss - ent_coef * entropy_avg if ent_coef else pg_loss
    stats = {
        "loss/policy_avg": pg_loss.detach(),
        "policy/approxkl_avg": pg_stats["approxkl"],
        "policy/clipfrac_avg": pg_stats["clipfrac"],
        "policy/entropy_avg": entropy_avg.detach(),
        "val/ratio": pg_stats["ratio"],
    }
    if ref_logprobs is not None:
        kl = kl_loss(logprobs, ref_logprobs, mask, kl_estimator)
        loss = loss + kl_coef * kl
        stats["loss/kl_avg"] = kl.detach()
    if values is not None:
        vf_loss, vf_stats = critic_loss(values, old_values, returns, mask, cliprange_value)
        loss = loss + vf_coef * vf_loss
        stats.update(vf_stats)
    return loss, stats
