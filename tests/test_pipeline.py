"""The pipeline end to end on tiny sizes: stage order, summary.json, W&B runs read back, early errors."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.cli import compose
from rlhf.run.pipeline import InputError, derive_seed, run
from rlhf.tracking.wandb_offline import find_offline_runs, history_values, read_offline_run
from tests.helpers import TINY, TINY_PPO

RUN = ["stages=[sft,reward]", *TINY, "sft.logging_steps=1", "reward.logging_steps=1"]
"""SFT then the reward model, a W&B row per optimizer step."""


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "sft") == derive_seed(0, "sft") == 832038617  # fixed across processes and versions
    seeds = {derive_seed(r, s) for r in range(3) for s in ("sft", "reward", "ppo", "evaluate")}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)


def test_sft_then_reward_with_wandb(tmp_path):
    summary = run(compose([*RUN, "logger.project=pipe"]), run_dir=tmp_path / "run", group="grp")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    stages = summary["stages"]
    assert list(stages) == ["sft", "reward"]
    for name, entry in stages.items():
        assert entry["artifact"] == str(tmp_path / "run" / name) and entry["seconds"] > 0
    assert {"train/loss", "eval/loss", "eval/loss_before"} <= set(stages["sft"]["metrics"])
    assert 0.0 <= stages["reward"]["metrics"]["eval/accuracy"] <= 1.0
    AutoModelForCausalLM.from_pretrained(stages["sft"]["artifact"])
    assert (
        AutoModelForSequenceClassification.from_pretrained(stages["reward"]["artifact"]).config.num_labels
        == 1
    )

    runs = {r["run"]["job_type"]: r for r in map(read_offline_run, find_offline_runs(tmp_path / "run"))}
    assert set(runs) == {"sft", "reward"}
    for name, r in runs.items():
        assert r["run"]["group"] == "grp" and r["run"]["project"] == "pipe"
        assert r["run"]["id"] == stages[name]["wandb_run"]
        assert r["config"]["stages"] == ["sft", "reward"] and r["config"]["task"]["num_preferences"] == 48
        assert {
            "name": f"{name}-{r['run']['id']}",
            "type": {"sft": "model", "reward": "reward_model"}[name],
        } in r["artifacts"]
        assert r["summary"]["stage/seconds"] > 0
    # TRL's trainers logged into the stage's run, once per logging step
    assert len(history_values(runs["sft"], "train/loss")) >= 3
    assert history_values(runs["sft"], "eval/loss")
    for name in ("sft", "reward"):  # each stage logs a samples table
        assert any(row.get("samples/_type") == "table-file" for row in runs[name]["history"])
    assert history_values(runs["reward"], "eval/accuracy")[-1] == stages["reward"]["metrics"]["eval/accuracy"]
    assert runs["reward"]["summary"]["eval/accuracy"] == stages["reward"]["metrics"]["eval/accuracy"]


def test_bad_input_fails_before_work(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(InputError, match="cannot write to run directory"):
        run(compose([*RUN, "logger=none"]), run_dir=not_a_dir / "run")
    with pytest.raises(InputError, match="sft.dataset=.*: no such file"):
        run(compose([*RUN, f"sft.dataset={tmp_path / 'missing.jsonl'}"]), run_dir=tmp_path / "a")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(InputError, match="missing chosen, rejected"):
        run(compose([*RUN, f"reward.dataset={prefs}"]), run_dir=tmp_path / "b")
    with pytest.raises(InputError, match="holds no model"):
        run(compose([*RUN, "model=hf", f"model.name_or_path={tmp_path}"]), run_dir=tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))  # nothing built, nothing trained


def test_a_later_invocation_reuses_finished_stages(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rlhf")
    base = [o for o in RUN if not o.startswith("stages=")] + ["logger=none"]
    first = run(compose([*base, "stages=[sft]"]), run_dir=tmp_path)
    second = run(compose([*base, "stages=[reward]"]), run_dir=tmp_path)
    assert list(second["stages"]) == ["sft", "reward"]
    assert second["stages"]["sft"] == first["stages"]["sft"]  # kept as it was
    assert f"pairs from {tmp_path / 'sft'}" in caplog.text  # the reward model started from that SFT output


def test_a_changed_config_reruns_stale_stages_and_never_reuses_them(tmp_path, caplog):
    """Stage keys: the base model and a finished stage are reused only for the config that made them."""
    caplog.set_level(logging.INFO, logger="rlhf")
    base = [o for o in RUN if not o.startswith("stages=")] + ["logger=none"]
    first = run(compose([*base, "stages=[sft]"]), run_dir=tmp_path)
    assert first["base"]["key"] and first["stages"]["sft"]["key"]
    wider = [*base, "model.hidden_size=48", "stages=[sft,reward]"]
    second = run(compose(wider), run_dir=tmp_path)
    assert "was built for another config (model.hidden_size 32 -> 48)" in caplog.text
    assert "sft: its finished output no longer matches (model.hidden_size 32 -> 48)" in caplog.text
    assert json.loads((tmp_path / "base" / "config.json").read_text())["hidden_size"] == 48
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["hidden_size"] == 48
    assert second["stages"]["sft"]["key"] != first["stages"]["sft"]["key"]
    caplog.clear()
    third = run(compose(wider), run_dir=tmp_path)  # the same command again: nothing to redo
    assert third == second and "none to run" in caplog.text
    with pytest.raises(
        InputError, match=r"reward reads the sft stage's output .* no longer matches \(seed 0 -> 1\)"
    ):
        run(compose([*base, "model.hidden_size=48", "stages=[reward]", "seed=1"]), run_dir=tmp_path)


def test_a_killed_ppo_stage_resumes_its_wandb_run_with_every_update_once(tmp_path, monkeypatch):
    """Killed after checkpoint 2 with nothing flushed to W&B: the rerun continues the same W&B run, replays updates
    1-2 from history.jsonl under their own steps and logs 3-4, so the run's history holds each update once."""
    from rlhf.ppo.trainer import PPOTrainer

    cfg = compose([*RUN, "stages=[sft,reward,ppo]", *TINY_PPO, "ppo.save_every=1", "ppo.total_episodes=64"])
    run_dir = tmp_path / "run"
    step, calls = PPOTrainer.step, []

    def killed_in_update_3(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("kill -9")
        return step(self)

    monkeypatch.setattr(PPOTrainer, "step", killed_in_update_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir=run_dir)
    monkeypatch.setattr(PPOTrainer, "step", step)
    (killed,) = [d for d in find_offline_runs(run_dir) if read_offline_run(d)["run"]["job_type"] == "ppo"]
    wandb_file = next(killed.glob("*.wandb"))
    wandb_file.write_bytes(wandb_file.read_bytes()[:7])  # what kill -9 leaves: the header, nothing flushed

    summary = run(cfg, run_dir=run_dir)
    run_id = summary["stages"]["ppo"]["wandb_run"]
    assert run_id and killed.name.endswith(run_id)  # the same W&B run, continued
    history = [json.loads(line) for line in (run_dir / "ppo" / "history.jsonl").read_text().splitlines()]
    assert [row["update"] for row in history] == [1, 2, 3, 4]
    runs = [read_offline_run(d, wait_seconds=0 if d == killed else 30) for d in find_offline_runs(run_dir)]
    rows = [
        row for r in runs if r["run"].get("id") == run_id for row in r["history"] if "objective/kl" in row
    ]
    assert sorted(row["_step"] for row in rows) == [1, 2, 3, 4]
    for row in rows:
        assert row["objective/kl"] == history[row["_step"] - 1]["objective/kl"]
