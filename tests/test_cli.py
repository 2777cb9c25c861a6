"""The real `rlhf` command in a subprocess: help, --cfg, errors, a run, and a multirun (the parallel launchers, the
stage cache and the Optuna sweeper: tests/test_sweeps.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.tracking.wandb_offline import find_offline_runs, history_values, read_offline_run
from tests.helpers import TINY, TINY_CHAIN

RLHF = str(Path(sys.executable).with_name("rlhf"))


def rlhf(
    *args: str, cwd: Path, check: bool = True, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([RLHF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def test_help_lists_groups_and_cfg_prints_the_config(tmp_path):
    out = rlhf("--help", cwd=tmp_path).stdout
    for line in (
        "task: arithmetic, guess, reasoning_gym, review, skyrl, task_schema, textarena",
        "model: hf",
        "logger: logger_schema, none, wandb",
        "sft: default",
    ):
        assert line in out
    cfg = rlhf("--cfg", "job", "task=arithmetic", "sft.learning_rate=0.02", cwd=tmp_path).stdout
    assert "env_id: rlhf/Arithmetic-v0" in cfg and "learning_rate: 0.02" in cfg
    module = subprocess.run(
        [sys.executable, "-m", "rlhf", "--cfg", "job", "seed=7"], cwd=tmp_path, capture_output=True, text=True
    )
    assert module.returncode == 0 and "seed: 7" in module.stdout
    assert not (tmp_path / "outputs").exists()  # --cfg runs nothing


@pytest.mark.parametrize(
    "args,needle",
    [
        (["sft.learnin_rate=1"], "sft.learnin_rate"),
        (["reward.num_train_epochs=many"], "reward.num_train_epochs"),
        (["stages=[sft,rl]"], "rlhf: error: stages: unknown rl"),
        (["model=hf"], "rlhf: error: model=hf needs model.name_or_path"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, needle):
    proc = rlhf(*args, "hydra.run.dir=run", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "sft").exists()


def _check_sweep(sweep: Path) -> None:
    groups, lrs = set(), set()
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert list(summary["stages"]) == ["sft"]
        assert summary["stages"]["sft"]["artifact"] == str((sweep / job / "sft").resolve())
        (run_dir,) = find_offline_runs(sweep / job)
        run = read_offline_run(run_dir)
        groups.add(run["run"]["group"])
        lrs.add(run["config"]["sft"]["learning_rate"])
        assert history_values(run, "train/loss")
    assert groups == {sweep.name}  # both jobs' runs in one W&B group
    assert lrs == {1e-3, 3e-3}


def test_multirun_basic_launcher(tmp_path):
    rlhf("-m", "stages=[sft]", "sft.learning_rate=1e-3,3e-3", "hydra.sweep.dir=sweep", *TINY, cwd=tmp_path)
    _check_sweep(tmp_path / "sweep")


@pytest.mark.slow
def test_default_run_meets_the_product_targets(tmp_path):
    """The acceptance run of the whole chain: `rlhf` with no overrides (review task, tiny model, W&B offline).

    Reward accuracy >= 0.80, PPO trained on the reward model beats SFT by >= 0.15 gold reward, every artifact
    loads with plain transformers, and the offline W&B runs hold the logged metrics of every stage.
    """
    rlhf("hydra.run.dir=out", cwd=tmp_path, timeout=900)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())["stages"]
    assert list(summary) == ["sft", "reward", "ppo", "evaluate"]
    accuracy = summary["reward"]["metrics"]["eval/accuracy"]
    assert accuracy >= 0.80
    evaluation = summary["evaluate"]["metrics"]
    assert evaluation["ppo/gold_reward"] - evaluation["sft/gold_reward"] >= 0.15
    assert evaluation["ppo/proxy_reward"] > evaluation["sft/proxy_reward"]
    assert evaluation["ppo/kl"] > 0
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    AutoModelForCausalLM.from_pretrained(summary["sft"]["artifact"])
    AutoModelForSequenceClassification.from_pretrained(summary["reward"]["artifact"])
    AutoModelForCausalLM.from_pretrained(summary["ppo"]["artifact"])
    assert (out / "ppo_curves.png").stat().st_size > 0
    runs = {r["run"]["job_type"]: r for r in map(read_offline_run, find_offline_runs(out))}
    assert set(runs) == {"sft", "reward", "ppo", "evaluate"}
    assert history_values(runs["reward"], "eval/accuracy")[-1] == accuracy
    assert len(history_values(runs["sft"], "train/loss")) >= 10
    assert len(history_values(runs["ppo"], "objective/kl")) == 64


def test_the_readme_environment_trains_from_the_users_own_package_into_summary_and_wandb_runs(tmp_path):
    """The README's "Write your own reward environment" example, copied into a package outside this repository,
    runs through every stage selected as `task.env_id=my_pkg.echo:Echo-v0`; the run writes summary.json, one
    offline W&B run per stage in the run's group, and the console lines to rlhf.log."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index('"""my_pkg/echo.py')
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "echo.py").write_text(readme[start : readme.index("```", start)])
    rlhf(
        "task.env_id=my_pkg.echo:Echo-v0",
        "ppo.reward_source=env",
        "hydra.run.dir=out",
        *TINY_CHAIN,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())["stages"]
    assert list(summary) == ["sft", "reward", "ppo", "evaluate"]
    assert 0.0 <= summary["evaluate"]["metrics"]["ppo/gold_reward"] <= 1.0
    assert summary["ppo"]["metrics"]["updates"] == 2
    assert "eval/accuracy" in summary["reward"]["metrics"]
    runs = [read_offline_run(d) for d in find_offline_runs(out)]
    assert sorted(r["run"]["job_type"] for r in runs) == ["evaluate", "ppo", "reward", "sft"]
    assert {r["run"]["group"] for r in runs} == {"out"}
    assert (out / "rlhf.log").read_text().count("[sft] step") >= 3  # console line per logged step
