"""LoRA adapters: apply them from `model.lora`, check that they are plain (mergeable, samplable), merge them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from rlhf.models.config import LoraConfig


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
