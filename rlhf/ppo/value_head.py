"""The critic's model: per-token values from a sequence-classification model, and its two passes."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rlhf.ppo.rollout import padded_forward


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
        hidden = padded_forward(backbone, input_ids, attention_mask).last_hidden_state  # (B, L, H)
        return head(hidden).squeeze(-1).float()  # (B, L)


def predict_values(
    value_head: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    autocast: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """V(s_t) of each response token, with grad: (b, Q + R) ids and mask -> (b, R) float32, the critic's output at
    the position that predicts the token."""
    with autocast:
        return value_head(query_responses, attention_mask)[:, context_length - 1 : -1]  # (b, R)


@torch.no_grad()
def critic_values(
    value_head: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    action_mask: torch.Tensor,
    context_length: int,
    batch_size: int,
    autocast: contextlib.AbstractContextManager,
) -> torch.Tensor:
    """V(s_t) of each response token, (B, R) float32 with 0 off the action tokens, `batch_size` episodes per forward:
    the update's value pass, in-process or in the critic's worker."""
    parts = []
    for i in range(0, len(query_responses), batch_size):
        with autocast:
            v = value_head(
                query_responses[i : i + batch_size], attention_mask[i : i + batch_size]
            )  # (b, Q + R)
        parts.append(v[:, context_length - 1 : -1])
    return torch.cat(parts).masked_fill(~action_mask, 0.0)
