"""Incremental forward passes for `KVSampler`: the model's next-token logits as each row's context grows.

Two engines with one interface (`forward(ids, positions, key_mask) -> (n, V)`, `select(index)`):

- `HFDecoder`: any causal LM through its own forward and a transformers `DynamicCache`.
- `LlamaDecoder`: Llama-architecture models (the tiny models, SmolLM2, Llama 2/3) computed layer by layer from
  the model's own weights with a preallocated KV cache. Sampling is latency-bound: on a CPU a decode step of a
  small model spends most of its time in per-op and per-module Python (mask building, output capturing, cache
  bookkeeping, peft's adapter dispatch), not in arithmetic. This engine does the HF forward's arithmetic (RMSNorm
  in float32, the rotary embedding of the model's own module, grouped-query attention by SDPA) in fewer ops:
  LoRA adapters merged and q/k/v and gate/up stacked once per rollout, rotary tables computed once, no growing
  `torch.cat` of the cache per step. `tests/ppo/test_sampler.py` checks its logits against the HF forward.

Both only ever run under `torch.no_grad` on a model in eval mode (dropout off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from rlhf.models.lora import check_adapters_for_sampling, merge_lora_linear, plain_lora_problem


class HFDecoder:
    """Any causal LM through its own forward, with a transformers `DynamicCache` and attention masks of its own.

    The cache holds masked holes (left padding, the steps after a finished reply, the padding that right-aligns a
    turn's new tokens), and positions count real tokens only. Left to itself, transformers would build the masks from
    the 2D key mask in cache columns: a sliding window of W columns then covers fewer than W real tokens on a row
    with holes (the logits drift), and a cache built from the model's config would crop sliding-window layers to
    their last W columns. So the cache keeps every column (plain `DynamicLayer`s) and each forward gets its masks
    precomputed: causal over the cache's columns, holes masked, and on sliding-window layers only the keys whose
    position is within the window of the query's position, i.e. the window counted in real tokens, as the model's
    forward over the unpadded sequence counts it. The mask takes the form the attention implementation reads (SDPA:
    bool, True = attend; eager: additive float); models with several layer types get a dict by layer type.
    Other implementations (flash attention unpads by the 2D key mask, flex attention builds a block mask) get the 2D
    key mask as before, and transformers builds their masks (untested here: they need a GPU or a compiler); one with
    no mask function registered in transformers would attend to padding and is refused.

    Models with recurrent or linear-attention layers (Mamba, LFM2's convolutions, Qwen3-Next) keep a state, not a
    key/value cache, and are refused (`rlhf.models.loading.check_sampler_support`).
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

        from rlhf.models.loading import check_sampler_support, layer_types

        self.model = model
        self.cache = DynamicCache()  # without a config: every layer a full, non-cropping DynamicLayer
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = (
            base.config.get_text_config(decoder=True)
            if hasattr(base.config, "get_text_config")
            else base.config
        )
        check_sampler_support(
            config, type(base).__name__
        )  # adapters: checked by make_decoder, for both engines
        import inspect

        self._kwargs = (
            {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
        )
        types = layer_types(config)
        self.layer_types = sorted(set(types))
        self.window = getattr(config, "sliding_window", None) if "sliding_attention" in types else None
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        interface = (
            ALL_MASK_ATTENTION_FUNCTIONS[implementation]
            if implementation in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()
            else None
        )
        if interface is None:
            raise ValueError(
                f"attention implementation {implementation!r} has no mask function in transformers' "
                "AttentionMaskInterface, so the model would attend to padding; register one beside it "
                "(as rlhf.models.attention registers sdpa_mask for its SDPA variant)"
            )
        # "bool" (SDPA's convention: True = attend), "float" (eager's additive mask), None: the 2D key mask, from
        # which transformers builds the mask itself (flash attention unpads, flex attention builds a block mask)
        self.mask_kind = {sdpa_mask: "bool", eager_mask: "float"}.get(interface)
        self.mask_dtype = base.get_input_embeddings().weight.dtype
        self.positions = None  # (n, L) position of every cached column (holes: a neighbour's, never attended)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """ids, positions (n, w) new tokens; key_mask (n, L) over cached + new tokens -> last column's logits (n, V)."""
        self.positions = (
            positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        )
        out = self.model(
            input_ids=ids,
            attention_mask=self._masks(positions, key_mask),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            **self._kwargs,
        )
        self.cache = out.cache
        return out.logits[:, -1]

    def _masks(
        self, positions: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The attention mask(s) of one forward: (n, 1, w, L) per layer type, in the implementation's convention."""
        if self.mask_kind is None:
            return key_mask
        w, end = positions.shape[1], key_mask.shape[1]
        causal = torch.ones((w, end), dtype=torch.bool, device=key_mask.device).tril(diagonal=end - w)
        allowed = key_mask.bool()[:, None, :] & causal  # (n, w, L): real keys up to the query's own column
        masks = {"full_attention": allowed}
        if self.window is not None:  # keys within the window of the query's position, counted in real tokens
            distance = positions[:, :, None] - self.positions[:, None, :]  # (n, w, L)
            masks["sliding_attention"] = allowed & (distance < self.window)
        out = {}
        for kind in self.layer_types:
            m = masks[kind]
            # a query with no key to attend (padding) sees all: finite, and never read
            m = (m | ~m.any(-1, keepdim=True))[:, None]
            if self.mask_kind == "float":
                m = torch.zeros(m.shape, dtype=self.mask_dtype, device=m.device).masked_fill(
                    ~m, torch.finfo(self.mask_dtype).min
                )
            out[kind] = m
        return out[self.layer_types[0]] if len(out) == 1 else out

    def select(self, index: torch.Tensor) -> None:
        self.cache.reorder_cache(index)  # index_select on every layer's keys and values (repeats allowed)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, index)


def _effective(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear layer's weight and bias as its forward applies them: active LoRA adapters merged in.

    The merge is `rlhf.models.lora.merge_lora_linear` (float32, kept in W's dtype); the model's own weights are not touched.
    Raises NotImplementedError for layers this engine does not know (quantized) and for adapters that are not plain
    LoRA (DoRA, aLoRA or any other peft LoRA variant, fan_in_fan_out: `rlhf.models.lora.plain_lora_problem`): the
    sampler then runs the model's own (peft's) forward instead.
    """
    if type(module) is nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(module, "lora_A"):
        raise NotImplementedError(type(module).__name__)
    if module.disable_adapters or module.merged:
        return base.weight, base.bias
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        problem = plain_lora_problem(module, name)
        if problem:
            raise NotImplementedError(f"adapter {name!r}: {problem}")
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        adapters.append((lora_a.weight, lora_b.weight, lora_b.bias, module.scaling[name]))
    return merge_lora_linear(base.weight, base.bias, adapters)


def _stacked(*modules: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several linear layers over the same input as one: weights stacked by output rows (q, k, v; gate, up)."""
    weights, biases = zip(*(_effective(m) for m in modules))
    if all(b is None for b in biases):
        return torch.cat(weights), None
    biases = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
    return torch.cat(weights), torch.cat(biases)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: normalise in float32, scale in the input dtype (one fused op in float32)."""
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class LlamaDecoder:
    """Llama-architecture causal LMs (a peft LoRA wrapper works), with a preallocated KV cache per layer.

    The weights are read once, when the engine is built (a rollout builds one): LoRA adapters merged, q/k/v and
    gate/up stacked into one matrix each, so a decode step runs 4 matmuls per layer instead of 7 (or 11 with
    adapters). The stacked copies live as long as the engine (one rollout).

    Built under `torch.autocast` (mixed precision), the engine keeps its matmul weights in the autocast dtype and
    runs every forward under that autocast: the arithmetic of the model's own forward under autocast, with each
    weight cast once per rollout instead of once per op and step. A decode step is bound by streaming the weights,
    so bf16 halves its bytes.
    """

    def __init__(self, model: nn.Module) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if type(base).__name__ != "LlamaForCausalLM" or getattr(base.config, "model_type", None) != "llama":
            raise NotImplementedError(type(base).__name__)
        if type(base.model.embed_tokens) is not nn.Embedding:
            raise NotImplementedError("adapted embedding")
        if base.model.rotary_emb.rope_type in ("dynamic", "longrope"):
            raise NotImplementedError("rotary frequencies that change with the sequence length")
        cfg = base.config
        self.embed = base.model.embed_tokens.weight
        device_type = self.embed.device.type
        self.autocast_dtype = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        )
        self.rotary = base.model.rotary_emb
        self.norm = (base.model.norm.weight, base.model.norm.variance_epsilon)
        self.head = self._cast_for_autocast(_effective(base.lm_head))
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.layers = []
        with torch.no_grad():
            for layer in base.model.layers[: cfg.num_hidden_layers]:
                attn, mlp = layer.self_attn, layer.mlp
                if type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
                    raise NotImplementedError(f"activation {type(mlp.act_fn).__name__}")
                self.layers.append(
                    (
                        (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                        self._cast_for_autocast(_stacked(attn.q_proj, attn.k_proj, attn.v_proj)),
                        self._cast_for_autocast(_effective(attn.o_proj)),
                        (
                            layer.post_attention_layernorm.weight,
                            layer.post_attention_layernorm.variance_epsilon,
                        ),
                        self._cast_for_autocast(_stacked(mlp.gate_proj, mlp.up_proj)),
                        self._cast_for_autocast(_effective(mlp.down_proj)),
                    )
                )
        self._cos = self._sin = None  # rotary tables by position, built on first use
        self.keys: list[torch.Tensor] = []  # per layer (n, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []
        self.length = 0  # cache columns in use

    def _cast_for_autocast(
        self, weight_bias: tuple[torch.Tensor, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A linear layer's weight and bias in the autocast dtype (as is without autocast)."""
        dtype = self.autocast_dtype
        if dtype is None:
            return weight_bias
        weight, bias = weight_bias
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def _rotary(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, 1, w, d) of the positions: rows of tables the model's own rotary module computed once."""
        limit = int(positions.max()) + 1
        if self._cos is None or self._cos.shape[0] < limit:
            size = max(limit, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            cos, sin = self.rotary(like, torch.arange(size, device=like.device)[None])
            self._cos, self._sin = cos[0], sin[0]  # (size, d)
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _reserve(self, n: int, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` columns (capacity doubles, so a growing context costs amortised O(1) per token)."""
        capacity = self.keys[0].shape[2] if self.keys else 0
        if needed <= capacity:
            return
        new = max(needed, 2 * capacity, 64)
        shape = (n, self.num_kv_heads, new, self.head_dim)
        # under autocast, attention reads keys and values in the autocast dtype: stored so, they round the same
        dtype = self.autocast_dtype or like.dtype
        old_keys, old_values = self.keys, self.values
        self.keys = [like.new_zeros(shape, dtype=dtype) for _ in self.layers]
        self.values = [like.new_zeros(shape, dtype=dtype) for _ in self.layers]
        for old, fresh in zip(old_keys + old_values, self.keys + self.values):
            fresh[:, :, : self.length] = old[:, :, : self.length]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """ids, positions (n, w) new tokens; key_mask (n, L) over cached + new tokens -> last column's logits (n, V)."""
        dtype = self.autocast_dtype  # the autocast the engine was built under (a disabled one if none)
        with torch.autocast(self.embed.device.type, dtype=dtype, enabled=dtype is not None):
            return F.linear(self._hidden_states(ids, positions, key_mask)[:, -1], *self.head)  # (n, V)

    def _hidden_states(
        self, ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor
    ) -> torch.Tensor:
        """The final-norm hidden states of every new token: (n, w, H)."""
        n, w = ids.shape
        start, end = self.length, self.length + w
        h = F.embedding(ids, self.embed)  # (n, w, H)
        self._reserve(n, end, h)
        cos, sin = self._rotary(h, positions)
        if w == 1:  # one new token: it sees every real token (its own included); causality holds trivially
            allowed = key_mask.bool()[:, None, None, :end]
        else:  # (n, 1, w, L): a new token sees the real cached tokens and the real new tokens up to itself
            causal = torch.ones((w, end), dtype=torch.bool, device=ids.device).tril(diagonal=start)
            allowed = key_mask.bool()[:, None, None, :end] & causal
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # a padding query sees all: finite, never read
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        half = self.head_dim // 2
        for i, (in_norm, qkv, out, post_norm, gate_up, down) in enumerate(self.layers):
            x = _rms_norm(h, *in_norm)
            q, k, v = F.linear(x, *qkv).split((q_size, kv_size, kv_size), dim=-1)
            qk = (
                torch.cat((q, k), dim=-1).view(n, w, -1, self.head_dim).transpose(1, 2)
            )  # (n, heads + kv, w, d)
            qk = (
                qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            )  # rotary, q and k at once
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v.view(n, w, -1, self.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, :end],
                self.values[i][:, :, :end],
                attn_mask=allowed,
                scale=self.scaling,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (n, heads, w, d)
            h = h + F.linear(attn.transpose(1, 2).reshape(n, w, -1), *out)
            gate, up = F.linear(_rms_norm(h, *post_norm), *gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, *down)
        self.length = end
        return _rms_norm(h, *self.norm)

    def select(self, index: torch.Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def make_decoder(model: nn.Module) -> HFDecoder | LlamaDecoder:
    """The fast Llama engine where the model is one (and its adapters merge exactly), else the model's own forward.

    ValueError for what neither engine samples right: recurrent-state layers, aLoRA adapters."""
    check_adapters_for_sampling(model)
    try:
        return LlamaDecoder(model)
    except NotImplementedError:
        return HFDecoder(model)
