"""The one formatting path: how prompts, environment messages and replies become token ids for every model.

SFT data, preference data, rollouts, reward scoring and evaluation all go through `ChatFormat`, so a policy sees
at PPO time exactly the layout it was fine-tuned on (chat template, BOS, end-of-turn tokens), and a reward model
scores exactly the layout it was trained on.

- With a chat template (every instruct model, the tiny tokenizers): an episode is a conversation. Environment
  messages are user turns, replies are assistant turns; the policy is prompted with the template's generation
  prompt and ends its turn with the tokenizer's EOS (the template's end-of-turn token, e.g. `<|im_end|>`).
  A reply that does not end with it (cut at the length limit, or stopped on another of the model's stop ids, such
  as Qwen2.5's `<|endoftext|>`) is closed with it, so every assistant turn after it, and every turn a reward model
  scores, is closed the way the template closes a turn.
  Task data is turned into TRL's conversational formats, so TRL renders it through the same template.
- Without one (a base model): the prompt is plain text, environment messages are appended as plain text, and
  task data stays in TRL's plain `prompt` / `completion` format.

Token-in/token-out: the policy's sampled ids are never re-tokenized. Only the template's text between a reply's
end-of-turn token and the next reply (the turn's trailing newline, the next user turn, the generation prompt) is
tokenized, and `check_consistency` proves at startup that the pieces concatenate to what the template produces.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from transformers import PreTrainedTokenizerBase

_PROBE_USER, _PROBE_REPLY = "a", "b"
"""Placeholder turns used to cut the template's text between two turns."""


class FormatMismatch(ValueError):
    """The token-in/token-out layout differs from the chat template's own tokenization."""


class ChatFormat:
    """The layout of one tokenizer's conversations; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.is_chat = bool(getattr(tokenizer, "chat_template", None))
        self.end_of_turn_id: int | None = tokenizer.eos_token_id
        """The template's end-of-turn token (the tokenizer's EOS), one of the policy's stop tokens; the model may
        have more (`rlhf.models.tokenizer.stop_token_ids`), but only this one closes a turn in the template's layout."""

    # ------------------------------------------------------------------ text -> ids
    def encode(self, text: str) -> list[int]:
        """Plain text, no special tokens added: a piece of a longer sequence."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def template_ids(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
        """The chat template's own tokenization, as TRL's trainers tokenize conversational data."""
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
        )
        return list(out["input_ids"])

    def prompt_ids(self, observation: str) -> list[int]:
        """The first observation as the policy's prompt: the user turn and the generation prompt (chat), or the
        text with the tokenizer's own special tokens (plain, as TRL tokenizes a plain prompt)."""
        if self.is_chat:
            return self.template_ids([user(observation)], generation_prompt=True)
        return list(self.tokenizer(observation)["input_ids"])

    def closing_ids(self, reply_ended: bool) -> list[int]:
        """The end-of-turn token for a reply that does not end with it (not a policy action), else nothing.

        `reply_ended`: the reply's last token is the end-of-turn token. A reply cut at the length limit, or stopped
        on another stop id (Qwen2.5's `<|endoftext|>`, Llama 3's `<|eom_id|>`), is closed as the template closes
        every assistant turn.
        """
        return [] if reply_ended or self.end_of_turn_id is None else [self.end_of_turn_id]

    def env_turn_ids(self, observation: str, reply_ended: bool) -> list[int]:
        """Tokens between a reply and the policy's next reply: the environment's message as the next user turn,
        after `closing_ids(reply_ended)` (chat) or as plain text (no template)."""
        if not self.is_chat:
            return self.encode(observation)
        return self.closing_ids(reply_ended) + self.encode(self.turn_tail + self._user_turn_text(observation))

    def reward_suffix_ids(self, reply_ended: bool) -> list[int]:
        """What closes the final reply for a reward model: `closing_ids(reply_ended)`, then what the template
        writes after an end-of-turn token (ChatML: a newline).

        A reward model trained by TRL on conversations only ever saw complete turns, closed by the template, and a
        sequence classifier reads its score at the last non-pad token, so PPO scores an episode in that layout. A
        cut reply is closed too: its score is then read where the model learned to read one (at any other position
        the head was never trained), and the cut itself is what `ppo.missing_eos_penalty` prices. Without a template
        the layout is TRL's plain `prompt + completion + eos`: the EOS closes a cut reply.
        """
        if not self.is_chat:
            return self.closing_ids(reply_ended)
        return self.closing_ids(reply_ended) + self.encode(self.turn_tail)

    # ------------------------------------------------------------------ the template's pieces
    @cached_property
    def turn_tail(self) -> str:
        """Text the template writes after an assistant turn's end-of-turn token ('' when it ends there)."""
        text = self.render([user(_PROBE_USER), assistant(_PROBE_REPLY)])
        eot = self.tokenizer.eos_token or ""
        cut = text.rfind(eot) if eot else -1
        if cut < text.rfind(_PROBE_REPLY):
            raise FormatMismatch(
                f"the chat template does not end an assistant turn with the tokenizer's EOS {eot!r}, so the policy "
                "could not end its turn; set the tokenizer's eos_token to the template's end-of-turn token"
            )
        return text[cut + len(eot) :]

    def _user_turn_text(self, observation: str) -> str:
        """The template's text for a later user turn plus the generation prompt."""
        history = [user(_PROBE_USER), assistant(_PROBE_REPLY)]
        before = self.render(history)
        after = self.render([*history, user(observation)], generation_prompt=True)
        if not after.startswith(before):
            raise FormatMismatch(
                "the chat template renders earlier turns differently once a user turn follows; multi-turn "
                "token-in/token-out needs a template that only appends"
            )
        return after[len(before) :]

    # ------------------------------------------------------------------ episodes
    def conversation(self, observations: list[str], replies: list[str]) -> list[dict[str, str]]:
        """An episode's messages: observation 0, reply 0, observation 1, reply 1, ..."""
        messages = []
        for k, reply in enumerate(replies):
            messages += [user(observations[k]), assistant(reply)]
        return messages

    # ------------------------------------------------------------------ the startup check
    def check_consistency(self, observations: list[str], replies: list[str]) -> None:
        """Refuse a tokenizer whose template does not split into the rollout's pieces.

        Builds the ids a rollout would build for a sample dialogue (prompt, reply ids + end-of-turn, environment
        turns, reward suffix) and compares them with the template's tokenization of the same conversation.
        """
        if not self.is_chat:
            return
        ids = self.prompt_ids(observations[0])
        for k, reply in enumerate(replies):
            ids += self.encode(reply) + [self.end_of_turn_id]
            if k + 1 < len(replies):
                ids += self.env_turn_ids(observations[k + 1], reply_ended=True)
        ids += self.reward_suffix_ids(reply_ended=True)
        expected = self.template_ids(self.conversation(observations, replies))
        if ids != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected))
            )
            raise FormatMismatch(
                f"rollout token ids differ from the chat template's at position {at}: "
                f"{self.tokenizer.decode(ids[at : at + 8])!r} vs {self.tokenizer.decode(expected[at : at + 8])!r}; "
                "the tokenizer's chat template and eos_token must agree (eos = the end-of-turn token)"
            )


def single_text(value: Any) -> str | None:
    """The text of a plain string or of a one-message conversation; None for a longer dialogue."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        return str(value[0].get("content", ""))
    return None


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}
