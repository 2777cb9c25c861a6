"""W&B per stage, offline, read back from the `.wandb` file itself; logger=none; the console lines."""

from __future__ import annotations

import logging
import os

import pytest

from rlhf.cli import compose
from rlhf.tracking import (
    find_offline_runs,
    format_metrics,
    history_values,
    iter_records,
    null_tracker,
    read_offline_run,
    rewrite_trainer_logs,
    start_stage,
)


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
    with pytest.raises(ValueError, match="logger.mode='sometimes'"):
        start_stage(compose(["logger.mode=sometimes"]), "sft", tmp_path, group="g")


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
