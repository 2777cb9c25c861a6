"""The tiny models of the built-in tasks, built from config and saved with `save_pretrained`, so that they load
through the same `from_pretrained` calls as a user's hub model or directory (nothing is downloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.common.fields import choices
from rlhf.models.config import ModelConfig
from rlhf.models.loading import check_model_location

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf.config import RLHFConfig

log = logging.getLogger(__name__)

TINY_TOKENIZERS = choices(ModelConfig, "tokenizer")


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A small Llama sized by `cfg`, with the tokenizer's vocabulary and special ids (weights from torch's RNG)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_tiny_tokenizer(kind: str, env_cls) -> PreTrainedTokenizerBase:
    """The tiny model's tokenizer: word-level over the task's vocabulary, or a byte-level BPE trained on its text."""
    from rlhf.models.tokenizer import build_bpe_tokenizer, build_tokenizer

    if kind not in TINY_TOKENIZERS:
        raise ValueError(f"model.tokenizer={kind!r} is not one of {', '.join(TINY_TOKENIZERS)}")
    if kind == "word":
        return build_tokenizer(env_cls.vocabulary())
    return build_bpe_tokenizer(task_texts(env_cls))


def task_texts(env_cls, n: int = 400, seed: int = 0) -> list[str]:
    """Every text of a task's offline data (and its vocabulary): what a BPE stand-in is trained on."""
    texts = list(env_cls.vocabulary())
    for row in [*env_cls.demonstrations(n, seed), *env_cls.preferences(n, seed)]:
        for value in row.values():
            messages = value if isinstance(value, list) else [{"content": value}]
            texts += [str(m["content"]) for m in messages]
    return texts


def prepare_base_model(cfg: RLHFConfig, out_dir: Path) -> Path:
    """The model every stage starts from, as a `from_pretrained` location.

    `model.name_or_path` unset: build the tokenizer from the task's vocabulary and a tiny model, save both into
    `out_dir` and return it (rebuilt only when `out_dir` holds none yet). Set: check it and return it unchanged.
    """
    if cfg.model.name_or_path:
        check_model_location(cfg.model.name_or_path)
        return (
            Path(cfg.model.name_or_path) if Path(cfg.model.name_or_path).is_dir() else cfg.model.name_or_path
        )
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    from envs import env_class  # the task's vocabulary; imported late so models.py works without envs

    tokenizer = build_tiny_tokenizer(cfg.model.tokenizer, env_class(cfg.task.env_id))
    model = build_tiny_model(cfg.model, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model: %.2fM parameters, vocabulary %d -> %s", n / 1e6, len(tokenizer), out_dir)
    return out_dir
