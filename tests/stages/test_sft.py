"""SFT stage on a tiny model: parameters change, eval loss falls, the output loads with plain transformers."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.cli import compose
from rlhf.models.tiny import prepare_base_model
from rlhf.stages import BASE, sft
from rlhf.stages.base import StageContext, StageResult
from rlhf.tracking.wandb_run import null_tracker
from tests.helpers import TINY_MODEL

TINY = [
    *TINY_MODEL,
    "task.num_demonstrations=96",
    "task.eval_fraction=0.25",
    "sft.num_train_epochs=2",
    "sft.learning_rate=3e-3",
    "sft.per_device_train_batch_size=16",
    "sft.logging_steps=1",
    "logger=none",
]


def run_sft(tmp_path, overrides):
    torch.set_num_threads(1)  # what the pipeline does for tiny models (num_threads auto)
    torch.manual_seed(0)
    cfg = compose([*TINY, *overrides])
    base = prepare_base_model(cfg, tmp_path / BASE)
    ctx = StageContext(
        tmp_path, tmp_path / "sft", seed=3, tracker=null_tracker("sft"), upstream={BASE: StageResult(base)}
    )
    ctx.output_dir.mkdir()
    return base, sft.run(cfg, ctx)


def logged(caplog, stage: str, key: str) -> list[float]:
    return [
        float(v) for v in re.findall(rf"\[{stage}\] step \d+ \|.*?{re.escape(key)}=([-\d.e+]+)", caplog.text)
    ]


def changed_fraction(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return sum(not torch.equal(sa[k], sb[k]) for k in sa) / len(sa)


def test_sft_trains_and_saves(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    base, result = run_sft(tmp_path, [])
    m = result.metrics
    assert result.artifact == tmp_path / "sft"
    assert m["eval/loss"] < m["eval/loss_before"] - 0.2
    assert 0.0 <= m["samples/gold_reward"] <= 1.0
    losses = logged(caplog, "sft", "train/loss")
    assert len(losses) >= 5 and losses[-1] < losses[0]  # a console line per logged step
    trained = AutoModelForCausalLM.from_pretrained(result.artifact)
    assert changed_fraction(trained, AutoModelForCausalLM.from_pretrained(base)) > 0.9
    assert (result.artifact / "tokenizer.json").exists() and not (result.artifact / "trainer").exists()


def test_sft_with_lora_saves_merged_weights(tmp_path):
    base, result = run_sft(tmp_path, ["model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj,o_proj]"])
    assert result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
    trained = AutoModelForCausalLM.from_pretrained(result.artifact)
    assert not any("lora" in k for k in trained.state_dict())
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = trained.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(re.search(r"(q_proj|v_proj|o_proj)", k) for k in changed)


@pytest.mark.parametrize("task", ["guess"])
def test_sft_on_a_dialogue_task_trains_the_replies(tmp_path, task):
    _, result = run_sft(tmp_path, [f"task={task}", "task.num_demonstrations=48"])
    assert result.metrics["eval/loss"] < result.metrics["eval/loss_before"]
