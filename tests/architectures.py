"""Tiny random-initialised models of the architectures users bring, saved as `save_pretrained` directories.

Each is what a hub model of that family looks like to the loaders (`rlhf.models.loading.load_causal_lm`,
`load_reward_model`), in miniature: hidden size 32, 2 layers (3 for Qwen), a byte-level BPE tokenizer with BOS, pad = eos and a
ChatML template (`rlhf.models.tokenizer.build_bpe_tokenizer`). What sets each family apart is kept, with sliding windows of
16 tokens so that windows bind within a test's sequences:

- llama: grouped-query attention (the sampler's fast engine, `LlamaDecoder`)
- qwen2: q/k/v biases; a full layer then two sliding-window layers (two mask kinds in one model)
- qwen3: q/k RMSNorm, a full layer then two sliding ones
- mistral: every layer a sliding window
- gemma2: attention and final-logit soft-capping, sliding then full layer, embeddings scaled by sqrt(hidden)
- gemma3: the text-only Gemma3ForCausalLM, q/k norm, local and global rotary bases, sliding then full layer
- phi3: fused qkv and gate/up projections, a sliding window
- gpt2: learned absolute positions, LayerNorm, GELU

`build_causal_lm` also builds any other family from its own config defaults. A BERT reward model has a WordPiece
tokenizer of its own (`bert_reward_model`, `build_bert_reward_model`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers

from envs.base import TextEnv
from rlhf.models.tokenizer import build_bpe_tokenizer
from tests.helpers import special_ids

WINDOW = 16
"""Sliding window of the windowed architectures, in tokens: the test sequences are longer."""
INIT = 0.3

WORDS = ["go", "more", "x", "y", "z", "a", "b", "c", "d", "alpha", "beta", "gamma", "delta", "end"]
TEXTS = [
    *WORDS,
    "go x y z",
    "more a b c d",
    "alpha beta gamma delta",
    "the quick brown fox jumps over the lazy dog",
    "review : the film was very good and lovely , but the music was dull",
]
"""What the byte-level BPE is trained on (any text still encodes: unknown words fall back to bytes)."""

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "initializer_range": INIT,
    "max_position_embeddings": 256,
}
"""Every family's sizes (GPT-2's config reads them under its own names: n_embd, n_layer, ...)."""

ARCHITECTURES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        {"num_key_value_heads": 2, "tie_word_embeddings": True},
    ),
    "qwen2": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config,
        {
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,  # layer 0 full, layers 1 and 2 sliding
            "tie_word_embeddings": False,
        },
    ),
    "qwen3": (
        transformers.Qwen3ForCausalLM,
        transformers.Qwen3Config,
        {
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
        },
    ),
    "mistral": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig,
        {"num_key_value_heads": 2, "sliding_window": WINDOW},
    ),
    "gemma2": (
        transformers.Gemma2ForCausalLM,
        transformers.Gemma2Config,
        {
            "num_key_value_heads": 2,
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "attn_logit_softcapping": 5.0,  # small enough to bend the tiny model's scores
            "final_logit_softcapping": 3.0,
        },
    ),
    "gemma3": (
        transformers.Gemma3ForCausalLM,
        transformers.Gemma3TextConfig,
        {
            "num_key_value_heads": 2,
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": (
        transformers.Phi3ForCausalLM,
        transformers.Phi3Config,
        {"num_key_value_heads": 2, "sliding_window": WINDOW, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    ),
    "gpt2": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config,
        {"n_inner": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
}
"""name -> (model class, config class, the family's traits over SMALL) of a random-initialised causal LM."""

WINDOWED = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def tiny_tokenizer(vocab_size: int = 400):
    """The byte-level BPE stand-in of a real tokenizer: BOS, pad = eos (<|im_end|>), ChatML template."""
    return build_bpe_tokenizer(TEXTS, vocab_size=vocab_size, model_max_length=256)


def build_causal_lm(name: str, directory: Path, seed: int = 0, tokenizer=None, **traits: Any) -> Path:
    """A tiny causal LM and its tokenizer saved into `directory` (returned): `name` is a family of ARCHITECTURES,
    or any other transformers model_type, built from its own config defaults (SMALL, 2 key/value heads); `traits`
    go over the family's."""
    tokenizer = tokenizer or tiny_tokenizer()
    model_class, config_class, family = ARCHITECTURES.get(
        name,
        (
            transformers.AutoModelForCausalLM.from_config,
            partial(transformers.AutoConfig.for_model, name),
            {"num_key_value_heads": 2},
        ),
    )
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SMALL, **special_ids(tokenizer), **family, **traits}))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return save(model, tokenizer, directory)


def save(model, tokenizer, directory: Path) -> Path:
    """`model` and `tokenizer` saved side by side into `directory` (returned), as a hub model is laid out."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def bert_reward_model(
    words: list[str], max_positions: int = 128, model_max_length: int | None = None, seed: int = 0
) -> tuple[transformers.BertForSequenceClassification, transformers.PreTrainedTokenizerFast]:
    """A tiny BERT sequence classifier (one label) with a WordPiece tokenizer of its own over `words` (any other
    word is [UNK]): another architecture and vocabulary than the policy's. The model reads `max_positions` tokens;
    without `model_max_length` the tokenizer has none (transformers' 1e30 sentinel)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = {
        t: i for i, t in enumerate(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    }
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **({"model_max_length": model_max_length} if model_max_length else {}),
    )
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    return transformers.BertForSequenceClassification(config).eval(), tokenizer


def build_bert_reward_model(directory: Path, seed: int = 0) -> Path:
    """`bert_reward_model` over the words of TEXTS (model_max_length 128), saved into `directory` (returned)."""
    words = [w for text in TEXTS for w in text.split()]
    return save(*bert_reward_model(words, model_max_length=128, seed=seed), directory)


class RaggedDialogueEnv(TextEnv):
    """Two turns; prompts of 1-6 words and environment messages of 1-4 words, so rows of one batch differ in length
    at every turn (left padding, holes after finished replies, right-aligned turn blocks). Reward: the reply's
    share of the word "a"."""

    charset: ClassVar[str] = "abcdefghijklmnopqrstuvwxyz ,:'!?.-"
    max_action_length: ClassVar[int] = 400
    max_observation_length: ClassVar[int] = 100
    max_turns: ClassVar[int] = 2

    def _reset(self, options):
        n = int(self.np_random.integers(1, 7))
        return "go " + " ".join(self.np_random.choice(["x", "y", "z", "alpha", "beta"], size=n)), {}

    def _step(self, action):
        w = action.split()
        reward = sum(t == "a" for t in w) / len(w) if w else 0.0
        if self.turn >= self.max_turns:  # the base class counted this reply already
            return "", reward, True, {}
        n = int(self.np_random.integers(1, 5))
        return (
            "more " + " ".join(self.np_random.choice(["gamma", "delta", "c", "d"], size=n)),
            reward,
            False,
            {},
        )

    @classmethod
    def vocabulary(cls) -> list[str]:
        return WORDS
