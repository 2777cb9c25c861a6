"""The PPO stage on a tiny model: inputs from upstream or from paths, outputs plain `transformers` can load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.cli import compose
from rlhf.models.loading import load_reward_model, load_tokenizer
from rlhf.models.tiny import build_tiny_model, prepare_base_model
from rlhf.models.tokenizer import build_tokenizer
from rlhf.ppo.checkpoint import latest_checkpoint, read_resume_run_id
from rlhf.ppo.trainer import PPOTrainer
from rlhf.run.stage_keys import stage_keys
from rlhf.stages import ppo
from rlhf.stages.base import StageContext, StageResult
from rlhf.tracking.wandb_run import null_tracker
from tests.helpers import free_port

FAST = [
    "logger=none",
    "ppo.total_episodes=32",
    "ppo.batch_size=16",
    "ppo.num_mini_batches=2",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=6",
    "ppo.save_every=1",
    "evaluate.num_prompts=32",
]


def models(tmp_path: Path, cfg) -> tuple[Path, Path]:
    """A tiny policy ("sft") and a reward model with a random head ("reward"), as save_pretrained dirs."""
    torch.manual_seed(0)
    sft = prepare_base_model(cfg, tmp_path / "sft")
    reward = tmp_path / "reward"
    load_reward_model(sft).save_pretrained(reward)
    load_tokenizer(sft).save_pretrained(reward)
    return sft, reward


def context(tmp_path: Path, upstream: dict[str, Path]) -> StageContext:
    out = tmp_path / "ppo"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        run_dir=tmp_path,
        output_dir=out,
        seed=0,
        tracker=null_tracker("ppo"),
        upstream={k: StageResult(artifact=v) for k, v in upstream.items()},
    )


@pytest.fixture
def setup(tmp_path):
    cfg = compose(FAST)
    sft, reward = models(tmp_path, cfg)
    return cfg, sft, reward


def test_stage_trains_from_upstream_and_saves_loadable_models(tmp_path, setup):
    cfg, sft, reward = setup
    result = ppo.run(cfg, context(tmp_path, {"sft": sft, "reward": reward}))
    assert result.artifact == tmp_path / "ppo"
    policy = AutoModelForCausalLM.from_pretrained(result.artifact)
    before = AutoModelForCausalLM.from_pretrained(sft)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed, "PPO must change the policy"
    AutoModelForSequenceClassification.from_pretrained(result.artifact / "critic")
    assert (result.artifact / "tokenizer.json").exists()
    assert (tmp_path / ppo.PLOT_NAME).stat().st_size > 1000
    assert (
        result.metrics["updates"] == 2 and "objective/kl" in result.metrics and "env/gold" in result.metrics
    )
    assert latest_checkpoint(result.artifact).name == "checkpoint-000002"


def test_stage_runs_alone_on_paths_and_resumes_only_under_its_own_key(tmp_path, setup, monkeypatch, caplog):
    """A killed stage resumes from its checkpoint with the same config; with another total_episodes (a different
    LR schedule, so part of the stage key) the same directory starts over instead of continuing."""
    cfg, sft, reward = setup
    cfg.ppo.policy_path, cfg.ppo.reward_model_path = str(sft), str(reward)
    ctx = context(tmp_path / "alone", {})
    ctx.key = stage_keys(cfg)["ppo"].key
    step, calls = PPOTrainer.step, []

    def dies_in_update_2(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return step(self)

    monkeypatch.setattr(PPOTrainer, "step", dies_in_update_2)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cfg, ctx)
    monkeypatch.setattr(PPOTrainer, "step", step)
    assert read_resume_run_id(ctx.output_dir) is None  # logger=none: no W&B run to continue
    caplog.set_level(logging.INFO)
    result = ppo.run(cfg, ctx)
    assert "resumed PPO from" in caplog.text and result.metrics["updates"] == 2
    assert [r["update"] for r in ppo.read_history(ctx.output_dir)] == [1, 2]

    cfg.ppo.total_episodes = 48
    ctx.key = stage_keys(cfg)["ppo"].key
    caplog.clear()
    result = ppo.run(cfg, ctx)
    assert "starting over" in caplog.text and "resumed PPO" not in caplog.text
    assert [r["update"] for r in ppo.read_history(ctx.output_dir)] == [1, 2, 3]


def test_reward_model_with_another_tokenizer_scores_the_decoded_text(tmp_path, setup):
    cfg, sft, _ = setup
    other = build_tokenizer(["review", ":", "the", "good", "bad", "film", "was"])
    model = build_tiny_model(cfg.model, other)
    model.score = torch.nn.Linear(model.config.hidden_size, 1, bias=False)  # a sequence classifier's head
    other_dir = tmp_path / "other_reward"
    load_reward_model_from(model, other, other_dir)
    cfg.ppo.reward_model_path = str(other_dir)
    cfg.ppo.total_episodes = 16
    with pytest.raises(ValueError, match="set ppo.critic_init=sft"):
        ppo.run(cfg, context(tmp_path, {"sft": sft}))
    cfg.ppo.critic_init = "sft"
    result = ppo.run(cfg, context(tmp_path, {"sft": sft}))
    assert result.metrics["updates"] == 1 and "reward/model_score" in result.metrics


def load_reward_model_from(causal_lm, tokenizer, out: Path) -> None:
    """Save a causal LM's backbone as a sequence classifier with its own tokenizer."""
    causal_lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reward = load_reward_model(out)
    reward.save_pretrained(out)


def test_missing_inputs_say_what_to_set(tmp_path, setup):
    cfg, sft, _ = setup
    with pytest.raises(ValueError, match="ppo.policy_path"):
        ppo.run(cfg, context(tmp_path / "empty", {}))
    with pytest.raises(ValueError, match="ppo.reward_model_path"):
        ppo.run(cfg, context(tmp_path / "nosft", {"sft": sft}))


def test_lora_stage_saves_a_merged_plain_model(tmp_path, setup):
    cfg, sft, reward = setup
    cfg.model.lora.r = 4
    cfg.ppo.advantage = "rloo"
    cfg.ppo.total_episodes = 16
    result = ppo.run(cfg, context(tmp_path, {"sft": sft, "reward": reward}))
    policy = AutoModelForCausalLM.from_pretrained(result.artifact)
    assert not any("lora" in k for k in policy.state_dict())


class RecordingTracker:
    """Collects what the stage's callback logs: (step, metrics) per `log` call."""

    def __init__(self):
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics, step, console=True):
        self.logged.append((step, metrics))

    def log_table(self, *args, **kwargs):
        pass


def test_a_resumed_stage_replays_the_history_up_to_the_checkpoint_into_the_tracker():
    """A killed process may not have flushed its W&B rows: the history rows of updates 1..k the resumed trainer hands
    back are logged again (the tracker drops those its run already holds), only the updates it tracks (log_every)."""
    cfg = compose([*FAST, "ppo.log_every=2", "ppo.total_episodes=96"])  # 6 updates
    rows = [{"update": k, "objective/kl": 0.1 * k, "env/gold": k} for k in (1, 2, 3, 4)]
    tracker = RecordingTracker()
    ppo.ConsoleAndTracker(cfg.ppo, tracker).on_resume(rows)
    assert [step for step, _ in tracker.logged] == [2, 4]
    for step, metrics in tracker.logged:
        assert metrics == {k: v for k, v in rows[step - 1].items() if k != "update"}
    ppo.ConsoleAndTracker(cfg.ppo, None).on_resume(rows)  # no tracker: nothing to replay into


@pytest.mark.slow
def test_torchrun_two_processes_run_the_stage_through_the_cli(tmp_path, setup):
    """`torchrun --nproc_per_node 2 -m rlhf stages=[ppo]`: two gloo processes share one global batch."""
    import os
    import subprocess
    import sys

    _, sft, reward = setup
    run_dir = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "rlhf",
        "stages=[ppo]",
        f"hydra.run.dir={run_dir}",
        f"ppo.policy_path={sft}",
        f"ppo.reward_model_path={reward}",
        *[o for o in FAST if not o.startswith("evaluate.")],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = ppo.read_history(run_dir / "ppo")
    assert [r["update"] for r in rows] == [1, 2] and rows[-1]["episode"] == 32  # global batch 16 = 2 x 8
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo")
