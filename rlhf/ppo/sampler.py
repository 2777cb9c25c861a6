"""Batched ancestral sampling with one KV cache that lives for a whole batch of (multi-turn) episodes.

`rollout` used to call `model.generate` once per turn. That re-reads the whole context every turn, prefills
every sample of a GRPO group separately although they share their prompt, keeps finished episodes in the batch,
and runs the logits processors and stopping criteria that plain sampling does not need. `KVSampler` instead:

- prefills each distinct context once and copies its cache rows to the samples that share it (a group's prompt);
- keeps the cache across turns: a new turn feeds only the tokens the cache has not seen (the reply's last token
  and the environment's message), never the history again;
- drops episodes that ended from the batch (`keep`);
- samples from softmax(logits / temperature) directly and returns the log-probability of every sampled token, so
  the rollout needs no second forward pass for them.

Layout: row i of the cache holds episode i's tokens in order, with masked holes (padding) where rows of one
batched forward had different lengths: left padding of the prompt, the steps after a reply's stop token, the
padding that right-aligns a turn's new tokens. Position ids count real tokens only (as `rollout.position_ids`
does for the scoring forward), so a hole shifts nothing and the logits equal those of the unpadded sequence up to
float rounding.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from rlhf.ppo.decoder import make_decoder

# Every method runs under torch.inference_mode (cheaper per op than no_grad); only Python lists leave the sampler.


def draw_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` (n, V), drawn with probability proportional to the row (need not sum to 1).

    Inverse-CDF sampling: one uniform number per row located in the row's cumulative sum. The same distribution as
    `torch.multinomial(probs, 1)`, which draws an exponential variate for every one of the V entries: a large share
    of a decode step on a real model's vocabulary (BENCHMARKS.md, "Numbers that were code comments").
    """
    cdf = probs.float().cumsum(dim=-1)  # (n, V)
    total = cdf[:, -1:]
    # u in [0, total): the largest float below the total caps a product that rounded up to it, so a token of
    # probability 0 (a flat stretch of the cdf, the tail included) is never the one found
    u = torch.minimum(torch.rand_like(total) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)  # first index with cdf > u


class KVSampler:
    """Sample replies for a batch of episodes, turn after turn, with one growing KV cache.

    model: a causal LM (a peft model works) in eval mode. temperature 0 = greedy (log-probabilities then at
    temperature 1). stop_token_ids: any of them ends a reply and is kept as its last token (`rlhf.models.tokenizer.
    stop_token_ids`: the EOS and every id of the model's generation_config.eos_token_id); empty or None: every reply
    runs to the length limit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        temperature: float,
        stop_token_ids: Collection[int] | None = None,
        pad_token_id: int,
    ) -> None:
        self.model = model
        self.temperature = temperature
        self.stop_token_ids = frozenset(stop_token_ids or ())
        self.pad_token_id = pad_token_id
        self.device = next(model.parameters()).device
        self._stops = torch.tensor(sorted(self.stop_token_ids), dtype=torch.long, device=self.device)  # (S,)
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.decoder = None  # the incremental forward passes (`rlhf.ppo.decoder`), built by `start`
        # per row: mask (n, L) 1 on real cached tokens; lengths (n,) real tokens; next_logits (n, V) at the last
        # real token; pending (n,) the last sampled token, not cached yet (has_pending (n,))
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_logits: torch.Tensor | None = None
        self.pending = torch.zeros(0, dtype=torch.long, device=self.device)
        self.has_pending = torch.zeros(0, dtype=torch.bool, device=self.device)

    def __len__(self) -> int:
        return self.lengths.numel()

    # ------------------------------------------------------------------ context
    @torch.inference_mode()
    def start(self, contexts: list[list[int]]) -> None:
        """Prefill one row per context; identical contexts (a group's shared prompt) are computed once."""
        if not contexts or any(not c for c in contexts):
            raise ValueError("every context needs at least one token")
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(c), len(unique)) for c in contexts]
        self.decoder = make_decoder(self.model)
        self.next_logits = None
        self.mask = torch.zeros((len(unique), 0), dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(len(unique), dtype=torch.long, device=self.device)
        self.pending = torch.full((len(unique),), self.pad_token_id, dtype=torch.long, device=self.device)
        self.has_pending = torch.zeros(len(unique), dtype=torch.bool, device=self.device)
        self._feed([list(c) for c in unique])
        if len(unique) < len(contexts):
            self.keep(torch.tensor(rows, device=self.device))

    @torch.inference_mode()
    def extend(self, tokens: list[list[int]]) -> None:
        """Append each row's new tokens (an environment message) after its last reply; one list per row."""
        if len(tokens) != len(self):
            raise ValueError(f"got new tokens for {len(tokens)} rows, the sampler holds {len(self)}")
        pending = self.pending.tolist()
        has_pending = self.has_pending.tolist()
        blocks = [([p] if h else []) + list(t) for p, h, t in zip(pending, has_pending, tokens)]
        self.has_pending.zero_()
        if any(blocks):
            self._feed(blocks)  # a row with nothing new keeps its next-token logits

    @torch.inference_mode()
    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these rows (indices into the current rows, repeats allowed), in this order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.decoder.select(index)
        self.mask, self.lengths = self.mask[index], self.lengths[index]
        if self.next_logits is not None:
            self.next_logits = self.next_logits[index]
        self.pending, self.has_pending = self.pending[index], self.has_pending[index]

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def sample(self, max_new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
        """One reply per row: up to `max_new_tokens` sampled tokens, the stop token included.

        Returns the token ids and their log-probabilities under softmax(logits / temperature) (temperature 1
        when greedy). The reply's last token is not fed to the cache yet: the next `extend` does it.
        """
        n = len(self)
        longest = int(self.lengths.max()) if n else 0
        if self.max_positions is not None and longest + max_new_tokens > self.max_positions:
            raise ValueError(
                f"episode context of {longest} tokens + response_length {max_new_tokens} exceeds the model's "
                f"max_position_embeddings {self.max_positions}; lower ppo.response_length or use a model with "
                "longer context"
            )
        tokens = torch.full((n, max_new_tokens), self.pad_token_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=self.device)
        active = torch.ones(n, dtype=torch.bool, device=self.device)
        steps = 0
        for t in range(max_new_tokens):
            token, logprob = self._draw(self.next_logits)  # (n,), (n,)
            token = torch.where(active, token, self.pad_token_id)
            tokens[:, t] = token
            logprobs[:, t] = torch.where(active, logprob, 0.0)
            steps = t + 1
            sampled = active.clone()
            if self.stop_token_ids:
                active &= ~torch.isin(token, self._stops)
            if t + 1 == max_new_tokens or not active.any():
                self.pending, self.has_pending = token, sampled
                break
            self._feed_column(token, sampled)
        # a reply ends at its first stop token (argmax: the first True); one without runs to the last step
        is_stop = torch.isin(tokens[:, :steps], self._stops)  # (n, steps)
        ends = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, steps).tolist()
        replies, reply_logprobs = [], []
        for row, lp, k in zip(tokens[:, :steps].tolist(), logprobs[:, :steps].tolist(), ends):
            replies.append(row[:k])
            reply_logprobs.append(lp[:k])
        return replies, reply_logprobs

    def _draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, V) logits -> sampled tokens (n,) and their float32 log-probabilities (n,)."""
        scaled = logits.float() / (self.temperature if self.temperature > 0 else 1.0)
        logp = torch.log_softmax(scaled, dim=-1)  # (n, V)
        token = draw_categorical(logp.exp()) if self.temperature > 0 else logp.argmax(-1)
        return token, logp.gather(1, token[:, None]).squeeze(1)

    # ------------------------------------------------------------------ forward passes
    def _feed(self, blocks: list[list[int]]) -> None:
        """Run each row's new tokens (right-aligned in one left-padded block) through the model."""
        width = max(len(b) for b in blocks)
        ids = torch.full((len(blocks), width), self.pad_token_id, dtype=torch.long)
        new_mask = torch.zeros((len(blocks), width), dtype=torch.long)
        for i, b in enumerate(blocks):
            if b:
                ids[i, width - len(b) :] = torch.tensor(b, dtype=torch.long)
                new_mask[i, width - len(b) :] = 1
        self._forward(ids.to(self.device), new_mask.to(self.device))

    def _feed_column(self, token: torch.Tensor, real: torch.Tensor) -> None:
        """Feed one token per row; rows where `real` is False get a masked hole."""
        self._forward(token[:, None], real.long()[:, None])

    def _forward(self, ids: torch.Tensor, new_mask: torch.Tensor) -> None:
        positions = (self.lengths[:, None] + new_mask.cumsum(1) - 1).clamp(
            min=0
        )  # (n, w) over real tokens only
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        self.lengths = self.lengths + new_mask.sum(1)
        logits = self.decoder.forward(
            ids, positions, self.mask
        )  # (n, V): blocks end with each row's last token
        if self.next_logits is not None and not bool(new_mask[:, -1].all()):
            # a row with nothing real in this block (a hole) keeps the logits of its last real token
            logits = torch.where(new_mask[:, -1, None].bool(), logits, self.next_logits)
        self.next_logits = logits
