"""Reward stage on a tiny model: a scalar head trained on pairs, held-out accuracy, loadable output."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.cli import compose
from rlhf.models.tiny import prepare_base_model
from rlhf.stages import BASE, reward
from rlhf.stages.base import StageContext, StageResult
from rlhf.tracking.wandb_run import null_tracker
from tests.helpers import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "task.num_preferences=256",
    "task.eval_fraction=0.25",
    "reward.num_train_epochs=2",
    "reward.learning_rate=3e-3",
    "reward.per_device_train_batch_size=16",
    "reward.logging_steps=2",
    "logger=none",
]


def run_reward(tmp_path, overrides, upstream_sft: bool = True):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose([*TINY, *overrides])
    base = prepare_base_model(cfg, tmp_path / BASE)
    upstream = {BASE: StageResult(base)}
    if upstream_sft:
        upstream["sft"] = StageResult(base)  # stands in for an SFT output directory
    ctx = StageContext(
        tmp_path, tmp_path / "reward", seed=5, tracker=null_tracker("reward"), upstream=upstream
    )
    ctx.output_dir.mkdir()
    return base, reward.run(cfg, ctx)


def test_reward_model_learns_preferences(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    base, result = run_reward(tmp_path, [])
    m = result.metrics
    assert 0.6 < m["eval/accuracy"] <= 1.0  # chance is 0.5
    assert m["eval/margin"] > 0
    assert 0.6 < m["eval/gold_accuracy"] <= 1.0
    losses = [float(v) for v in re.findall(r"\[reward\] step \d+ \|.*?train/loss=([-\d.e+]+)", caplog.text)]
    assert len(losses) >= 5 and losses[-1] < losses[0]
    rm = AutoModelForSequenceClassification.from_pretrained(result.artifact)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == 0
    backbone = AutoModelForCausalLM.from_pretrained(base).model.state_dict()
    trained = rm.model.state_dict()
    assert any(not torch.equal(trained[k], backbone[k]) for k in backbone)  # the backbone trains too
    # scores: one scalar per sequence, read at the last real token whatever the padding
    ids = torch.tensor([[0, 0, 3, 4], [3, 4, 0, 0]])
    mask = (ids != 0).long()
    scores = rm(input_ids=ids, attention_mask=mask).logits
    assert scores.shape == (2, 1)


def test_backbone_choice(tmp_path):
    cfg = compose([*TINY, "reward.init_from=/some/dir"])
    ctx = StageContext(tmp_path, tmp_path / "r", 0, null_tracker(), {"sft": StageResult(tmp_path / "sft")})
    assert str(reward.backbone_path(cfg, ctx)) == "/some/dir"
    assert reward.backbone_path(compose(TINY), ctx) == tmp_path / "sft"
    with pytest.raises(ValueError, match="reward.init_from"):
        reward.backbone_path(compose(TINY), StageContext(tmp_path, tmp_path / "r", 0, null_tracker()))


def test_reward_with_lora(tmp_path):
    _, result = run_reward(tmp_path, ["model.lora.r=4", "reward.num_train_epochs=1"], upstream_sft=False)
    rm = AutoModelForSequenceClassification.from_pretrained(result.artifact)
    assert not any("lora" in k for k in rm.state_dict()) and "eval/accuracy" in result.metrics
