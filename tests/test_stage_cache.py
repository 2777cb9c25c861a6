"""The stage cache: entries published atomically and verified before use, locks between jobs, and the pipeline
reusing SFT and the reward model when only PPO changes."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from rlhf.cli import compose, objective_value
from rlhf.run.pipeline import run
from rlhf.run.stage_cache import ENTRY, StageCache
from tests.helpers import TINY_CHAIN

CHAIN = [*TINY_CHAIN, "logger=none"]
"""The tiny chain without W&B; each test selects its stages."""


def _output(tmp_path, name="stage"):
    out = tmp_path / name
    (out / "checkpoints" / "checkpoint-000001").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-000001" / "state.bin").write_bytes(b"x" * 100)
    (out / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (out / "config.json").write_text('{"a": 1}')
    return out


def test_a_published_entry_is_found_by_its_key_and_leaves_checkpoints_out(tmp_path):
    cache = StageCache(tmp_path / "cache")
    record = {"artifact": "/run/sft", "seconds": 2.5, "metrics": {"train/loss": 1.0}, "wandb_run": "abc"}
    with cache.hold("sft", "k1"):
        assert cache.lookup("sft", "k1") is None
        entry = cache.publish("sft", "k1", _output(tmp_path), record)
    found = cache.lookup("sft", "k1")
    assert found["artifact"] == str(entry / "artifact") and found["metrics"] == {"train/loss": 1.0}
    assert found["made_in"] == str(tmp_path / "stage") and found["wandb_run"] == "abc"
    assert (entry / "artifact" / "model.safetensors").read_bytes() == bytes(range(256)) * 4
    assert not (entry / "artifact" / "checkpoints").exists()
    assert cache.lookup("sft", "k2") is None and cache.lookup("reward", "k1") is None
    assert not list(cache.root.glob(".tmp-*"))


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: (e / "artifact" / "model.safetensors").write_bytes(b"truncated"),
        lambda e: (e / "artifact" / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 4),
        lambda e: (e / "artifact" / "config.json").unlink(),
        lambda e: (e / ENTRY).unlink(),  # a copy cut short before its entry was written
        lambda e: (e / ENTRY).write_text('{"key": "k1", "manif'),
    ],
    ids=["truncated", "same-size-other-bytes", "missing-file", "no-entry", "torn-entry"],
)
def test_a_corrupt_or_partial_entry_is_removed_never_loaded(tmp_path, damage, caplog):
    cache = StageCache(tmp_path / "cache")
    entry = cache.publish("sft", "k1", _output(tmp_path), {"metrics": {}, "seconds": 1.0})
    damage(entry)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert cache.lookup("sft", "k1") is None
    assert "is corrupt or partial" in caplog.text
    assert not entry.exists()


def test_jobs_take_an_entrys_lock_in_turn(tmp_path):
    cache = StageCache(tmp_path / "cache")
    events: list[tuple[str, float]] = []

    def first():
        with cache.hold("sft", "k1"):
            events.append(("first in", time.monotonic()))
            time.sleep(0.5)
            events.append(("first out", time.monotonic()))

    t = threading.Thread(target=first)
    t.start()
    while not events:
        time.sleep(0.01)
    with cache.hold("sft", "k1"):  # another open file description: flock makes it wait like another process
        events.append(("second in", time.monotonic()))
    with cache.hold("sft", "other-key"):  # other entries are not blocked
        pass
    t.join()
    assert [e for e, _ in events] == ["first in", "first out", "second in"]


def test_runs_sharing_a_cache_train_sft_and_reward_once_when_only_ppo_changes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    cache = f"cache_dir={tmp_path / 'cache'}"
    first = run(
        compose([*CHAIN, cache, "stages=[sft,reward,ppo]", "ppo.kl_coef=0.02"]), run_dir=tmp_path / "a"
    )
    assert not any(e["cached"] for e in first["stages"].values())
    second = run(
        compose([*CHAIN, cache, "stages=[sft,reward,ppo]", "ppo.kl_coef=0.1"]), run_dir=tmp_path / "b"
    )
    stages = second["stages"]
    assert stages["sft"]["cached"] and stages["reward"]["cached"] and not stages["ppo"]["cached"]
    for name in ("sft", "reward"):
        assert stages[name]["cache_entry"] == first["stages"][name]["cache_entry"]
        assert stages[name]["artifact"].startswith(stages[name]["cache_entry"])
        assert stages[name]["key"] == first["stages"][name]["key"]
        assert stages[name]["metrics"] == first["stages"][name]["metrics"]
        assert not (tmp_path / "b" / name).exists()  # nothing trained there
    assert "sft reused from the stage cache" in caplog.text
    assert "ppo reused from the stage cache" not in caplog.text

    # the cached SFT model is what PPO started from: its reference is the cache entry's weights
    third = run(
        compose([*CHAIN, cache, "stages=[sft,reward,ppo]", "ppo.kl_coef=0.1"]), run_dir=tmp_path / "c"
    )
    assert all(e["cached"] for e in third["stages"].values())  # the same config again: nothing to train
    assert third["stages"]["ppo"]["metrics"] == stages["ppo"]["metrics"]


def test_cache_false_trains_every_stage_and_a_corrupt_entry_is_rebuilt(tmp_path):
    cache = f"cache_dir={tmp_path / 'cache'}"
    first = run(compose([*CHAIN, cache, "stages=[sft]"]), run_dir=tmp_path / "a")
    off = run(compose([*CHAIN, cache, "stages=[sft]", "cache=false"]), run_dir=tmp_path / "b")
    assert not off["stages"]["sft"]["cached"] and "cache_entry" not in off["stages"]["sft"]
    assert off["stages"]["sft"]["artifact"] == str(tmp_path / "b" / "sft")

    entry = StageCache(tmp_path / "cache").entry_dir("sft", first["stages"]["sft"]["key"])
    weights = entry / "artifact" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a full disk cut the copy short
    rebuilt = run(compose([*CHAIN, cache, "stages=[sft]"]), run_dir=tmp_path / "c")
    assert not rebuilt["stages"]["sft"]["cached"]  # trained again, not loaded
    assert rebuilt["stages"]["sft"]["cache_entry"] == str(entry)
    record = json.loads((entry / ENTRY).read_text())
    assert record["made_in"] == str(tmp_path / "c" / "sft")
    assert StageCache(tmp_path / "cache").lookup("sft", first["stages"]["sft"]["key"]) is not None


def test_objective_value_reads_a_dotted_path_whose_last_key_has_slashes():
    summary = {"stages": {"evaluate": {"metrics": {"ppo/gold_reward": 0.8, "a.b": 2}}, "sft": {"seconds": 3}}}
    assert objective_value(summary, "stages.evaluate.metrics.ppo/gold_reward") == 0.8
    assert objective_value(summary, "stages.evaluate.metrics.a.b") == 2.0
    assert objective_value(summary, "stages.sft.seconds") == 3.0
    assert objective_value(summary, "stages.ppo.metrics.x") is None
    assert objective_value(summary, "stages.evaluate") is None  # not a number
