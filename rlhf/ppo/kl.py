"""KL to the reference policy: per-token estimators and the controllers that set the penalty coefficient.

Estimators (Schulman, "Approximating KL divergence", 2020), for tokens sampled from the policy p with
log-probabilities ``logprobs`` and the reference q with ``ref_logprobs``; with r = q / p = exp(ref - logp):

- ``k1 = log p - log q = -log r``        unbiased for KL(p || q), high variance, can be negative per token
- ``k2 = 0.5 * (log p - log q) ** 2``    biased (exact to second order for small KL), always >= 0
- ``k3 = (r - 1) - log r``               unbiased for KL(p || q), always >= 0, low variance

TRL's PPOTrainer uses k1 for the reward penalty (``kl_estimator="k1"``) and reports ``objective/kl`` as the
sum of k1 over the response. As a per-token *reward* (a constant in the policy gradient) only k1 gives the KL's
gradient, E[grad log p * k1] = grad KL; k2 and k3 are >= 0 on every token and their reward gradient is biased.
k3 (GRPO's) and k2 belong in the *loss* (``losses.kl_loss``), differentiated through the policy's log-probabilities.
"""

from __future__ import annotations

import torch


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) at the sampled tokens.

    logprobs, ref_logprobs: (B, T) log-probabilities of the same sampled tokens under the policy and the
    reference -> (B, T). No masking here: the caller masks or zeroes non-action positions. k3 uses expm1 for
    accuracy when the two policies are close; it is not clamped (finite in float32 while ref - logp < ~88).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must have one shape"
        )
    log_ratio = logprobs - ref_logprobs  # (B, T) log p - log q
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_r = -log_ratio  # log q - log p
        return torch.expm1(log_r) - log_r
    raise ValueError(
        f"unknown KL estimator {estimator!r}"
    )  # ppo.kl_estimator is checked by rlhf.run.validation


def logprob_mismatch(
    sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """How far the sampler's log-probabilities are from the update's forward of the same policy, at the sampled
    tokens: (masked mean |difference|, masked mean k3 estimate of KL(sampler || trainer)), both 0-dim.

    sampler_logprobs, trainer_logprobs: (B, T); mask: (B, T) action tokens. Before any optimizer step both compute one
    policy, so both are ~0; a precision, kernel or padding difference between the two code paths shows here.
    """
    m = mask.bool()
    diff = (trainer_logprobs.detach().float() - sampler_logprobs.float()).masked_fill(~m, 0.0)  # (B, T)
    count = m.sum().clamp(min=1)
    k3 = torch.expm1(diff) - diff  # (B, T) r = p_trainer / p_sampler, samples from the sampler
    return diff.abs().sum() / count, k3.masked_fill(~m, 0.0).sum() / count


class KLController:
    """Holds the KL penalty coefficient ``value`` (beta): rewards = score - value * kl."""

    value: float

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Adjust ``value`` after an update that consumed ``n_steps`` samples with mean sequence KL ``current_kl``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: the current coefficient."""
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value:.6g})"


class FixedKLController(KLController):
    """A constant coefficient; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        pass


class AdaptiveKLController(KLController):
    """Proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences").

    After each update: error = clip(current_kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon.
    The coefficient rises while the KL is above ``target`` and falls while below, by at most 20% per
    ``horizon`` samples. ``target`` is in the units of ``current_kl`` (nats per sequence in Ziegler et al.: 6).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int | float) -> None:
        if init_kl_coef <= 0:
            raise ValueError(
                f"adaptive KL needs init kl_coef > 0 (a zero coefficient never moves), got {init_kl_coef}"
            )
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def make_kl_controller(
    kl_coef: float, adaptive: bool = False, target: float | None = 6.0, horizon: int | float | None = 10000
) -> KLController:
    """The controller a config asks for: adaptive (Ziegler et al.) when ``adaptive``, else fixed at ``kl_coef``."""
    if not adaptive:
        return FixedKLController(kl_coef)
    if target is None or horizon is None:
        raise ValueError("adaptive KL control needs both a target and a horizon (set kl target / horizon)")
    return AdaptiveKLController(kl_coef, target, horizon)
