"""Score whole episodes with a reward model exactly as the reward stage trained it.

TRL's RewardTrainer feeds a sequence classifier right-padded sequences laid out by the tokenizer (the chat template
for conversations, `prompt + completion + eos` for plain text), and the classifier reads its score at the last
token that is not the pad token. Scoring a rollout any other way reads a different position: with pad = eos, the
last real token of a reply is its EOS, which the classifier skips as padding, and a ChatML turn ends with a
newline after `<|im_end|>` that a rollout never samples. So both paths here rebuild the trained layout and let the
model pool as it did in training:

- token path (the reward model shares the policy's vocabulary): the rollout's own ids, the final reply closed by
  `ChatFormat.reward_suffix_ids` (the end-of-turn token when the reply lacks it, then the template's suffix);
- text path (any other sequence classifier, e.g. a BERT scoring a GPT-style policy): the episode's decoded
  conversation, re-encoded with the reward model's tokenizer the way TRL encodes preference data.

Both paths score the same layout: the conversation as the chat template writes it, every turn closed by the
template's end-of-turn token. That is the only layout TRL's RewardTrainer trained on (complete conversations
through the template), so a reply cut at `ppo.response_length` is closed too (the text path's template does it;
the token path appends the end-of-turn token the policy never sampled), and a reply that stopped on another of the
model's stop ids that is no text (Qwen2.5's `<|endoftext|>`: the decoded reply has none) is scored without it, as
the template writes that turn. That a reply was cut is priced by `ppo.missing_eos_penalty`, not by reading the
reward model at a position where it never learned to score.

A dialogue longer than the reward model's context (`context_limit`: a BERT reads 512 tokens) keeps its end, the
reply being scored, and its start token ([CLS], BOS): `keep_end`. TRL drops such pairs from training; PPO must
score every episode.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.models.chat_format import ChatFormat

log = logging.getLogger("rlhf")

MAX_SANE_LENGTH = 10**9
"""A tokenizer's model_max_length at or above this is a 'no limit' sentinel (transformers writes int(1e30))."""


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Token ids mean the same text for both tokenizers."""
    return a is b or a.get_vocab() == b.get_vocab()


def plain_text(messages: list[dict[str, str]]) -> str:
    """A conversation as one plain string, turns joined at a word boundary (TRL's `prompt + completion`)."""
    text = ""
    for m in messages:
        content = m["content"]
        if text and content and not text[-1].isspace() and not content[0].isspace():
            text += " "
        text += content
    return text


def context_limit(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most tokens the reward model reads: the tokenizer's model_max_length capped by the model config's
    max_position_embeddings (a sentinel such as 1e30 counts as no limit); None when neither says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limits = []
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int | float) and 0 < tokenizer_max < MAX_SANE_LENGTH:
        limits.append(int(tokenizer_max))
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits) if limits else None


def keep_end(ids: list[int], limit: int | None, head: int = 0) -> list[int]:
    """`ids` cut to at most `limit` tokens (None: no limit) from the middle: the first `head` tokens (the start token
    the model needs, BERT's [CLS] or a BOS) and the end (the reply being scored, the final [SEP] or turn suffix) stay.
    """
    if limit is None or len(ids) <= limit:
        return ids
    if limit <= head:
        raise ValueError(f"a reward model context of {limit} tokens cannot hold a dialogue")
    return ids[:head] + ids[len(ids) - (limit - head) :]


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded ids (B, L) and attention mask (B, L), as TRL's preference collator pads."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class RewardScorer:
    """A frozen sequence-classification reward model and the layout it was trained on."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        policy_tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.policy_format = ChatFormat(policy_tokenizer)
        self.token_path = same_vocabulary(tokenizer, policy_tokenizer)
        """True: score the policy's own ids; False: re-encode the decoded text with the reward tokenizer."""
        self.batch_size = batch_size
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        pad = getattr(config, "pad_token_id", None)
        self.pad_id = pad if pad is not None else tokenizer.pad_token_id
        self.max_length = context_limit(model, tokenizer)
        """The most tokens one episode is scored on (`context_limit`); longer ones keep their end."""
        self.start_ids = {tokenizer.bos_token_id, tokenizer.cls_token_id} - {None}
        """Start tokens a truncated sequence keeps (BERT's [CLS], a BOS)."""
        self.num_truncated = 0
        """Episodes scored on a truncated sequence so far."""
        self._textless: dict[int, bool] = {}

    def episode_ids(self, ro) -> list[list[int]]:
        """Each episode of a `Rollout` laid out as the reward model was trained on it, cut to its context."""
        if not self.token_path:
            return [self.fit(self.text_ids(messages)) for messages in ro.messages]
        fmt = self.policy_format
        eot = -1 if fmt.end_of_turn_id is None else fmt.end_of_turn_id
        # a turn that stopped on a stop id other than the end-of-turn, one that is no text (Qwen2.5's <|endoftext|>),
        # is followed by the end-of-turn the rollout closed it with: dropped, the turn is as the template writes it
        stopped = ro.turn_eos & (ro.response_ids != eot)  # (B, R)
        textless = [t for t in ro.response_ids[stopped].unique().tolist() if self._is_textless(t)]
        drop = stopped & torch.isin(
            ro.response_ids, torch.tensor(textless, dtype=torch.long, device=stopped.device)
        )
        keep = ro.attention_mask.bool().clone()  # (B, Q + R)
        keep[:, ro.context_length :] &= ~drop
        out = []
        for ids, row_keep in zip(ro.query_responses.tolist(), keep.tolist()):
            real = [t for t, k in zip(ids, row_keep) if k]  # an episode ends with its last reply's last token
            out.append(self.fit(real + fmt.reward_suffix_ids(real[-1] == eot)))
        return out

    def text_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation encoded as TRL's RewardTrainer encodes a preference example for this tokenizer (its chat
        template closes the last turn, cut or not; plain text gets the EOS)."""
        if self.format.is_chat:
            return self.format.template_ids(messages)
        text = plain_text(messages)
        eos = self.tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        return list(self.tokenizer(text)["input_ids"])

    def fit(self, ids: list[int]) -> list[int]:
        """`ids` cut to the reward model's context by `keep_end`, keeping a leading [CLS] / BOS."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.num_truncated == 0:
            log.warning(
                "an episode of %d tokens exceeds the reward model's context of %d: scored on its last tokens "
                "(its reply) and start token; shorten episodes (ppo.response_length, the environment's turns) or "
                "use a reward model with a longer context",
                len(ids),
                self.max_length,
            )
        self.num_truncated += 1
        return keep_end(ids, self.max_length, head=1 if ids[0] in self.start_ids else 0)

    def _is_textless(self, token: int) -> bool:
        """The token decodes to nothing once special tokens are skipped (as the rollout decodes replies)."""
        if token not in self._textless:
            decoded = self.policy_format.tokenizer.decode([token], skip_special_tokens=True)
            self._textless[token] = decoded == ""
        return self._textless[token]

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """(B,) float32 scores of token sequences, in batches of `batch_size`, right-padded."""
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(sequences), self.batch_size):
            ids, mask = right_pad(sequences[start : start + self.batch_size], self.pad_id)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            parts.append(logits[:, 0].float())
        return torch.cat(parts) if parts else torch.zeros(0)

    def score(self, ro) -> torch.Tensor:
        """(B,) float32 reward-model scores of a rollout's episodes, on the rollout's device."""
        return self.score_ids(self.episode_ids(ro)).to(ro.query_ids.device)
