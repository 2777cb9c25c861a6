"""Build or load the policy, reference, critic and reward models.

One loading path serves every model: a tiny model built from config is written with `save_pretrained` into the run
directory first, so that a user's hub id or local directory goes through exactly the same `from_pretrained` calls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import ModelConfig, RLHFConfig, choices

if TYPE_CHECKING:  # torch and transformers load lazily: `rlhf --help` and input checks stay fast
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf.config import LoraConfig

log = logging.getLogger(__name__)

DTYPES = choices(ModelConfig, "dtype")
DEVICES = choices(RLHFConfig, "device")
TINY_TOKENIZERS = choices(ModelConfig, "tokenizer")


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


def apply_lora(model: PreTrainedModel, lora: LoraConfig, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in peft LoRA adapters (`task_type` CAUSAL_LM or SEQ_CLS); identity when `lora.r == 0`."""
    if lora is None or lora.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, peft_cfg)


def merge_lora(model):
    """A plain `PreTrainedModel` to save: adapters merged into the weights, so `transformers` alone loads it."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


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


def lora_layers(model) -> list[tuple[str, object]]:
    """(name, module) of every peft LoRA layer of `model` (none for a plain model)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def plain_lora_problem(module, adapter: str) -> str | None:
    """Why adapter `adapter` of a peft LoRA layer is not plain LoRA (W + scale * B @ A), or None when it is.

    Plain means: no LoRA variant (DoRA, aLoRA, and any other peft `lora_variant`), a Linear base layer stored
    (out, in) (no fan_in_fan_out)."""
    if getattr(module, "use_dora", {}).get(adapter):
        return "DoRA (use_dora)"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"the LoRA variant {type(variant).__name__}"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    return None


def check_state_dict_mergeable(name: str, module) -> None:
    """`merged_state_dict` merges plain LoRA only (fan_in_fan_out transposed): ValueError for a LoRA variant."""
    for adapter in module.active_adapters:
        problem = adapter in module.lora_A and plain_lora_problem(module, adapter)
        if problem and problem != "fan_in_fan_out":
            raise ValueError(
                f"{name}: adapter {adapter!r} uses {problem}, which the merge of a sharded (FSDP) model's state dict "
                "(plain LoRA: W + scale * B @ A) would get wrong; train plain LoRA adapters, or without FSDP "
                "(peft merges its own variants when the model is whole)"
            )


def check_adapters(model, sharded: bool = False) -> None:
    """Before training: adapters PPO can sample and save. aLoRA never (`check_adapters_for_sampling`); LoRA variants
    (DoRA, ...) sample through peft's own forward and save through peft's merge, but not from a sharded (FSDP) state
    dict (`sharded=True`: `merged_state_dict`)."""
    check_adapters_for_sampling(model)
    if sharded:
        for name, module in lora_layers(model):
            check_state_dict_mergeable(name, module)


def check_adapters_for_sampling(model) -> None:
    """aLoRA adapters switch on at their invocation tokens, found by peft in each forward's own input ids; the sampler
    feeds a few new tokens per forward over a cache, so peft would never see them (and peft cannot merge aLoRA for
    saving either): ValueError before any update."""
    config = getattr(model, "peft_config", None)
    for name, adapter_config in (config or {}).items():
        if getattr(adapter_config, "alora_invocation_tokens", None):
            raise ValueError(
                f"adapter {name!r} is an aLoRA (alora_invocation_tokens): PPO samples with a KV cache a few tokens "
                "per forward, which peft's aLoRA offsets do not follow, and aLoRA cannot be merged to save the "
                "policy; train a plain LoRA adapter (peft LoraConfig without alora_invocation_tokens)"
            )


def merge_lora_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
    fan_in_fan_out: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """peft's LoRA merge of one linear layer: W + sum(scale * B @ A) and b + sum(scale * b_B), in float32, kept in
    W's dtype. adapters: (A, B, B's bias or None, scale) per active adapter; fan_in_fan_out: W is stored (in, out)."""
    if not adapters:
        return weight, bias
    merged = weight.float()
    merged_bias = None if bias is None else bias.float()
    for a, b, b_bias, scale in adapters:
        delta = scale * (b.float() @ a.float())
        merged = merged + (delta.T if fan_in_fan_out else delta)
        if b_bias is not None:
            extra = scale * b_bias.float()
            merged_bias = extra if merged_bias is None else merged_bias + extra
    return merged.to(weight.dtype), None if merged_bias is None else merged_bias.to(weight.dtype)


def merged_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (a state dict of `model`, e.g. the whole one gathered under FSDP) as the plain base model's weights:
    the active LoRA adapters merged (`merge_lora_linear`), peft's key prefixes and `modules_to_save` copies
    resolved. What `merge_lora(model).state_dict()` holds, computed from `state` instead of the module's own
    (possibly sharded) parameters. A model without adapters gets `state` back."""
    if not hasattr(model, "get_base_model"):
        return state
    prefix = "base_model.model."
    merged: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            check_state_dict_mergeable(name, module)
            adapters = [
                (
                    state[f"{name}.lora_A.{adapter}.weight"],
                    state[f"{name}.lora_B.{adapter}.weight"],
                    state.get(f"{name}.lora_B.{adapter}.bias"),
                    module.scaling[adapter],
                )
                for adapter in module.active_adapters
                if adapter in module.lora_A
            ]
            weight, bias = merge_lora_linear(
                state[f"{name}.base_layer.weight"],
                state.get(f"{name}.base_layer.bias"),
                adapters,
                getattr(module, "fan_in_fan_out", False),
            )
            merged[f"{name}.weight"] = weight
            drop.add(f"{name}.base_layer.weight")
            if bias is not None:
                merged[f"{name}.bias"] = bias
                drop.add(f"{name}.base_layer.bias")
        elif hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
            adapter = module.active_adapter
            adapter = adapter[0] if isinstance(adapter, list) else adapter
            for key in [k for k in state if k.startswith(f"{name}.")]:
                rest = key[len(name) + 1 :]
                if rest.startswith(f"modules_to_save.{adapter}."):
                    merged[f"{name}.{rest.removeprefix(f'modules_to_save.{adapter}.')}"] = state[key]
                drop.add(key)
    for key, value in state.items():
        if key not in drop and ".lora_" not in key and key not in merged:
            merged[key.replace(".base_layer.", ".")] = value
    return {k.removeprefix(prefix): v for k, v in merged.items()}


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
