"""Stand-ins for instruct models whose generation_config stops on several ids (no hub downloads).

Qwen2.5-Instruct: ChatML turns under a default system turn, no BOS, eos = `<|im_end|>` (the end-of-turn token),
pad = `<|endoftext|>`, generation_config.eos_token_id = [<|im_end|>, <|endoftext|>].
Llama 3 Instruct: BOS, header tokens, turns closed by `<|eot_id|>` with nothing after it (trimmed contents), eos =
`<|eot_id|>`, no pad token (pad = eos once loaded), generation_config.eos_token_id = [<|end_of_text|>, <|eom_id|>,
<|eot_id|>].

Each is a byte-level BPE trained offline, saved and loaded as a stage loads it, and a tiny Llama whose
generation_config.json lists the stop ids; `forcing_head` adds biases to its head so that tests choose which tokens
are drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from envs.base import TextEnv
from rlhf.models.tokenizer import train_byte_level_bpe
from rlhf.ppo.rollout import Rollout, rollout
from tests.helpers import biased_head, saved_tokenizer, tiny_llama_config

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

STYLES = {
    "qwen2.5": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "template": QWEN25_TEMPLATE,
        "stops": ["<|im_end|>", "<|endoftext|>"],
    },
    "llama3": {
        "special": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
        ],
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "template": LLAMA3_TEMPLATE,
        "stops": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    },
}
"""Per style: special tokens, the tokenizer's named tokens, chat template, generation_config.eos_token_id."""

TEXTS = [
    "go x y z",
    "more x y",
    "more z",
    "you are a helpful assistant",
    "user",
    "assistant",
    "system",
    "b c d",
]
"""BPE training text: no "aa", so a reply of "a" tokens decodes and re-encodes to itself."""


class TwoTurnEnv(TextEnv):
    """Two turns: prompt "go x y", then "more z"; every reply earns 1."""

    charset: ClassVar[str] = "abcdgoxyzmre "
    max_action_length: ClassVar[int] = 200
    max_observation_length: ClassVar[int] = 50
    max_turns: ClassVar[int] = 2

    def _reset(self, options):
        return "go x y", {}

    def _step(self, action):
        return "more z", 1.0, False, {}


def two_turn_rollout(policy, tokenizer, n: int, response_length: int, stop_token_ids: set[int]) -> Rollout:
    """`n` episodes of TwoTurnEnv (seeds 0..n-1) sampled from `policy`, replies cut at `response_length` tokens."""
    envs = [TwoTurnEnv() for _ in range(n)]
    return rollout(
        policy,
        tokenizer,
        envs,
        list(range(n)),
        response_length=response_length,
        stop_token_ids=stop_token_ids,
    )


def chat_tokenizer(style: str, path: Path) -> PreTrainedTokenizerFast:
    """The style's byte-level BPE, saved to `path` and loaded as every stage loads it (pad defaulted to eos)."""
    spec = STYLES[style]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(TEXTS, 300, spec["special"]),
        clean_up_tokenization_spaces=False,
        **spec["tokens"],
    )
    tokenizer.chat_template = spec["template"]
    return saved_tokenizer(tokenizer, path)


def stop_ids(style: str, tokenizer) -> list[int]:
    """The style's generation_config.eos_token_id, in its order."""
    return tokenizer.convert_tokens_to_ids(STYLES[style]["stops"])


def chat_model(style: str, tokenizer, path: Path) -> LlamaForCausalLM:
    """A tiny Llama saved to `path` with the style's generation_config.eos_token_id (a list), loaded back."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, width=16, layers=1, heads=2, positions=256))
    model.generation_config.eos_token_id = stop_ids(style, tokenizer)
    model.save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path).eval()


def forcing_head(model: LlamaForCausalLM, biases: dict[int, float]) -> LlamaForCausalLM:
    """Replace the head by one with `biases` (-30 for every other token): the tiny model's own logits are small, so
    the biases choose the tokens drawn, and the input still moves the log-probabilities a little (a cache that holds
    the wrong tokens shows)."""
    return biased_head(model, biases, others=-30.0)
