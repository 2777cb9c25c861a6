"""Attention for low-precision training on CPU: transformers' SDPA attention, computed in float32 where it is trained.

On CPU, torch's flash-attention kernel runs its backward slower in bfloat16 than in float32, while its bf16 forward
alone is the faster one (BENCHMARKS.md, "Attention with its mask"). Under mixed precision (`model.dtype=bfloat16`: autocast over float32
weights) every trained forward pays that backward in each of the model's layers. `float32_cpu_sdpa` upcasts the
query, key and value of such a forward and runs SDPA in float32 outside autocast, and returns the output in the
dtype the layer's values had (what autocast's SDPA returns): the next projection sees what it would see, computed
from more precise attention. Anywhere else (GPU, float32 inputs, no-grad passes: the reference, reward and value
passes and generation) it is transformers' own SDPA attention, unchanged.

Registered under `FLOAT32_CPU_SDPA` in transformers' `AttentionInterface` on import; `use_float32_cpu_attention`
switches a loaded model to it. The name lives in the model's runtime config only: `save_pretrained` does not write
it, so a saved model loads anywhere with its default attention.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

FLOAT32_CPU_SDPA = "sdpa_float32_cpu_training"


def float32_cpu_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention; on CPU, for low-precision inputs under autograd, computed in float32."""
    low_precision = value.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or not low_precision or not torch.is_grad_enabled():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else value.dtype
    return out.to(dtype), weights


AttentionInterface.register(FLOAT32_CPU_SDPA, float32_cpu_sdpa)
# transformers builds a model's attention mask by its implementation's name: a name missing from the mask registry
# gets no mask at all, and padding is attended. This implementation is SDPA, so it takes SDPA's mask.
ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT32_CPU_SDPA, sdpa_mask)


def use_float32_cpu_attention(model: PreTrainedModel) -> None:
    """Switch a model that uses SDPA attention to `float32_cpu_sdpa` (other implementations are left alone)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(FLOAT32_CPU_SDPA)
