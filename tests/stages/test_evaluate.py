"""The evaluate stage: SFT vs PPO on held-out episodes, gold and proxy reward, KL to the reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from rlhf.cli import compose
from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.tiny import prepare_base_model
from rlhf.ppo.seeds import EVAL_SEED_OFFSET, SEED_SPACE, train_episode_seed
from rlhf.stages import evaluate
from rlhf.stages.base import StageContext, StageResult
from rlhf.tracking.wandb_run import null_tracker


def setup_models(tmp_path: Path, cfg, task_vocab_from=None) -> dict[str, Path]:
    """sft = a tiny random policy; ppo = the same with perturbed weights; reward = random head."""
    torch.manual_seed(0)
    sft = prepare_base_model(cfg, tmp_path / "sft")
    tokenizer = load_tokenizer(sft)
    policy = load_causal_lm(sft)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    policy.save_pretrained(tmp_path / "ppo")
    tokenizer.save_pretrained(tmp_path / "ppo")
    load_reward_model(sft).save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    return {"sft": sft, "ppo": tmp_path / "ppo", "reward": tmp_path / "reward"}


def context(tmp_path: Path, upstream: dict[str, Path]) -> StageContext:
    out = tmp_path / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        run_dir=tmp_path,
        output_dir=out,
        seed=3,
        tracker=null_tracker("evaluate"),
        upstream={k: StageResult(artifact=v) for k, v in upstream.items()},
    )


def test_sft_versus_ppo_on_256_held_out_episodes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    cfg = compose(["logger=none", "ppo.response_length=8"])
    assert cfg.evaluate.num_prompts >= 256
    paths = setup_models(tmp_path, cfg)
    result = evaluate.run(cfg, context(tmp_path, paths))
    m = result.metrics
    for key in (
        "sft/gold_reward",
        "ppo/gold_reward",
        "sft/proxy_reward",
        "ppo/proxy_reward",
        "ppo/kl",
        "sft/kl",
    ):
        assert key in m and m[key] == m[key], key
    assert m["sft/kl"] == pytest.approx(0.0, abs=1e-6), "the SFT policy is the reference"
    assert m["ppo/kl"] > 0.01
    assert 0 <= m["ppo/gold_reward"] <= 1 and m["gold_reward_gain"] == pytest.approx(
        m["ppo/gold_reward"] - m["sft/gold_reward"]
    )
    saved = json.loads((tmp_path / "evaluate" / "eval.json").read_text())
    assert saved["metrics"] == m and len(saved["samples"]) == 2 * cfg.evaluate.num_samples
    assert "| gold_reward |" in caplog.text and "| metric | sft | ppo |" in caplog.text  # the console table


def test_only_one_policy_and_no_reward_model(tmp_path):
    cfg = compose(
        ["logger=none", "evaluate.num_prompts=40", "evaluate.batch_size=16", "evaluate.temperature=0"]
    )
    paths = setup_models(tmp_path, cfg)
    result = evaluate.run(cfg, context(tmp_path / "only", {"sft": paths["sft"]}))
    assert set(result.metrics) == {"sft/gold_reward", "sft/kl", "sft/response_length"}


def test_multi_turn_task_reports_success_rate(tmp_path):
    cfg = compose(["logger=none", "task=guess", "evaluate.num_prompts=24", "ppo.response_length=3"])
    paths = setup_models(tmp_path, cfg)
    result = evaluate.run(cfg, context(tmp_path, {"sft": paths["sft"], "ppo": paths["ppo"]}))
    assert 0 <= result.metrics["sft/success_rate"] <= 1 and "ppo/success_rate" in result.metrics


def test_nothing_to_evaluate_is_a_clear_error(tmp_path):
    cfg = compose(["logger=none"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate.run(cfg, context(tmp_path, {}))


def test_evaluation_seeds_never_meet_training_seeds():
    assert EVAL_SEED_OFFSET >= SEED_SPACE
    assert all(
        0 <= train_episode_seed(s, i) < SEED_SPACE for s in (0, 7, 2**31 - 2) for i in (0, 10**9, 2**40)
    )
