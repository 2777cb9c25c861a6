"""W&B per stage, offline, read back from the `.wandb` file itself; logger=none; the console lines."""

from __future__ import annotations

import logging
import os
import time

import pytest

from rlhf.cli import compose
from rlhf.run.validation import validate
from rlhf.tracking.wandb_offline import (
    find_offline_runs,
    history_values,
    iter_records,
    logged_steps,
    read_offline_run,
)
from rlhf.tracking.wandb_run import format_metrics, null_tracker, rewrite_trainer_logs, start_stage


def test_offline_run_is_written_under_the_run_dir_and_reads_back(tmp_path, caplog):
    cfg = compose(["logger.project=unit", "logger.tags=[a,b]", "sft.learning_rate=0.25"])
    caplog.set_level(logging.INFO, logger="rlhf")
    tracker = start_stage(cfg, "sft", tmp_path, group="g1")
    assert tracker.report_to == "wandb" and tracker.run_id
    assert os.environ["WANDB_DATA_DIR"].startswith(str(tmp_path.resolve()))
    long_text = "x" * 500  # rows big enough that records span several 32 KiB blocks
    for step in range(200):
        tracker.log({"train/loss": 1.0 / (step + 1), "note": long_text}, step=step)
    tracker.log_table("samples", ["prompt", "completion", "gold_reward"], [["p", "c", 0.5], ["q", "d", 1.0]])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "weights.bin").write_bytes(b"\0" * 10)
    tracker.log_artifact(tmp_path / "out", "sft-model", "model")
    tracker.set_summary({"eval/accuracy": 0.875})
    tracker.finish()
    tracker.finish()  # idempotent

    assert "[sft] step 3 | train/loss=0.25" in caplog.text  # one console line per logged step
    (run_dir,) = find_offline_runs(tmp_path)
    assert run_dir.is_relative_to(tmp_path / "wandb")
    run = read_offline_run(run_dir)
    assert run["run"]["group"] == "g1" and run["run"]["job_type"] == "sft" and run["run"]["project"] == "unit"
    assert run["run"]["tags"] == ["a", "b"]
    assert run["config"]["sft"]["learning_rate"] == 0.25  # the resolved Hydra config
    assert history_values(run, "train/loss") == pytest.approx([1.0 / (s + 1) for s in range(200)])
    assert [row["_step"] for row in run["history"] if "train/loss" in row][:3] == [0, 1, 2]
    assert any(
        row.get("samples/_type") == "table-file" and row.get("samples/nrows") == 2 for row in run["history"]
    )
    assert run["summary"]["eval/accuracy"] == 0.875
    assert {"name": "sft-model", "type": "model"} in run["artifacts"]
    assert sum(1 for _ in iter_records(next(run_dir.glob("*.wandb")))) > 200


def test_logger_none_writes_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    tracker = start_stage(compose(["logger=none"]), "reward", tmp_path, group="g")
    assert tracker.run_id is None and tracker.report_to == "none" and not tracker.enabled
    tracker.log({"eval/accuracy": 0.5}, step=1)
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_artifact(tmp_path, "x", "model")
    tracker.set_summary({"a": 1.0})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()
    assert "[reward] step 1 | eval/accuracy=0.5" in caplog.text
    assert null_tracker("x").report_to == "none"


def test_disabled_mode_and_bad_names(tmp_path):
    assert not start_stage(compose(["logger.mode=disabled"]), "sft", tmp_path, group="g").enabled
    with pytest.raises(ValueError, match="logger.mode='sometimes' is not one of offline, online, disabled"):
        validate(compose(["logger.mode=sometimes"]))


def test_reader_rejects_other_files(tmp_path):
    (tmp_path / "x.wandb").write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_offline_run(tmp_path / "x.wandb")


def test_trainer_log_keys_and_console_format():
    assert rewrite_trainer_logs({"loss": 1.0, "eval_loss": 2.0, "total_flos": 3}) == {
        "train/loss": 1.0,
        "eval/loss": 2.0,
    }
    assert (
        format_metrics("ppo", {"objective/kl": 0.123456, "n": 3}, 7)
        == "[ppo] step 7 | objective/kl=0.1235 | n=3"
    )


def test_a_resumed_run_writes_each_step_once(tmp_path):
    """The steps an earlier process of a W&B run wrote are read back from its file and never written again."""
    cfg = compose(["logger.project=unit"])
    first = start_stage(cfg, "ppo", tmp_path, group="g")
    for step in (1, 2, 3):
        first.log({"objective/kl": float(step)}, step=step)
    first.finish(exit_code=1)
    time.sleep(1.1)  # the resumed run's directory is named after its start time, to the second
    second = start_stage(cfg, "ppo", tmp_path, group="g", resume_id=first.run_id)
    assert second.recorded_steps == {1, 2, 3}
    for step in (1, 2, 3, 4, 5):  # a resumed trainer replays its history, then continues
        second.log({"objective/kl": float(step)}, step=step, console=False)
    second.log_table("samples", ["a"], [["x"]], step=3)
    second.finish()
    runs = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    assert {r["run"]["id"] for r in runs} == {first.run_id} and len(runs) == 2
    steps = sorted(row["_step"] for r in runs for row in r["history"] if "objective/kl" in row)
    assert steps == [1, 2, 3, 4, 5]
    assert not any("samples/_type" in row for r in runs for row in r["history"])


def test_the_file_of_a_killed_process_reads_as_far_as_it_goes(tmp_path):
    tracker = start_stage(compose(["logger.project=unit"]), "ppo", tmp_path, group="g")
    for step in range(1, 40):
        tracker.log({"objective/kl": float(step), "note": "x" * 2000}, step=step)
    tracker.finish()
    path = next(find_offline_runs(tmp_path)[0].glob("*.wandb"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # torn mid-chunk, as a kill leaves it
    steps = logged_steps(tmp_path, tracker.run_id)
    assert steps and steps == set(range(1, max(steps) + 1)) and max(steps) < 39
    path.write_bytes(data[:3])  # not even a header
    assert logged_steps(tmp_path, tracker.run_id) == set()
