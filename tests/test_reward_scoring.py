"""PPO and evaluation read a reward model exactly where the reward stage trained and evaluated it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from trl.data_utils import _tokenize

from envs.review import ReviewEnv
from rlhf.formatting import ChatFormat, assistant, user
from rlhf.models import build_tiny_tokenizer, load_tokenizer
from rlhf.ppo.rollout import left_pad
from rlhf.reward_scoring import RewardScorer, plain_text
from rlhf.stages.reward import pair_margins


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe")
    build_tiny_tokenizer("bpe", ReviewEnv).save_pretrained(path)
    return load_tokenizer(path)  # pad = eos, as for SmolLM2


def llama_reward_model(tokenizer) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
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
    return SimpleNamespace(
        query_ids=q_ids,
        query_responses=torch.cat([q_ids, r_ids], 1),
        attention_mask=torch.cat([q_mask, r_mask], 1),
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


def bert_reward_model() -> tuple[BertForSequenceClassification, PreTrainedTokenizerFast]:
    """A tiny BERT with a WordPiece tokenizer: another architecture and vocabulary than the policy's."""
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ReviewEnv.vocabulary()])
    }
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval(), tokenizer


def test_a_reward_model_with_its_own_tokenizer_scores_the_decoded_text(bpe):
    model, bert_tokenizer = bert_reward_model()
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
