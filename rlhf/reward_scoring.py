"""Score whole episodes with a reward model exactly as the reward stage trained it.

TRL's RewardTrainer feeds a sequence classifier right-padded sequences laid out by the tokenizer (the chat template
for conversations, `prompt + completion + eos` for plain text), and the classifier reads its score at the last
token that is not the pad token. Scoring a rollout any other way reads a different position: with pad = eos, the
last real token of a reply is its EOS, which the classifier skips as padding, and a ChatML turn ends with a
newline after `<|im_end|>` that a rollout never samples. So both paths here rebuild the trained layout and let the
model pool as it did in training:

- token path (the reward model shares the policy's vocabulary): the rollout's own ids plus the template's suffix
  after the final end-of-turn token (`ChatFormat.reward_suffix_ids`);
- text path (any other sequence classifier, e.g. a BERT scoring a GPT-style policy): the episode's decoded
  conversation, re-encoded with the reward model's tokenizer the way TRL encodes preference data.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.formatting import ChatFormat


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

    def episode_ids(self, ro) -> list[list[int]]:
        """Each episode of a `Rollout` laid out as the reward model was trained on it."""
        if not self.token_path:
            return [self.text_ids(messages) for messages in ro.messages]
        out = []
        for ids, mask in zip(ro.query_responses.tolist(), ro.attention_mask.tolist()):
            real = [t for t, m in zip(ids, mask) if m]  # an episode ends with its last reply's last token
            ended = real[-1] == self.policy_format.end_of_turn_id
            out.append(real + self.policy_format.reward_suffix_ids(ended))
        return out

    def text_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation encoded as TRL's RewardTrainer encodes a preference example for this tokenizer."""
        if self.format.is_chat:
            return self.format.template_ids(messages)
        text = plain_text(messages)
        eos = self.tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        return list(self.tokenizer(text)["input_ids"])

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
