"""The update in bounded memory: micro-batches give the whole minibatch's step; the LM head applied a chunk at a
time gives the full logits' log-probabilities, entropies and gradients."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_trainer import BASE, make_trainer, params

from rlhf.ppo.ops import entropy_from_logits, logprobs_from_logits
from rlhf.ppo.rollout import output_head, response_logits, response_logprobs, rollout
from tests.helpers import DialogueEnv, tiny_llama


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_micro_batches_take_the_same_step_as_the_whole_minibatch(tokenizer, tmp_path, advantage):
    """Micro-batches of 3 (not dividing the minibatch of 8; multi-turn, so token counts differ per episode)."""
    grpo = {"kl_in": "loss", "kl_estimator": "k3"} if advantage == "grpo" else {}
    cfg = replace(BASE, advantage=advantage, num_generations=4, **grpo)
    runs = {}
    for micro in (None, 3):
        trainer = make_trainer(
            tokenizer,
            tmp_path / str(micro),
            replace(cfg, micro_batch_size=micro),
            env=DialogueEnv,
            critic=advantage == "gae",
        )
        metrics = trainer.train(max_updates=1)
        critic = trainer.critic.model
        runs[micro] = metrics, params(trainer.unwrapped_policy), critic and params(critic)
    (whole, policy, critic), (micro, policy_m, critic_m) = runs[None], runs[3]
    moved = max((policy[k] - tiny_llama(tokenizer).state_dict()[k]).abs().max() for k in policy)
    assert moved > 1e-4, "the update must move the policy for the comparison to mean anything"
    for k in policy:
        torch.testing.assert_close(policy_m[k], policy[k], atol=2e-6, rtol=1e-5)
    if critic is not None:
        for k in critic:
            torch.testing.assert_close(critic_m[k], critic[k], atol=2e-6, rtol=1e-5)
    for name in ("loss/policy_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg"):
        assert micro[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-6), name


def test_micro_batch_size_below_one_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="ppo.micro_batch_size=0 must be >= 1"):
        make_trainer(tokenizer, tmp_path, replace(BASE, micro_batch_size=0))


@pytest.mark.parametrize("lora", [False, True])
def test_chunked_head_equals_full_logits_in_values_and_gradients(tokenizer, lora):
    model = tiny_llama(tokenizer, eos_bias=0.5)  # an untied head with a bias
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    envs = [DialogueEnv() for _ in range(4)]
    torch.manual_seed(0)
    ro = rollout(
        model, tokenizer, envs, [0, 1, 2, 3], response_length=5, stop_token_ids={tokenizer.eos_token_id}
    )
    head = output_head(model)
    assert head is not None and head.bias is not None
    args = (ro.query_responses, ro.attention_mask, ro.context_length)
    results = []
    for use_head in (None, head):
        model.zero_grad()
        logprobs, entropy = response_logprobs(model, *args, 0.7, use_head)
        mask = ro.action_mask
        (logprobs[mask].sum() + 0.3 * entropy[mask].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp, ent, grads), (lp_c, ent_c, grads_c) = results
    torch.testing.assert_close(lp_c, lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_c, ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_c.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=1e-5, rtol=1e-4)
    # and both equal the plain formula on the model's own logits
    with torch.no_grad():
        logits = response_logits(model, *args)
    torch.testing.assert_close(lp, logprobs_from_logits(logits, ro.response_ids, 0.7), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, entropy_from_logits(logits, 0.7), atol=1e-6, rtol=1e-6)


def test_models_that_rescale_their_logits_are_scored_from_full_logits(tokenizer):
    model = tiny_llama(tokenizer)
    assert output_head(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0
    assert output_head(model) is None
