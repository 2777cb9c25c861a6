"""Float32 attention for low-precision training on CPU (`rlhf.models.attention`): where it applies, what it computes, and
that the models the loaders hand out use it without saving it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import rlhf.models.attention as attention
from rlhf.models.attention import FLOAT32_CPU_SDPA, float32_cpu_sdpa, use_float32_cpu_attention
from rlhf.models.loading import load_causal_lm, load_reward_model
from rlhf.models.tokenizer import build_tokenizer
from tests.helpers import tiny_llama_config


def gqa_llama() -> LlamaForCausalLM:
    """Grouped-query attention (SmolLM2 has 9 query / 3 key-value heads)."""
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=40, width=48, heads=6, kv_heads=2, positions=64, intermediate_size=64
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def seen_dtypes(monkeypatch):
    """The dtype each SDPA call computes in: autocast's where it is on (it casts SDPA's inputs), else the query's."""
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recording)
    return seen


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def test_trained_forwards_under_bf16_autocast_attend_in_float32_and_no_grad_passes_do_not(seen_dtypes):
    model = gqa_llama()
    use_float32_cpu_attention(model)
    ids, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert seen_dtypes == [torch.float32] * 2  # both layers
        seen_dtypes.clear()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        assert seen_dtypes == [torch.bfloat16] * 2  # a no-grad pass: torch's bf16 forward is the faster one
    seen_dtypes.clear()
    model(input_ids=ids, attention_mask=mask)  # float32 without autocast: unchanged
    assert seen_dtypes == [torch.float32] * 2
    logits.float().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_it_computes_sdpa_on_the_float32_inputs_and_returns_the_autocast_dtype():
    module = gqa_llama().model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 6, 5, 8, generator=gen).requires_grad_()
    key, value = (torch.randn(2, 2, 5, 8, generator=gen).to(torch.bfloat16) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = float32_cpu_sdpa(
            module, query, key, value, None, dropout=0.0, scaling=8**-0.5, is_causal=True
        )
        bf16_out, _ = sdpa_attention_forward(
            module, query, key, value, None, dropout=0.0, scaling=8**-0.5, is_causal=True
        )
    want, _ = sdpa_attention_forward(
        module, query, key.float(), value.float(), None, dropout=0.0, scaling=8**-0.5, is_causal=True
    )
    assert out.dtype == bf16_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want.to(torch.bfloat16), atol=0, rtol=0)
    out.float().sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()


def test_the_loaders_switch_models_to_it_and_a_saved_model_loads_with_the_default(tmp_path):
    gqa_llama().save_pretrained(tmp_path / "m")
    build_tokenizer(["a", "b", "c"]).save_pretrained(tmp_path / "m")  # the reward loader reads its pad id
    policy = load_causal_lm(tmp_path / "m")
    assert policy.config._attn_implementation == FLOAT32_CPU_SDPA
    assert load_reward_model(tmp_path / "m").config._attn_implementation == FLOAT32_CPU_SDPA
    policy.save_pretrained(tmp_path / "saved")
    assert FLOAT32_CPU_SDPA not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"


def test_other_attention_implementations_are_left_alone():
    model = gqa_llama()
    model.set_attn_implementation("eager")
    use_float32_cpu_attention(model)
    assert model.config._attn_implementation == "eager"
