"""Build or load the policy, reference, critic and reward models.

One loading path serves every model: a tiny model built from config is written with `save_pretrained` into the run
directory first, so that a user's hub id or local directory goes through exactly the same `from_pretrained` calls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.common.fields import choices
from rlhf.models.config import DEVICES, LoraConfig, ModelConfig
from rlhf.models.lora import apply_lora

if TYPE_CHECKING:  # torch and transformers load lazily: `rlhf --help` and input checks stay fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = choices(ModelConfig, "dtype")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16` (`"auto"`: what `rlhf.models.precision` picks here); ValueError naming the choices
    otherwise."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":  # the pipeline resolves it up front; a stage called directly resolves it here
        from rlhf.models.precision import resolve_dtype

        name = resolve_dtype(name, "cuda" if torch.cuda.is_available() else "cpu")[0]
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without one is a user error."""
    import torch

    if name not in DEVICES:
        raise ValueError(f"device={name!r} is not one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def check_model_location(path: str | Path, key: str = "model.name_or_path", kind: str | None = None) -> None:
    """A local directory must hold a model (config.json) of the expected `kind` (causal: a language model, reward:
    a sequence classifier; None: either) and a tokenizer whose vocabulary fits its embeddings.

    Hub ids pass unchecked here: `from_pretrained` reports what is wrong with them.
    """
    p = Path(path)
    if not p.exists():
        if str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
            raise ValueError(f"{path} does not exist; set {key} to a model directory or hub id")
        return
    if not p.is_dir() or not (p / "config.json").exists():
        raise ValueError(f"{path} holds no model (no config.json); set {key} to a save_pretrained directory")
    found, architecture = model_kind(p)
    if kind == "causal" and found == "reward":
        raise ValueError(
            f"{key}={path} is a reward model ({architecture}), not a language model; set it to a policy "
            "(e.g. <run dir>/sft)"
        )
    if kind == "reward" and found == "causal":
        raise ValueError(
            f"{key}={path} is a language model ({architecture}), not a reward model; set it to a reward "
            "stage's output (e.g. <run dir>/reward)"
        )
    from transformers import AutoConfig

    check_vocab_fits(load_tokenizer(p), AutoConfig.from_pretrained(p), str(path))


def _config_json(path: str | Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def model_kind(path: str | Path) -> tuple[str | None, str]:
    """(causal | reward | None, architecture) of a save_pretrained directory, from its config.json."""
    architecture = (_config_json(path).get("architectures") or [""])[0]
    if architecture.endswith("ForSequenceClassification"):
        return "reward", architecture
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal", architecture
    return None, architecture


def model_context(path: str | Path) -> int | None:
    """The longest sequence a save_pretrained model's positions cover (None when its config.json does not say)."""
    config = _config_json(path)
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def check_vocab_fits(tokenizer: PreTrainedTokenizerBase, config, where: str) -> None:
    """Token ids past the embedding table would index out of range mid-training: refuse them up front."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer at {where} has {len(tokenizer)} tokens but its model embeds only {vocab_size}; "
            "use the tokenizer saved with that model"
        )


SAMPLED_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Decoder layer kinds the PPO sampler decodes (`rlhf.ppo.decoder`): attention over a key/value cache."""


def layer_types(config) -> list[str]:
    """Each decoder layer's kind as transformers' cache sees it: full_attention, sliding_attention, or a recurrent
    kind (linear_attention for Mamba-style and linear-attention layers, conv for LFM2's convolutions, ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return list(get_layer_types_and_kwargs(config)[0])


def check_sampler_support(config, where: str) -> None:
    """A model whose layers keep a recurrent state (Mamba, LFM2, Qwen3-Next, Jamba, ...) or attend in chunks cannot be
    sampled by PPO's KV-cache decoder: ValueError naming the model and what to do."""
    other = sorted(set(layer_types(config)) - set(SAMPLED_LAYER_TYPES))
    if other:
        model_type = getattr(config, "model_type", None) or type(config).__name__
        raise ValueError(
            f"{where} ({model_type}) has {', '.join(other)} layers, which keep a recurrent state or attend in chunks; "
            "the ppo and evaluate stages sample with a key/value cache of full or sliding-window attention only: "
            "use a transformer such as Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3 or GPT-2 as the policy "
            "(this model can still run the sft and reward stages)"
        )


def load_causal_lm(
    path: str | Path, dtype: str | torch.dtype = "float32", lora: LoraConfig | None = None
) -> PreTrainedModel:
    """`AutoModelForCausalLM` from a save_pretrained dir or hub id; LoRA-wrapped (peft) when `lora.r > 0`. SDPA
    attention computes in float32 where it is trained on CPU under low precision (`rlhf.models.attention`)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models.attention import use_float32_cpu_attention

    check_model_location(path, "the model path")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    use_float32_cpu_attention(model)
    return apply_lora(model, lora, "CAUSAL_LM")


def load_reward_model(
    path: str | Path, dtype: str | torch.dtype = "float32", lora: LoraConfig | None = None
) -> PreTrainedModel:
    """`AutoModelForSequenceClassification` with one scalar head and `config.pad_token_id` set.

    From a causal LM directory the head is freshly initialised (a new reward model); from a reward stage's output it
    is the trained head. The pad id lets the model find each sequence's last real token under left padding.
    """
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.attention import use_float32_cpu_attention

    check_model_location(path, "the model path")
    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=torch_dtype(dtype), pad_token_id=tokenizer.pad_token_id
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    use_float32_cpu_attention(model)
    return apply_lora(model, lora, "SEQ_CLS")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model (pad token defaulted to eos when missing)."""
    from rlhf.models.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def check_tokenizers_match(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, what: str) -> None:
    """Two models scored or compared token by token must share one vocabulary: ValueError naming `what` otherwise."""
    if a.get_vocab() != b.get_vocab():
        raise ValueError(
            f"{what}: tokenizers differ ({len(a)} vs {len(b)} tokens); both models must use the same tokenizer"
        )
