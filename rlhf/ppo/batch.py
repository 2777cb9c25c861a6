"""The episodes of one update as the optimisation reads them: one typed batch instead of loose tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    """B episodes of Q query and R response tokens, with what steps 1-5 of the update computed for them."""

    query_responses: torch.Tensor
    """(B, Q + R) long: each whole episode as one token sequence (query left-padded, response right-padded)."""
    attention_mask: torch.Tensor
    """(B, Q + R) long: 1 on real tokens."""
    action_mask: torch.Tensor
    """(B, R) bool: the policy's own tokens, the only ones with a loss."""
    logprobs: torch.Tensor
    """(B, R) float32: the rollout policy's log-probabilities (the sampler's); 0 off the action tokens."""
    ref_logprobs: torch.Tensor
    """(B, R) float32: the frozen reference's; 0 off the action tokens."""
    values: torch.Tensor
    """(B, R) float32: the critic's V(s_t) at rollout (0 without a critic)."""
    advantages: torch.Tensor
    """(B, R) float32."""
    returns: torch.Tensor
    """(B, R) float32: the value targets (0 without a critic)."""
    context_length: int
    """Q: where the response starts in `query_responses`."""

    def select(self, idx: torch.Tensor | slice) -> Batch:
        """The episodes `idx` (indices or a slice), every tensor indexed alike."""
        return replace(
            self, **{f.name: getattr(self, f.name)[idx] for f in fields(self) if f.name != "context_length"}
        )

    def __len__(self) -> int:
        return self.query_responses.shape[0]
