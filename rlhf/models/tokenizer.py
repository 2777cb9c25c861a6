"""Build a tokenizer offline from a task's vocabulary, or load one from a path.

The built tokenizer is a word-level model (one token per whitespace-separated word), so built-in tasks need no
download and no merges: `tokenizers` WordLevel + WhitespaceSplit, wrapped in `PreTrainedTokenizerFast`.

Its chat template lays a conversation out exactly as the multi-turn rollout does (token-in/token-out):
user (environment) content followed by " <reply> ", assistant content followed by " </s> ", the assistant part
inside `{% generation %}` markers so that TRL's `assistant_only_loss` trains on the replies and their stop token only.
Hence ids(obs0) + [reply] + ids(reply1) + [eos] + ids(obs1) + [reply] + ... == apply_chat_template(messages) ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, EOS)
REPLY = "<reply>"
"""Ends every user (environment) turn: the policy's reply starts after it."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }} " + EOS + " {% endgeneration %}"
    "{% else %}"
    "{{ message['content'] }} " + REPLY + " "
    "{% endif %}"
    "{% endfor %}"
)
"""Every message is one segment; a user turn ends with REPLY, so the generation prompt is empty. Without REPLY a
model with only relative positions (RoPE) cannot tell the end of a prompt from the same word at the start of the
reply: "apple" -> "apple </s>" looks like "apple apple" -> "</s>", and an echo task never learns."""


def build_tokenizer(vocabulary: list[str], model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `vocabulary`: ids 0-2 are <pad>, <unk>, </s>; then the words in the given order,
    then <reply>.

    Left padding, because every consumer (generation, reward scoring of the last token via the pad id) batches
    prompts; no BOS and no post-processor, so ids(a) + ids(b) == ids(a + " " + b).
    """
    words: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary entry {word!r} must be one non-empty word without whitespace")
        words.setdefault(word, len(words))
    words.setdefault(REPLY, len(words))  # after the words: their ids do not move
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordLevel has no decoder of its own: join words with single spaces (what the environments parse).
    backend.decoder = decoders.WordPiece(prefix="\x00", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[REPLY],
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with `save_pretrained` (or a hub id); give it a pad token when it has none."""
    path = str(path)
    if Path(path).is_dir() and not any(
        (Path(path) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise ValueError(
            f"{path} holds no tokenizer (no tokenizer.json / tokenizer_config.json); pass a model directory"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


BOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as SmolLM2 / Qwen lay it out: BOS first, each turn closed by <|im_end|> and a newline the policy never
generates, assistant content (and its <|im_end|>) inside `{% generation %}` markers for assistant-only loss."""


def train_byte_level_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen style: any text encodes, through bytes) trained offline on `texts`,
    with `special_tokens` first in its vocabulary."""
    from tokenizers import trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def build_bpe_tokenizer(
    texts: list[str], vocab_size: int = 600, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline on `texts`, shaped like a real model's tokenizer.

    What real models bring and the word-level tokenizer hides: merges (a word may be several tokens, and a
    reply's tokens need not re-tokenize to themselves), a BOS token, no pad token (pad = eos, so padding and the
    end of a reply share an id), right padding by default and a ChatML chat template whose turns end with a
    newline after the end-of-turn token. Test stand-ins use it so that every stage meets these traps.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(texts, vocab_size, [BOS, IM_START, IM_END]),
        bos_token=BOS,
        eos_token=IM_END,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, stop: str | None, generation_config: Any = None
) -> frozenset[int]:
    """The ids that end a reply for `ppo.stop_token`, as `model.generate` stops.

    eos: the tokenizer's EOS plus every id of the model's `generation_config.eos_token_id` (an int or a list:
    Qwen2.5-Instruct's is [<|im_end|>, <|endoftext|>], Llama 3 Instruct's [<|end_of_text|>, <|eom_id|>, <|eot_id|>]);
    a token of the vocabulary: that token only; None: none (every reply runs to the length limit).
    generation_config: the policy's (`model.generation_config`, which transformers reads from the model
    directory's generation_config.json), or None for the tokenizer's EOS alone.
    """
    if stop is None:
        return frozenset()
    if stop == "eos":
        ids = {tokenizer.eos_token_id}
        extra = getattr(generation_config, "eos_token_id", None)
        ids.update(extra if isinstance(extra, (list, tuple, set, frozenset)) else [extra])
        return frozenset(int(i) for i in ids if i is not None)
    token_id = tokenizer.convert_tokens_to_ids(stop)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"ppo.stop_token={stop!r} is not a token of the policy's tokenizer; use eos or null")
    return frozenset({token_id})
