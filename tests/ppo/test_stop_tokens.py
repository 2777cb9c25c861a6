"""Every id of the model's generation_config.eos_token_id ends a reply, on Qwen2.5- and Llama-3-style tokenizers.

Qwen2.5-Instruct closes a turn with <|im_end|> but also stops on <|endoftext|>; Llama 3 Instruct stops on
<|end_of_text|>, <|eom_id|> and <|eot_id|>. A bias-only head chooses which stop id the policy draws.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from rlhf.models.chat_format import ChatFormat
from rlhf.models.tokenizer import stop_token_ids
from rlhf.ppo.rollout import sequence_logprobs
from rlhf.ppo.sampler import KVSampler
from rlhf.ppo.trainer import PPOTrainer
from rlhf.stages.evaluate import evaluate_policy
from tests.chat_styles import (
    STYLES,
    TwoTurnEnv,
    chat_model,
    chat_tokenizer,
    forcing_head,
    stop_ids,
    two_turn_rollout,
)
from tests.helpers import ppo_config

CASES = [(style, k) for style in STYLES for k in range(len(STYLES[style]["stops"]))]
"""(style, index of the stop id the policy is made to draw)."""


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """style -> (tokenizer, model dir, model) built once per module."""
    built = {}
    for style in STYLES:
        path = tmp_path_factory.mktemp(style.replace(".", ""))
        tokenizer = chat_tokenizer(style, path)
        built[style] = (tokenizer, path, chat_model(style, tokenizer, path))
    return built


@pytest.mark.parametrize("style", list(STYLES))
def test_eos_means_the_tokenizer_eos_and_every_generation_config_id(chat, style):
    tokenizer, path, model = chat[style]
    expected = frozenset(stop_ids(style, tokenizer)) | {tokenizer.eos_token_id}
    assert len(expected) == len(STYLES[style]["stops"]) > 1
    assert stop_token_ids(tokenizer, "eos", model.generation_config) == expected
    assert stop_token_ids(tokenizer, "eos", GenerationConfig.from_pretrained(path)) == expected
    assert stop_token_ids(tokenizer, "eos") == {tokenizer.eos_token_id}  # no generation config: the EOS alone
    explicit = STYLES[style]["stops"][0]
    assert stop_token_ids(tokenizer, explicit, model.generation_config) == {
        tokenizer.convert_tokens_to_ids(explicit)
    }
    assert stop_token_ids(tokenizer, None, model.generation_config) == frozenset()
    single = GenerationConfig(eos_token_id=tokenizer.eos_token_id)  # an int, as most configs write it
    assert stop_token_ids(tokenizer, "eos", single) == {tokenizer.eos_token_id}
    with pytest.raises(ValueError, match="not a token"):
        stop_token_ids(tokenizer, "<|nope|>", model.generation_config)


def forced(chat, style: str, k: int, stop_bias: float = 0.0):
    """The style's model drawing "a" or its k-th stop id (every other token -30)."""
    tokenizer, _, model = chat[style]
    a = tokenizer.convert_tokens_to_ids("a")
    stop = stop_ids(style, tokenizer)[k]
    return tokenizer, forcing_head(model, {a: 0.0, stop: stop_bias}), a, stop


@pytest.mark.parametrize("style,k", CASES)
def test_the_sampler_stops_a_row_on_each_stop_id_and_keeps_it(chat, style, k):
    tokenizer, model, a, stop = forced(chat, style, k, stop_bias=-1.5)
    stops = stop_token_ids(tokenizer, "eos", model.generation_config)
    prompt = ChatFormat(tokenizer).prompt_ids("go x y")
    torch.manual_seed(0)
    sampler = KVSampler(model, temperature=1.0, stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id)
    sampler.start([prompt] * 16)
    replies, logprobs = sampler.sample(6)
    stopped = [r for r in replies if r[-1] == stop]
    assert 0 < len(stopped) < len(replies), "some rows should stop, some run to the limit"
    for reply, lp in zip(replies, logprobs):
        if reply[-1] == stop:  # the stop id is the reply's last token
            assert reply == [a] * (len(reply) - 1) + [stop]
        else:
            assert reply == [a] * 6
        # every token, the stop id included, with its log-probability under the model
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(1, torch.tensor(reply)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lp), expected, atol=1e-5, rtol=0)

    # only the tokenizer's EOS (the old behaviour): another stop id does not end the reply
    if stop != tokenizer.eos_token_id:
        torch.manual_seed(0)
        only_eos = KVSampler(
            model,
            temperature=1.0,
            stop_token_ids={tokenizer.eos_token_id},
            pad_token_id=tokenizer.pad_token_id,
        )
        only_eos.start([prompt] * 16)
        replies, _ = only_eos.sample(6)
        assert all(len(r) == 6 for r in replies) and any(stop in r[:-1] for r in replies)


@pytest.mark.parametrize("style,k", CASES)
def test_rollout_ends_turns_on_each_stop_id_and_closes_them_with_the_end_of_turn(chat, style, k):
    tokenizer, model, a, stop = forced(chat, style, k, stop_bias=-0.5)
    fmt = ChatFormat(tokenizer)
    eot = fmt.end_of_turn_id
    stops = stop_token_ids(tokenizer, "eos", model.generation_config)
    torch.manual_seed(1)
    n = 16
    ro = two_turn_rollout(model, tokenizer, n, 4, stops)
    assert ro.num_turns.eq(2).all()
    # the cache held exactly the episode's tokens: the sampler's log-probabilities are those of one fresh forward
    fresh = sequence_logprobs(model, ro.query_responses, ro.attention_mask, ro.context_length)
    torch.testing.assert_close(ro.logprobs, fresh.masked_fill(~ro.action_mask, 0.0), atol=1e-5, rtol=0)
    kinds = set()
    for i in range(n):
        response = ro.response_ids[i].tolist()
        ends = ro.turn_ends[i].nonzero().flatten().tolist()
        for turn, pos in enumerate(ends):
            last = response[pos]
            stopped = last == stop
            kinds.add(stopped)
            # the turn ended by itself on any stop id: turn_eos, ended_with_eos (val/num_eos_tokens), no penalty
            assert ro.turn_eos[i, pos].item() == stopped == ro.ended_with_eos[i, turn].item()
            assert last in (a, stop)
            if turn == 0:  # the next user turn follows the template's end-of-turn token, added unless sampled
                after = response[pos + 1 :]
                closing = [] if last == eot else [eot]
                user_turn = fmt.env_turn_ids("more z", reply_ended=True)
                assert after[: len(closing) + len(user_turn)] == closing + user_turn
                assert not ro.action_mask[i, pos + 1 : pos + 1 + len(closing) + len(user_turn)].any()
    assert kinds == {True, False}, "some turns should stop on the stop id, some be cut"


def test_the_trainer_stops_on_the_generation_config_ids_and_penalises_only_turns_without_one(chat, tmp_path):
    tokenizer, model, a, stop = forced(chat, "qwen2.5", 1, stop_bias=-0.5)  # <|endoftext|>, never <|im_end|>
    assert stop != tokenizer.eos_token_id
    cfg = ppo_config(
        advantage="rloo",
        num_generations=2,
        batch_size=8,
        total_episodes=8,
        response_length=4,
        missing_eos_penalty=1.0,
    )
    trainer = PPOTrainer(
        cfg, model, tokenizer, TwoTurnEnv, output_dir=tmp_path, ref_policy=copy.deepcopy(model), seed=0
    )
    assert trainer.stop_token_ids == {tokenizer.eos_token_id, stop}
    ro = trainer.rollout()
    total = trainer.score(ro).scores
    stopped = ro.turn_eos[ro.turn_ends]
    assert stopped.any() and not stopped.all()
    missing = (ro.turn_ends & ~ro.turn_eos).sum(1).float()
    torch.testing.assert_close(total, ro.env_rewards - missing)


def test_evaluation_stops_on_the_generation_config_ids(chat):
    tokenizer, model, a, stop = forced(chat, "llama3", 1, stop_bias=0.0)  # <|eom_id|>, never <|eot_id|>
    cfg = SimpleNamespace(
        evaluate=SimpleNamespace(temperature=1.0),
        ppo=SimpleNamespace(stop_token="eos", response_length=8, forward_batch_size=8),
    )
    torch.manual_seed(0)
    envs = [TwoTurnEnv() for _ in range(8)]
    result = evaluate_policy(cfg, model, model, None, tokenizer, envs, list(range(8)))
    # half the draws are <|eom_id|>: replies stop after ~2 tokens, far from 2 turns x 8
    assert result["metrics"]["response_length"] < 8
    assert all("<|eom_id|>" in row[1] for row in result["rows"])
