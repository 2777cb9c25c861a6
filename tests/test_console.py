"""The console: a bar plus a compact line every few updates, lines that never tear the bar, `[job N]` in a sweep."""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import replace

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from rlhf.cli import compose
from rlhf.models.tokenizer import build_tokenizer
from rlhf.ppo.trainer import PPOTrainer
from rlhf.rewards import build_rubric
from rlhf.run.stage_keys import stage_keys
from rlhf.stages.ppo import ConsoleAndTracker
from rlhf.tracking import console
from rlhf.tracking.wandb_run import StageTracker
from tests.helpers import WORDS, ToyEnv, ppo_config, tiny_llama

CFG = ppo_config(
    total_episodes=80,  # 5 updates
    batch_size=16,
    num_mini_batches=2,
    num_ppo_epochs=1,
    response_length=5,
    advantage="rloo",  # no critic: the fastest real PPO update
    num_generations=4,
)
WATCHED = ("env/gold", "objective/scores", "objective/kl", "rollout/response_length", "eps")
NOT_WATCHED = ("loss/policy_avg", "policy/approxkl_avg", "objective/entropy", "time/rollout", "lr")


class RecordingTracker(StageTracker):
    """A console-only tracker that keeps what it was asked to log (what W&B would get)."""

    def __init__(self) -> None:
        super().__init__("ppo")
        self.logged: list[tuple[int, dict, bool]] = []

    def log(self, metrics, step, console=True):
        self.logged.append((step, dict(metrics), console))
        super().log(metrics, step, console)


def train(tmp_path, cfg=CFG, tracker=None):
    tokenizer = build_tokenizer(WORDS)
    rubric = build_rubric(
        {"brevity": {"kind": "length", "weight": 0.0, "target_length": 3}}, cfg.reward_source
    )
    trainer = PPOTrainer(
        cfg,
        tiny_llama(tokenizer),
        tokenizer,
        ToyEnv,
        output_dir=tmp_path,
        ref_policy=tiny_llama(tokenizer),
        seed=0,
        callback=ConsoleAndTracker(cfg, tracker),
        rubric=rubric,
    )
    trainer.train()
    return trainer


@pytest.fixture
def terminal(capsys, caplog):
    """Yields `attach()`: a console handler on stderr, where tqdm draws its bars, as Hydra's `hydra/job_logging` adds
    one on stdout (both end up on the same terminal); it returns a function that reads what was written, bars and
    all. Attached in the test itself: capsys's stream is only sys.stderr from the test's call on."""
    caplog.set_level(logging.INFO, logger="rlhf")
    handlers = []

    def attach():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("rlhf").addHandler(handler)
        handlers.append(handler)
        return lambda: capsys.readouterr().err

    yield attach
    for handler in handlers:
        logging.getLogger("rlhf").removeHandler(handler)
    console.set_job(None)


def screen_lines(text: str) -> list[str]:
    """What a terminal shows on each line: the text after the line's last carriage return."""
    return [line.split("\r")[-1] for line in text.split("\n")]


def test_every_nth_update_prints_the_watched_metrics_and_w_and_b_gets_all(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    tracker = RecordingTracker()
    train(tmp_path, replace(CFG, console_every=2), tracker)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[ppo] update")]
    assert [re.match(r"\[ppo\] update (\d+)/5 \|", line)[1] for line in lines] == ["1", "2", "4", "5"]
    for line in lines:
        assert all(f"| {key}=" in line for key in WATCHED), line
        assert "| reward/env=" in line and "| reward/brevity=" in line  # every rubric component, by name
        assert not any(key in line for key in NOT_WATCHED), line
    # the full set, every update, to the tracker (W&B) without a console line of its own
    assert [step for step, _, _ in tracker.logged] == [1, 2, 3, 4, 5]
    assert all(set(NOT_WATCHED) <= set(m) and not shown for _, m, shown in tracker.logged)
    assert "loss/policy_avg" not in caplog.text


def test_the_reward_models_raw_score_is_not_repeated_beside_its_component():
    metrics = {"objective/scores": 0.5, "reward/model": 0.5, "reward/model_score": 0.5, "lr": 1e-4}
    assert console.ppo_line(metrics, 1, 2) == "[ppo] update 1/2 | objective/scores=0.5 | reward/model=0.5"


def test_console_every_zero_prints_no_update_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    train(tmp_path, replace(CFG, console_every=0, total_episodes=32))
    assert "[ppo] update" not in caplog.text
    assert (tmp_path / "history.jsonl").read_text().count("loss/policy_avg") == 2  # history keeps everything


def test_console_every_changes_no_stage_key():
    before, after = stage_keys(compose([])), stage_keys(compose(["ppo.console_every=1"]))
    assert {n: k.key for n, k in before.items()} == {n: k.key for n, k in after.items()}


def test_a_log_line_prints_above_the_bar_never_inside_it(tmp_path, terminal):
    read = terminal()
    train(tmp_path, replace(CFG, console_every=1))
    out = read()
    assert "ppo: 100%" in out and "5/5" in out  # the bar was drawn, on the same stream as the log lines
    shown = screen_lines(out)
    logged = [line for line in out.split("\n") if "[ppo] update" in line]
    assert len(logged) == 5
    # each line starts where the cleared bar was: the terminal shows the log line alone, not `ppo: 40%|...[ppo] ...`
    assert all(line.startswith("[ppo] update") for line in shown if "[ppo] update" in line), logged
    assert "[job" not in out and "job " not in out  # not a sweep: no prefix, plain bar name


def test_a_sweep_job_names_its_lines_and_its_bar(tmp_path, terminal):
    read = terminal()
    console.set_job(3)
    train(tmp_path, replace(CFG, console_every=5))
    logging.getLogger("rlhf.stages.evaluate").info("[evaluate] table\n| metric | ppo |\n| gold | 0.5 |")
    out = read()
    shown = screen_lines(out)
    assert [line for line in shown if "[ppo] update" in line] == [
        line for line in shown if line.startswith("[job 3] [ppo] update ")
    ]
    assert len([line for line in shown if "[ppo] update" in line]) == 2  # updates 1 and 5
    # every line of a multi-line log (evaluate's table) says whose it is
    assert "[job 3] | metric | ppo |" in shown and "[job 3] | gold | 0.5 |" in shown
    assert "job 3 ppo: 100%" in out
    console.set_job(None)
    logging.getLogger("rlhf").info("after the sweep job")
    assert "after the sweep job" in screen_lines(read())


def test_trainer_stages_print_a_compact_line_and_a_named_bar(tmp_path, terminal):
    read = terminal()
    console.set_job(2)
    callback = console.progress_callback("reward")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(max_steps=10, global_step=0), TrainerControl()
    callback.on_train_begin(args, state, control)
    state.global_step = 10
    callback.on_step_end(args, state, control)
    callback.on_prediction_step(args, state, control, eval_dataloader=[1, 2])
    callback.on_evaluate(args, state, control)
    logs = {
        "loss": 0.5,
        "grad_norm": 2.0,
        "learning_rate": 1e-4,
        "accuracy": 0.75,
        "margin": 1.25,
        "epoch": 1.0,
    }
    callback.on_log(args, state, control, logs=logs)
    callback.on_log(args, state, control, logs={"train_runtime": 3.0, "total_flos": 1.0})  # nothing watched
    callback.on_train_end(args, state, control)
    out = read()
    assert "job 2 reward: 100%" in out and "job 2 reward eval:" in out
    lines = [line for line in screen_lines(out) if "[reward]" in line]
    assert lines == ["[job 2] [reward] step 10 | train/loss=0.5 | train/accuracy=0.75 | train/margin=1.25"]
