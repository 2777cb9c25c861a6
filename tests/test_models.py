"""Tiny model from config, a user's model from a local directory, LoRA, and the refusals (no model, wrong tokenizer)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

from rlhf.cli import compose
from rlhf.models.loading import (
    check_tokenizers_match,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    torch_dtype,
)
from rlhf.models.lora import merge_lora, merged_state_dict
from rlhf.models.tiny import build_tiny_model, prepare_base_model
from rlhf.models.tokenizer import build_tokenizer
from tests.helpers import TINY_MODEL


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = compose(TINY_MODEL)
    return prepare_base_model(cfg, tmp_path_factory.mktemp("base"))


def test_tiny_model_matches_tokenizer():
    cfg = compose(TINY_MODEL)
    tok = build_tokenizer(["a", "b", "c"])
    model = build_tiny_model(cfg.model, tok)
    assert model.config.vocab_size == len(tok) == 7  # 3 special tokens, 3 words, then <reply>
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == cfg.model.num_layers
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert logits.shape == (1, 3, 7)


def test_prepare_base_model_saves_a_loadable_tiny_model(base_dir):
    assert (base_dir / "config.json").exists() and (base_dir / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(base_dir)  # plain transformers loads it
    tok = load_tokenizer(base_dir)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert "review" in tok.get_vocab()  # the task's vocabulary
    mtime = (base_dir / "model.safetensors").stat().st_mtime
    assert prepare_base_model(compose(TINY_MODEL), base_dir) == base_dir  # reused, not rebuilt
    assert (base_dir / "model.safetensors").stat().st_mtime == mtime


def test_hf_model_from_local_directory(base_dir):
    cfg = compose(["model=hf", f"model.name_or_path={base_dir}"])
    assert prepare_base_model(cfg, base_dir.parent / "unused") == base_dir
    model = load_causal_lm(cfg.model.name_or_path)
    assert isinstance(model, PreTrainedModel)
    reward = load_reward_model(cfg.model.name_or_path)
    assert isinstance(reward, AutoModelForSequenceClassification._model_mapping[type(reward.config)])
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == 0
    assert reward(torch.tensor([[3, 4, 5]])).logits.shape == (1, 1)


def test_lora_trains_only_adapters_and_merges_back(base_dir):
    cfg = compose([*TINY_MODEL, "model.lora.r=4"])
    model = load_causal_lm(base_dir, lora=cfg.model.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    ids = torch.tensor([[3, 4, 5]])
    expected = model(ids).logits
    merged = merge_lora(model)
    assert isinstance(merged, PreTrainedModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
    seq = load_reward_model(base_dir, lora=cfg.model.lora)
    names = {n for n, p in seq.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in names) and any("score" in n for n in names)  # the new head trains too


@pytest.mark.parametrize("kind", ["causal", "reward"])
def test_merged_state_dict_equals_peft_merge(base_dir, kind):
    """The state-dict merge (what an FSDP export uses: the module's own parameters are shards there) gives exactly
    the weights of peft's in-place merge, the reward model's trained head (modules_to_save) included."""
    import copy

    lora = compose([*TINY_MODEL, "model.lora.r=4"]).model.lora
    model = (load_causal_lm if kind == "causal" else load_reward_model)(base_dir, lora=lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # adapters and the head, as training leaves them
                p.add_(0.1 * torch.randn_like(p))
    state = merged_state_dict(model, model.state_dict())
    expected = merge_lora(copy.deepcopy(model)).state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], atol=1e-6, rtol=0, msg=key)
    plain = build_tiny_model(compose(TINY_MODEL).model, load_tokenizer(base_dir))
    plain_state = plain.state_dict()
    assert merged_state_dict(plain, plain_state) is plain_state  # no adapters: the state as it is


def test_refusals(base_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere")
    # a tokenizer with more tokens than the model embeds
    bad = tmp_path / "bad"
    AutoModelForCausalLM.from_pretrained(base_dir).save_pretrained(bad)
    build_tokenizer([f"w{i}" for i in range(500)]).save_pretrained(bad)
    with pytest.raises(ValueError, match="embeds only"):
        load_causal_lm(bad)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_tokenizers_match(load_tokenizer(base_dir), load_tokenizer(bad), "policy vs reward model")
    check_tokenizers_match(load_tokenizer(base_dir), load_tokenizer(base_dir), "same")


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        torch_dtype("fp8")
