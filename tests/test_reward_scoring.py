"""PPO and evaluation read a reward model exactly where the reward stage trained and evaluated it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForSequenceClassification
from trl.data_utils import _tokenize

from envs.review import ReviewEnv
from rlhf.models.chat_format import ChatFormat, assistant, user
from rlhf.models.tiny import build_tiny_tokenizer
from rlhf.models.tokenizer import stop_token_ids
from rlhf.ppo.rollout import left_pad
from rlhf.rewards.reward_model import RewardScorer, context_limit, keep_end, plain_text
from rlhf.stages.reward import pair_margins
from tests.architectures import bert_reward_model
from tests.chat_styles import STYLES, chat_model, chat_tokenizer, forcing_head, stop_ids, two_turn_rollout
from tests.helpers import saved_tokenizer, tiny_llama_config


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    # pad = eos, as for SmolLM2
    return saved_tokenizer(build_tiny_tokenizer("bpe", ReviewEnv), tmp_path_factory.mktemp("bpe"))


def llama_reward_model(tokenizer, max_positions: int = 2048) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_llama_config(tokenizer, heads=2, positions=max_positions, num_labels=1)
    return LlamaForSequenceClassification(config).eval()


def as_rollout(fmt: ChatFormat, prompts: list[str], replies: list[str]) -> SimpleNamespace:
    """What a rollout holds for single-turn episodes: left-padded prompt ids, reply ids ending with EOS."""
    queries = [fmt.prompt_ids(p) for p in prompts]
    responses = [fmt.encode(r) + [fmt.end_of_turn_id] for r in replies]
    q_ids, q_mask = left_pad(queries, fmt.tokenizer.pad_token_id)
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), fmt.tokenizer.pad_token_id)
    r_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for i, r in enumerate(responses):
        r_ids[i, : len(r)], r_mask[i, : len(r)] = torch.tensor(r), 1
    turn_eos = torch.zeros_like(r_mask, dtype=torch.bool)
    turn_eos[torch.arange(len(responses)), r_mask.sum(1) - 1] = True
    return SimpleNamespace(
        query_ids=q_ids,
        response_ids=r_ids,
        context_length=q_ids.shape[1],
        query_responses=torch.cat([q_ids, r_ids], 1),
        attention_mask=torch.cat([q_mask, r_mask], 1),
        turn_eos=turn_eos,
        messages=[fmt.conversation([p], [r]) for p, r in zip(prompts, replies)],
    )


def test_scores_equal_the_reward_stage_evaluation_with_pad_equal_to_eos(bpe):
    assert bpe.pad_token_id == bpe.eos_token_id
    model = llama_reward_model(bpe)
    pairs = ReviewEnv.preferences(12, seed=1)
    # the reward stage's own evaluation: TRL tokenizes prompt + chosen through the template, then pair_margins
    tokenized = Dataset.from_list(
        [
            {
                "chosen_ids": _tokenize(bpe, [user(p["prompt"]), assistant(p["chosen"])])["input_ids"],
                "rejected_ids": _tokenize(bpe, [user(p["prompt"]), assistant(p["rejected"])])["input_ids"],
            }
            for p in pairs
        ]
    )
    trained_margins = torch.tensor(pair_margins(model, tokenized, bpe.pad_token_id))

    fmt = ChatFormat(bpe)
    scorer = RewardScorer(model, bpe, bpe)
    assert scorer.token_path
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(as_rollout(fmt, prompts, [p["chosen"] for p in pairs]))
    rejected = scorer.score(as_rollout(fmt, prompts, [p["rejected"] for p in pairs]))
    torch.testing.assert_close(chosen - rejected, trained_margins, rtol=1e-4, atol=1e-5)

    # reading at the last real token (the EOS, the old way) gives other scores
    ro = as_rollout(fmt, prompts, [p["chosen"] for p in pairs])
    at_eos = []
    for ids, mask in zip(ro.query_responses.tolist(), ro.attention_mask.tolist()):
        real = torch.tensor([[t for t, m in zip(ids, mask) if m]])
        hidden = model.model(input_ids=real).last_hidden_state
        at_eos.append(model.score(hidden)[0, -1, 0])
    assert not torch.allclose(torch.stack(at_eos), chosen, atol=1e-3)


def test_a_reward_model_with_its_own_tokenizer_scores_the_decoded_text(bpe):
    model, bert_tokenizer = bert_reward_model(ReviewEnv.vocabulary(), max_positions=512)
    scorer = RewardScorer(model, bert_tokenizer, bpe, batch_size=2)
    assert not scorer.token_path
    prompts = ["review : the film was", "review : the plot is", "review : the cast felt"]
    replies = ["great and lovely", "dull", "boring , but the music was superb overall"]
    scores = scorer.score(as_rollout(ChatFormat(bpe), prompts, replies))
    for prompt, reply, score in zip(prompts, replies, scores):
        text = plain_text([user(prompt), assistant(reply)])
        assert text == f"{prompt} {reply}"
        with torch.no_grad():
            expected = model(**bert_tokenizer(text, return_tensors="pt")).logits[0, 0]
        assert score.item() == pytest.approx(expected.item(), abs=1e-5)


# ---------------------------------------------------------------------- stop ids and cut replies: one layout


@pytest.mark.parametrize("style", list(STYLES))
def test_token_and_text_paths_score_the_same_layout_for_finished_stopped_and_cut_replies(style, tmp_path):
    """A reply closed by the end-of-turn token, one stopped on another stop id (Qwen2.5's <|endoftext|>, Llama 3's
    <|end_of_text|> / <|eom_id|>) and one cut at the length limit are all scored as the template closes a turn:
    the token path (the policy's ids) and the text path (the decoded conversation through the template, what TRL's
    RewardTrainer trained on) give the same ids and scores."""
    tokenizer = chat_tokenizer(style, tmp_path)
    a = tokenizer.convert_tokens_to_ids("a")
    stops = stop_ids(style, tokenizer)
    policy = forcing_head(chat_model(style, tokenizer, tmp_path), {a: 0.0} | {s: -1.0 for s in stops})
    torch.manual_seed(0)
    n = 24
    ro = two_turn_rollout(policy, tokenizer, n, 3, stop_token_ids(tokenizer, "eos", policy.generation_config))
    fmt = ChatFormat(tokenizer)
    eot = fmt.end_of_turn_id
    last_tokens = ro.response_ids[
        torch.arange(n), ro.attention_mask[:, ro.context_length :].sum(1) - 1
    ].tolist()
    assert set(last_tokens) == {a, *stops}, "final replies should end with every stop id, and some be cut"
    first_turn_end = ro.turn_ends.int().argmax(1)
    assert set(ro.response_ids[torch.arange(n), first_turn_end].tolist()) == {a, *stops}

    scorer = RewardScorer(llama_reward_model(tokenizer), tokenizer, tokenizer)
    assert scorer.token_path
    token_ids = scorer.episode_ids(ro)
    token_scores = scorer.score(ro)
    scorer.token_path = False  # the same vocabulary, forced down the text path
    text_ids = scorer.episode_ids(ro)
    assert text_ids == [fmt.template_ids(m) for m in ro.messages]
    for i in range(n):
        assert token_ids[i] == text_ids[i], (
            f"episode {i} ends with {tokenizer.decode(last_tokens[i : i + 1])!r}"
        )
        assert (
            token_ids[i][-1 - len(fmt.encode(fmt.turn_tail))] == eot
        )  # every final turn closed by the template
        assert not set(stops) - {eot} & set(token_ids[i])  # another stop id is no text: the template has none
    torch.testing.assert_close(scorer.score(ro), token_scores, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- the reward model's context


def test_context_limit_is_the_tokenizer_length_capped_by_the_positions():
    model, tokenizer = bert_reward_model(ReviewEnv.vocabulary(), max_positions=64)
    assert tokenizer.model_max_length >= 10**29  # no model_max_length saved: transformers' sentinel
    assert context_limit(model, tokenizer) == 64
    tokenizer.model_max_length = 16
    assert context_limit(model, tokenizer) == 16
    tokenizer.model_max_length = 1e30  # a sentinel written as a float
    assert (
        context_limit(SimpleNamespace(config=SimpleNamespace()), tokenizer) is None
    )  # no positions in the config


def test_keep_end_keeps_the_start_token_and_the_end():
    ids = list(range(10))
    assert keep_end(ids, None) == ids and keep_end(ids, 10, head=1) == ids
    assert keep_end(ids, 4, head=1) == [0, 7, 8, 9]
    assert keep_end(ids, 4) == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="context"):
        keep_end(ids, 1, head=1)


def test_a_bert_reward_model_scores_a_dialogue_past_its_context_on_its_end(bpe):
    model, bert_tokenizer = bert_reward_model(ReviewEnv.vocabulary(), max_positions=24)
    scorer = RewardScorer(model, bert_tokenizer, bpe)
    assert not scorer.token_path and scorer.max_length == 24
    prompts = ["review : the film was", "review : the plot is"]
    replies = ["great " * 40 + "and lovely", "dull"]
    ro = as_rollout(ChatFormat(bpe), prompts, replies)
    ids = scorer.episode_ids(ro)
    full = bert_tokenizer(plain_text(ro.messages[0]))["input_ids"]
    cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    assert len(full) > 24 and full[0] == cls and full[-1] == sep
    assert ids[0] == [cls] + full[-23:] and ids[0][-3:-1] == bert_tokenizer.convert_tokens_to_ids(
        ["and", "lovely"]
    )
    assert ids[1] == bert_tokenizer(plain_text(ro.messages[1]))["input_ids"]  # short: as it was
    assert scorer.num_truncated == 1
    scores = scorer.score(ro)  # past 24 positions the BERT would raise
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids[0]])).logits[0, 0]
    assert scores[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_the_token_path_cuts_a_long_episode_as_the_text_path_does(bpe):
    scorer = RewardScorer(llama_reward_model(bpe, max_positions=20), bpe, bpe)
    assert scorer.token_path and scorer.max_length == 20
    ro = as_rollout(ChatFormat(bpe), ["review : the film was"], ["great " * 30 + "and lovely"])
    token_ids = scorer.episode_ids(ro)[0]
    scorer.token_path = False
    assert scorer.episode_ids(ro)[0] == token_ids
    full = ChatFormat(bpe).template_ids(ro.messages[0])
    assert len(full) > 20 and token_ids == [bpe.bos_token_id] + full[-19:]  # BOS kept, then the reply's end
