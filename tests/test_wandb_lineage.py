"""W&B lineage: which upstream artifacts each stage run declares, online at start and offline through rlhf-sync.

A W&B server cannot run here, so the online calls go to a recording stand-in for `wandb.init`'s run; the offline
side (the `inputs` each real offline run records) is covered by tests/test_sweeps.py."""

from __future__ import annotations

import logging

import pytest

from rlhf.tracking import wandb_sync
from rlhf.tracking.wandb_run import use_inputs


class RecordingRun:
    """What a W&B run is asked to do: `use_artifact` calls and `finish`."""

    def __init__(self, fail: bool = False) -> None:
        self.used: list[str] = []
        self.finished = False
        self.fail = fail

    def use_artifact(self, name: str) -> None:
        if self.fail:
            raise RuntimeError("artifact not found")
        self.used.append(name)

    def finish(self) -> None:
        self.finished = True


INPUTS = {
    "sft": {"artifact": "sft-abc123", "run": "abc123", "key": "k1", "cached": True},
    "reward": {"artifact": "reward-def456", "run": "def456", "key": "k2", "cached": False},
    "base": {"artifact": None},  # an output that was not logged as an artifact (logger.log_artifacts=false)
}


def test_an_online_run_declares_every_logged_upstream_artifact():
    run = RecordingRun()
    use_inputs(run, INPUTS)
    assert run.used == ["sft-abc123:latest", "reward-def456:latest"]


def test_a_missing_upstream_artifact_is_a_warning_not_a_failed_stage(caplog):
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        use_inputs(RecordingRun(fail=True), INPUTS)
    assert "cannot use artifact sft-abc123 of sft" in caplog.text


def test_rlhf_sync_uploads_then_declares_the_recorded_lineage(tmp_path, monkeypatch, capsys):
    runs = {
        tmp_path / "0/wandb/offline-run-1-abc123": {"run": {"id": "abc123", "project": "p"}, "config": {}},
        tmp_path / "1/wandb/offline-run-2-ppo1": {
            "run": {"id": "ppo1", "project": "p", "name": "kl_coef=0.1-ppo"},
            "config": {"inputs": {"sft": INPUTS["sft"], "reward": INPUTS["reward"]}},
        },
    }
    calls: list = []
    online: list[RecordingRun] = []
    monkeypatch.setattr(wandb_sync, "find_offline_runs", lambda d: list(runs))
    monkeypatch.setattr(wandb_sync, "read_offline_run", lambda p, wait_seconds: runs[p])
    monkeypatch.setattr(
        wandb_sync.subprocess, "run", lambda cmd: calls.append(cmd) or type("P", (), {"returncode": 0})
    )

    def init(**kwargs):
        calls.append(kwargs)
        online.append(RecordingRun())
        return online[-1]

    import wandb

    monkeypatch.setattr(wandb, "init", init)
    assert wandb_sync.main([str(tmp_path), "--entity", "team"]) == 0
    assert calls[0] == ["wandb", "sync", *map(str, runs)]  # first every run (and its artifacts) is uploaded
    assert calls[1:] == [{"id": "ppo1", "project": "p", "entity": "team", "resume": "must"}] * 2
    assert [r.used for r in online] == [["sft-abc123:latest"], ["reward-def456:latest"]]
    assert all(r.finished for r in online)
    out = capsys.readouterr().out
    assert "lineage: run ppo1 (kl_coef=0.1-ppo) uses sft-abc123" in out


def test_rlhf_sync_without_runs_is_one_line(tmp_path, capsys):
    assert wandb_sync.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"rlhf-sync: error: no W&B runs under {tmp_path}"


def test_a_dry_run_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(wandb_sync, "find_offline_runs", lambda d: [tmp_path / "r"])
    monkeypatch.setattr(
        wandb_sync, "read_offline_run", lambda p, wait_seconds: {"run": {"id": "x"}, "config": {}}
    )
    monkeypatch.setattr(wandb_sync.subprocess, "run", lambda cmd: pytest.fail("ran wandb sync"))
    assert wandb_sync.main([str(tmp_path), "--dry-run"]) == 0
