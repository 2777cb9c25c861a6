"""Incremental forward passes for `KVSampler`: the model's next-token logits as each row's context grows.

Two engines with one interface (`forward(ids, positions, key_mask) -> (n, V)`, `select(index)`):

- `HFDecoder`: any causal LM through its own forward and a transformers `DynamicCache`.
- `LlamaDecoder`: Llama-architecture models (the tiny models, SmolLM2, Llama 2/3) computed layer by layer from
  the model's own weights with a preallocated KV cache. Sampling is latency-bound: on a CPU a decode step of a
  small model spends most of its time in per-module Python (mask building, output capturing, cache bookkeeping,
  peft's adapter dispatch), not in arithmetic. This engine does the same arithmetic as the HF forward (RMSNorm
  in float32, rotary embedding from the model's own module, grouped-query attention by SDPA, LoRA adapters as
  peft computes them, unmerged) with none of that overhead and no growing `torch.cat` of the cache per step.
  `tests/ppo/test_sampler.py` checks its logits against the HF forward.

Both only ever run under `torch.no_grad` on a model in eval mode (dropout off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache


class HFDecoder:
    """Any causal LM through its own forward with a DynamicCache (holes in the key mask are padding)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        import inspect

        self._kwargs = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        )

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """ids, positions (n, w) new tokens; key_mask (n, L) over cached + new tokens -> last column's logits (n, V)."""
        out = self.model(
            input_ids=ids,
            attention_mask=key_mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            **self._kwargs,
        )
        self.cache = out.cache
        return out.logits[:, -1]

    def select(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)  # index_select on every layer's keys and values (repeats allowed)


class _Linear:
    """A linear layer's weights as its forward uses them: base weight and bias plus active LoRA adapters."""

    def __init__(self, module: nn.Module) -> None:
        self.adapters: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = []
        if type(module) is nn.Linear:
            self.weight, self.bias = module.weight, module.bias
            return
        base = getattr(module, "base_layer", None)
        if type(base) is not nn.Linear or not hasattr(module, "lora_A"):
            raise NotImplementedError(f"{type(module).__name__}")
        self.weight, self.bias = base.weight, base.bias
        if module.disable_adapters or module.merged:
            return
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name) or getattr(module, "fan_in_fan_out", False):
                raise NotImplementedError("DoRA / fan_in_fan_out adapters")
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            self.adapters.append((lora_a.weight, lora_b.weight, lora_b.bias, module.scaling[name]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        for a, b, b_bias, scale in self.adapters:  # peft's LoRA forward: x in the adapter's dtype, then back
            out = out + F.linear(F.linear(x.to(a.dtype), a), b, b_bias) * scale
        return out.to(x.dtype) if self.adapters else out


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalise in float32, scale in the input dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaDecoder:
    """Llama-architecture causal LMs (a peft LoRA wrapper works), with a preallocated KV cache per layer."""

    def __init__(self, model: nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(base).__name__ != "LlamaForCausalLM" or getattr(base.config, "model_type", None) != "llama":
            raise NotImplementedError(type(base).__name__)
        if type(base.model.embed_tokens) is not nn.Embedding:
            raise NotImplementedError("adapted embedding")
        cfg = base.config
        self.embed = base.model.embed_tokens
        self.rotary = base.model.rotary_emb
        self.norm = base.model.norm
        self.lm_head = _Linear(base.lm_head)
        self.layers = []
        for layer in base.model.layers[: cfg.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [_Linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
            ffn = [_Linear(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            self.layers.append(
                (layer.input_layernorm, projections, layer.post_attention_layernorm, ffn, mlp.act_fn)
            )
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.keys: list[torch.Tensor] = []  # per layer (n, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []
        self.length = 0  # cache columns in use

    def _reserve(self, n: int, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` columns (capacity doubles, so a growing context costs amortised O(1) per token)."""
        capacity = self.keys[0].shape[2] if self.keys else 0
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity, 64)
        shape = (n, self.num_kv_heads, new, self.head_dim)
        old_keys, old_values = self.keys, self.values
        self.keys = [like.new_zeros(shape) for _ in self.layers]
        self.values = [like.new_zeros(shape) for _ in self.layers]
        for old, fresh in zip(old_keys + old_values, self.keys + self.values):
            fresh[:, :, : self.length] = old[:, :, : self.length]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """ids, positions (n, w) new tokens; key_mask (n, L) over cached + new tokens -> last column's logits (n, V)."""
        n, w = ids.shape
        start, end = self.length, self.length + w
        h = self.embed(ids)  # (n, w, H)
        self._reserve(n, end, h)
        cos, sin = self.rotary(h, positions)  # (n, w, d)
        cos, sin = cos[:, None], sin[:, None]
        # (n, 1, w, L): a new token sees the real cached tokens and the real new tokens up to itself
        causal = torch.ones((w, end), dtype=torch.bool, device=ids.device).tril(diagonal=start)
        allowed = key_mask.bool()[:, None, None, :end] & causal
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padding query sees all: finite, never read
        for i, (in_norm, (q_proj, k_proj, v_proj, o_proj), post_norm, (gate, up, down), act) in enumerate(
            self.layers
        ):
            x = _rms_norm(in_norm, h)
            q = q_proj(x).view(n, w, -1, self.head_dim).transpose(1, 2)  # (n, heads, w, d)
            k = k_proj(x).view(n, w, -1, self.head_dim).transpose(1, 2)  # (n, kv_heads, w, d)
            v = v_proj(x).view(n, w, -1, self.head_dim).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            attn = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, :end],
                self.values[i][:, :, :end],
                attn_mask=allowed,
                scale=self.scaling,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (n, heads, w, d)
            h = h + o_proj(attn.transpose(1, 2).reshape(n, w, -1))
            x = _rms_norm(post_norm, h)
            h = h + down(act(gate(x)) * up(x))
        self.length = end
        return self.lm_head(_rms_norm(self.norm, h[:, -1]))  # (n, V)

    def select(self, index: torch.Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def make_decoder(model: nn.Module) -> HFDecoder | LlamaDecoder:
    """The fast Llama engine where the model is one, else the model's own forward."""
    try:
        return LlamaDecoder(model)
    except NotImplementedError:
        return HFDecoder(model)
