"""KVSampler and its decoders: the logits they sample from equal the model's own forward over the unpadded episode.

The fast Llama engine, the generic HF engine, shared group prompts, multi-turn cache reuse and dropped rows are
each checked against a plain reference: one forward pass of the model over a single episode's real tokens.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from rlhf.ppo.decoder import HFDecoder, LlamaDecoder, make_decoder
from rlhf.ppo.sampler import KVSampler, draw_categorical
from tests.helpers import tiny_llama, tiny_llama_config
from tests.numerics import kernel_tolerance

pytestmark = pytest.mark.numerics  # engines against the model's forward: other kernels, so run under AVX2 too


def gqa_llama(vocab: int) -> LlamaForCausalLM:
    """Grouped-query attention (2 key/value heads for 4 query heads), untied head, as SmolLM2 has GQA."""
    torch.manual_seed(1)
    cfg = tiny_llama_config(vocab_size=vocab, kv_heads=2, intermediate_size=48, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def lora_llama(tokenizer):
    """A LoRA policy whose adapters are non-zero (peft initialises B to 0, which would hide a mistake)."""
    model = get_peft_model(
        tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def tiny_gpt2(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def reference_next_logits(model, tokens: list[int]) -> torch.Tensor:
    """The model's own logits for the token after `tokens` (one unpadded sequence): (V,)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1].float()


def sampler_for(model, tokenizer, temperature=1.0):
    return KVSampler(model, temperature=temperature, stop_token_ids={tokenizer.eos_token_id}, pad_token_id=0)


MODELS = {
    "llama": lambda tok: tiny_llama(tok),
    "llama-gqa": lambda tok: gqa_llama(len(tok)),
    "llama-lora": lora_llama,
    "gpt2": lambda tok: tiny_gpt2(len(tok)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_choice(tokenizer, name):
    model = MODELS[name](tokenizer)
    expected = HFDecoder if name == "gpt2" else LlamaDecoder
    assert type(make_decoder(model)) is expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_decode_and_next_turn_logits_equal_the_unpadded_forward(tokenizer, name):
    """Contexts of different lengths (left padding), replies that stop at different steps (holes), and a second
    turn whose new tokens differ in length per row: every row's next-token logits are the model's own."""
    model = MODELS[name](tokenizer)
    torch.manual_seed(0)
    contexts = [[5, 6, 7, 8, 9], [6], [7, 8, 9]]
    s = sampler_for(model, tokenizer)
    s.start(contexts)
    for i, c in enumerate(contexts):
        torch.testing.assert_close(
            s.next_logits[i].float(), reference_next_logits(model, c), atol=1e-5, rtol=1e-5
        )
    replies, logprobs = s.sample(6)
    # the log-probabilities returned are those of the reference forward over context + reply
    for c, r, lp in zip(contexts, replies, logprobs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([c + r])).logits[0, len(c) - 1 : -1].float()
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp), expected, atol=1e-5, rtol=1e-5)
    new = [[4, 5], [6, 7, 8, 9], [5]]
    s.extend(new)
    for i, (c, r, m) in enumerate(zip(contexts, replies, new)):
        torch.testing.assert_close(
            s.next_logits[i].float(), reference_next_logits(model, c + r + m), atol=1e-5, rtol=1e-5
        )


def test_a_shared_prompt_is_prefilled_once_and_keep_drops_rows(tokenizer, monkeypatch):
    model = tiny_llama(tokenizer)
    seen = []

    class Counting(LlamaDecoder):
        def forward(self, ids, positions, key_mask):
            seen.append(ids.shape[0])
            return super().forward(ids, positions, key_mask)

    monkeypatch.setattr("rlhf.ppo.sampler.make_decoder", Counting)
    s = sampler_for(model, tokenizer)
    seen.clear()
    s.start([[5, 6], [5, 6], [5, 6], [7], [7], [7]])
    assert seen == [2], "two distinct prompts: one prefill row each"
    assert len(s) == 6
    torch.testing.assert_close(s.next_logits[0], s.next_logits[2])
    torch.testing.assert_close(
        s.next_logits[3].float(), reference_next_logits(model, [7]), atol=1e-5, rtol=1e-5
    )
    s.sample(3)
    s.keep([5, 1])
    assert len(s) == 2 and s.mask.shape[0] == 2
    s.extend([[4], [8, 9]])
    assert s.next_logits.shape[0] == 2


def test_greedy_replies_equal_plain_generate(tokenizer):
    """The reference sampler: HF generate, greedy, on the same left-padded batch, for both engines."""
    for model in (tiny_llama(tokenizer, eos_bias=0.5), tiny_gpt2(len(tokenizer))):
        contexts = [[5, 6, 7], [8], [9, 5]]
        s = sampler_for(model, tokenizer, temperature=0.0)
        s.start(contexts)
        replies, _ = s.sample(8)
        for c, r in zip(contexts, replies):
            out = model.generate(
                input_ids=torch.tensor([c]),
                attention_mask=torch.ones(1, len(c), dtype=torch.long),
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=0,
            )[0, len(c) :].tolist()
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id) + 1]
            assert r == out


def test_lora_engine_follows_disabled_adapters(tokenizer):
    """Built while the adapters are disabled (the LoRA reference), the engine computes the base model."""
    model = lora_llama(tokenizer)
    with model.disable_adapter():
        s = sampler_for(model, tokenizer)
        s.start([[5, 6, 7]])
        base = reference_next_logits(model, [5, 6, 7])
    torch.testing.assert_close(s.next_logits[0].float(), base, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, reference_next_logits(model, [5, 6, 7]), atol=1e-3)


def test_over_long_context_is_a_clear_error(tokenizer):
    model = tiny_llama(tokenizer)
    s = sampler_for(model, tokenizer)
    s.start([[5] * 120])
    with pytest.raises(ValueError, match="max_position_embeddings 128"):
        s.sample(16)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_scoring_pass_equals_the_models_own_forward(tokenizer, name):
    """`sequence_logprobs` (chunked, the LM head applied to the last hidden states) equals log-softmax of the
    model's own logits."""
    from rlhf.ppo.ops import logprobs_from_logits
    from rlhf.ppo.rollout import left_pad, response_logits, sequence_logprobs

    model = MODELS[name](tokenizer)
    queries, mask_q = left_pad([[5, 6, 7], [8], [9, 5]], 0)
    responses = torch.tensor([[4, 5, 6, 0], [7, 8, 0, 0], [9, 4, 5, 6]])
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([mask_q, (responses != 0).long()], 1)
    got = sequence_logprobs(model, ids, mask, 3, temperature=0.7, batch_size=2)
    with torch.no_grad():
        expected = logprobs_from_logits(response_logits(model, ids, mask, 3), responses, 0.7)
    real = responses != 0
    torch.testing.assert_close(got[real], expected[real].float(), atol=1e-5, rtol=1e-5)


def test_draw_categorical_follows_the_probabilities_and_never_draws_a_zero():
    """Inverse-CDF sampling against the distribution itself: frequencies over many rows, zeros (leading, inner and
    trailing) never drawn, unnormalised rows, and a row that is all on one token."""
    torch.manual_seed(0)
    p = torch.tensor([0.0, 0.2, 0.0, 1.2, 0.6, 0.0])  # sums to 2: proportional, not normalised
    rows = 40_000
    drawn = draw_categorical(p.expand(rows, -1))
    assert drawn.shape == (rows,) and drawn.dtype == torch.long
    freq = torch.bincount(drawn, minlength=p.numel()).float() / rows
    assert freq[p == 0].sum() == 0
    torch.testing.assert_close(freq, p / p.sum(), atol=0.01, rtol=0)  # ~4 standard errors at p = 0.3
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(1000, -1)
    assert (draw_categorical(one_hot) == 2).all()
    # rows are independent: a batch of two different rows
    two = draw_categorical(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(500, 1))
    assert (two.view(500, 2) == torch.tensor([0, 1])).all()


@pytest.mark.parametrize("name", ["llama", "llama-gqa", "llama-lora"])
def test_under_autocast_the_llama_engine_computes_the_models_autocast_forward(tokenizer, name):
    """Built under bf16 autocast (mixed precision), the engine holds bf16 weight copies and a bf16 cache, and its
    logits are the model's own forward under the same autocast, up to bf16 roundings that land on the other side.

    Not bit for bit: the engine attends over its cache (left padding, a reply's holes, more columns than the
    episode), the model's forward over the unpadded episode, and the CPU flash-attention kernel in bf16 rounds the
    softmax weights to bf16 per key block after an exp whose vectorised lanes (8 floats on AVX2, 16 on AVX-512) and
    scalar tail depend on where the real keys sit. On AVX-512 the logits here came out equal; with AVX2 kernels
    two of them moved by one bf16 step (4.9e-4 at |logit| ~0.1). With the math SDPA backend they are equal on both,
    so the difference is the attention kernel's, not the engine's. Tolerance: `kernel_tolerance` (tests/numerics.py),
    2 bf16 ulps at the logits' scale (one flip at the head's output, one carried from upstream); with LoRA 3 more
    (peft's forward rounds x A, (x A) B s and the sum in bf16; the engine merges the adapters in float32 first)."""
    model = MODELS[name](tokenizer)
    contexts, new = [[5, 6, 7, 8, 9], [6], [7, 8, 9]], [[4, 5], [6, 7, 8, 9], [5]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = sampler_for(model, tokenizer)
        s.start(contexts)
        torch.manual_seed(0)
        replies, _ = s.sample(6)
        s.extend(new)
        episodes = [c + r + m for c, r, m in zip(contexts, replies, new)]
        autocast_logits = [reference_next_logits(model, e) for e in episodes]
    assert s.decoder.head[0].dtype == s.decoder.keys[0].dtype == torch.bfloat16
    flips = 5 if name == "llama-lora" else 2
    for i, e in enumerate(episodes):
        engine = s.next_logits[i].float()
        atol = kernel_tolerance(torch.bfloat16, autocast_logits[i], flips)
        torch.testing.assert_close(engine, autocast_logits[i], atol=atol, rtol=0)
        # both differ measurably from the float32 forward (by 10x the float32 tolerance of the tests above): the
        # engine computes in bf16, and the comparison above sees bf16 arithmetic
        float32_logits = reference_next_logits(model, e)
        assert (float32_logits - autocast_logits[i]).abs().max() > 1e-4
        assert (float32_logits - engine).abs().max() > 1e-4
    # outside autocast the engine keeps computing as it was built
    s.extend([[5], [6], [7]])
    assert s.next_logits.dtype == torch.bfloat16
