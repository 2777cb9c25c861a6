"""The offline word-level tokenizer: special ids, padding side, round trips, and the token-in/token-out chat layout."""

from __future__ import annotations

import pytest

from rlhf.models.tokenizer import EOS, PAD, REPLY, UNK, build_tokenizer, load_tokenizer

WORDS = ["review", ":", "the", "film", "was", "great", "bad", ",", "guess", "higher", "5", "7"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


def test_special_tokens_and_ids(tok):
    assert (tok.pad_token, tok.unk_token, tok.eos_token) == (PAD, UNK, EOS)
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.bos_token is None
    assert len(tok) == 3 + len(WORDS) + 1  # the words, then <reply>
    assert tok.convert_tokens_to_ids(REPLY) == 3 + len(WORDS)
    assert tok.padding_side == "left"


def test_words_map_one_to_one_and_decode_joins_with_spaces(tok):
    ids = tok("review : the film was great")["input_ids"]
    assert ids == [3, 4, 5, 6, 7, 8]  # no BOS, no post-processor
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "review : the film was great"
    assert tok("unknownword")["input_ids"] == [tok.unk_token_id]
    # TRL appends the eos string without a space: it must still split off as its own token
    assert tok("was great" + EOS)["input_ids"] == [7, 8, 2]


def test_concatenation_equals_joined_text(tok):
    a, b = "review : the film", "was bad"
    assert tok(a)["input_ids"] + tok(b)["input_ids"] == tok(a + " " + b)["input_ids"]


def test_left_padding(tok):
    batch = tok(["the film", "review : the film was"], padding=True)
    assert batch["input_ids"][0][:3] == [0, 0, 0]
    assert batch["attention_mask"][0] == [0, 0, 0, 1, 1]


def test_chat_template_is_token_in_token_out(tok):
    messages = [
        {"role": "user", "content": "guess"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "higher"},
        {"role": "assistant", "content": "7"},
    ]
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    reply = tok.convert_tokens_to_ids(REPLY)
    expected = []
    for m in messages:
        expected += tok(m["content"])["input_ids"]
        expected.append(tok.eos_token_id if m["role"] == "assistant" else reply)
    assert out["input_ids"] == expected
    # the loss mask covers the replies and their stop token, not the environment's messages
    mask = out["assistant_masks"]
    assert [i for i, m in zip(out["input_ids"], mask) if m] == tok("5")["input_ids"] + [2] + tok("7")[
        "input_ids"
    ] + [2]
    prompt = tok.apply_chat_template(
        messages[:1], tokenize=True, add_generation_prompt=True, return_dict=True
    )
    assert prompt["input_ids"] == tok("guess")["input_ids"] + [reply]


def test_save_and_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.padding_side == "left" and loaded.pad_token == PAD
    assert loaded.chat_template == tok.chat_template


def test_bad_vocabulary_and_missing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="without whitespace"):
        build_tokenizer(["two words"])
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
