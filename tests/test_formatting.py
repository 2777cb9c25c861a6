"""The one formatting path: rollout ids equal the chat template's, on the kind of tokenizer real models have."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import envs
from envs.guess import GuessNumberEnv
from envs.review import ReviewEnv
from rlhf.models.chat_format import ChatFormat, FormatMismatch, assistant, user
from rlhf.models.tiny import build_tiny_tokenizer
from rlhf.ppo.rollout import fit_action, rollout
from tests.helpers import biased_head, saved_tokenizer, tiny_llama_config


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return saved_tokenizer(build_tiny_tokenizer("bpe", GuessNumberEnv), tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def word(tmp_path_factory):
    return saved_tokenizer(build_tiny_tokenizer("word", GuessNumberEnv), tmp_path_factory.mktemp("word"))


def test_bpe_stand_in_has_real_tokenizer_traits(bpe):
    assert bpe.pad_token_id == bpe.eos_token_id  # no pad token of its own: pad = eos
    assert (
        bpe.eos_token == "<|im_end|>"
        and bpe.bos_token_id is not None
        and bpe.bos_token_id != bpe.eos_token_id
    )
    word_lengths = [len(bpe("superbly delightful")["input_ids"])]
    assert max(word_lengths) > 2  # merges: a rare word is several tokens
    text = bpe.apply_chat_template([user("hi"), assistant("yo")], tokenize=False)
    assert text.startswith(bpe.bos_token) and text.endswith("<|im_end|>\n")


def test_prompt_is_the_user_turn_and_generation_prompt(bpe):
    fmt = ChatFormat(bpe)
    ids = fmt.prompt_ids("guess a number from 1 to 16 :")
    assert ids[0] == bpe.bos_token_id
    assert bpe.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids == fmt.template_ids([user("guess a number from 1 to 16 :")], generation_prompt=True)


def test_env_turn_follows_the_end_of_turn_token_and_closes_a_cut_reply(bpe):
    fmt = ChatFormat(bpe)
    after_eos = fmt.env_turn_ids("higher", reply_ended=True)
    assert bpe.decode(after_eos) == "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n"
    cut = fmt.env_turn_ids("higher", reply_ended=False)
    assert cut == [bpe.eos_token_id, *after_eos]
    assert fmt.reward_suffix_ids(reply_ended=True) == fmt.encode("\n")
    # a reward model is read where the template closes the last turn, for a cut reply too
    assert fmt.reward_suffix_ids(reply_ended=False) == [bpe.eos_token_id, *fmt.encode("\n")]


@pytest.mark.parametrize("kind", ["bpe", "word"])
def test_pieces_concatenate_to_the_template(kind, bpe, word):
    fmt = ChatFormat(bpe if kind == "bpe" else word)
    fmt.check_consistency(["guess a number from 1 to 16 :", "higher", "lower"], ["8", "12", "10"])


def test_word_level_turns_end_with_the_reply_marker(word):
    """The environment's text is kept as is and followed by <reply>, where the policy's reply starts."""
    fmt = ChatFormat(word)
    reply = word.convert_tokens_to_ids("<reply>")
    assert fmt.prompt_ids("guess a number from 1 to 16 :") == fmt.encode("guess a number from 1 to 16 :") + [
        reply
    ]
    assert fmt.env_turn_ids("higher", reply_ended=True) == fmt.encode("higher") + [reply]


def test_a_template_whose_turns_do_not_end_with_eos_is_refused(bpe):
    tok = build_tiny_tokenizer("bpe", GuessNumberEnv)
    tok.eos_token = tok.bos_token  # an EOS the template never writes at the end of a turn
    with pytest.raises(FormatMismatch, match="EOS"):
        ChatFormat(tok).check_consistency(["a", "b"], ["c", "d"])


def test_multi_turn_rollout_equals_the_template_and_envs_get_plain_text(bpe):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(bpe, layers=1, heads=2, positions=512))
    biased_head(model, {bpe.eos_token_id: 6.0})  # the end-of-turn token likely: turns end by themselves
    fmt = ChatFormat(bpe)
    env_list = [envs.make("rlhf/GuessNumber-v0") for _ in range(8)]
    ro = rollout(
        model,
        bpe,
        env_list,
        list(range(8)),
        response_length=6,
        stop_token_ids={bpe.eos_token_id},
        max_turns=3,
    )
    specials = set(bpe.added_tokens_decoder)  # the special tokens and the template's markers (<|im_start|>)
    checked = 0
    for i in range(len(ro)):
        real = [t for t, m in zip(ro.query_responses[i].tolist(), ro.attention_mask[i].tolist()) if m]
        actions = ro.response_ids[i][ro.action_mask[i]].tolist()
        # the env saw decoded text without special tokens
        assert all(not any(s in reply for s in ("<|im_end|>", "<|im_start|>")) for reply in ro.replies[i])
        turns_ended = ro.turn_eos[i][ro.turn_ends[i]].all().item()
        if turns_ended and not (set(actions) - {bpe.eos_token_id}) & specials:
            # token-in/token-out reproduces the template's text of the conversation exactly
            assert bpe.decode(real) + "\n" == fmt.render(ro.messages[i])
            checked += 1
    assert checked > 0


def test_fit_action_keeps_replies_inside_the_action_space():
    space = envs.make("rlhf/Review-v0").action_space
    assert fit_action("Great film – really good!", space) == "reat film  really good"
    assert len(fit_action("good " * 500, space)) <= space.max_length
    assert fit_action("anything", None) == "anything"


def test_sft_and_reward_data_are_conversations_for_a_chat_tokenizer(bpe):
    from rlhf.cli import compose
    from rlhf.task.data import preference_splits, sft_splits

    cfg = compose(["task.num_demonstrations=20", "task.num_preferences=20", "logger=none"])
    train, _ = sft_splits(cfg, 0, chat=True)
    assert train[0]["prompt"][0]["role"] == "user" and train[0]["completion"][0]["role"] == "assistant"
    pairs, _ = preference_splits(cfg, 0, chat=True)
    assert pairs[0]["chosen"][0]["role"] == "assistant"
    plain, _ = sft_splits(cfg, 0, chat=False)
    assert isinstance(plain[0]["prompt"], str) and plain[0]["completion"].startswith(" ")
    assert ReviewEnv.gold_reward(train[0]["prompt"][0]["content"], train[0]["completion"][0]["content"]) >= 0
