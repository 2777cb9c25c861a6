"""Sweeps through the real `rlhf -m`: the stage cache shared by parallel jobs, failure isolation, W&B names, swept
values and lineage, the Optuna sweeper and the sweep presets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.run.hydra_job import HydraJob, run_name
from rlhf.run.sweep import declared_keys, swept_values
from rlhf.tracking.wandb_offline import find_offline_runs, read_offline_run
from tests.helpers import TINY_CHAIN

RLHF = str(Path(sys.executable).with_name("rlhf"))


def rlhf(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # each job starts its own W&B service
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([RLHF, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _jobs(sweep: Path) -> dict[str, dict]:
    """{ppo.kl_coef value: {"job": job.json, "summary": summary.json or None, "dir": job dir}}."""
    out = {}
    for job_file in sweep.glob("*/job.json"):
        job = json.loads(job_file.read_text())
        summary = job_file.parent / "summary.json"
        kl = swept_values(tuple(job["overrides"]))["ppo.kl_coef"]
        out[kl] = {
            "job": job,
            "summary": json.loads(summary.read_text()) if summary.exists() else None,
            "dir": job_file.parent,
        }
    return out


def test_run_names_show_the_swept_values(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: ['ppo.kl_coef=0.02,0.1', '+task.env_kwargs.max_terms=2,3', 'seed=0']\n"
    )
    keys = declared_keys(tmp_path, {"ppo.learning_rate": "interval(1e-4, 1e-3)"})
    assert keys == {"ppo.kl_coef", "task.env_kwargs.max_terms", "ppo.learning_rate"}
    assert declared_keys(tmp_path / "elsewhere") == frozenset()
    overrides = ("ppo.kl_coef=0.1", "+task.env_kwargs.max_terms=2", "seed=0")
    job = HydraJob(Path("/s/1"), "sweep", 1, Path("/s"), overrides, keys)
    assert swept_values(job.overrides, keys) == {"ppo.kl_coef": "0.1", "task.env_kwargs.max_terms": "2"}
    assert run_name(job, "ppo") == "kl_coef=0.1,max_terms=2-ppo"
    assert run_name(HydraJob(Path("/s/1"), "sweep", 1, Path("/s"), overrides), "ppo") == (
        "kl_coef=0.1,max_terms=2,seed=0-ppo"  # swept keys unknown: every override
    )
    assert run_name(HydraJob(Path("/r"), "r"), "sft") == "r-sft"  # a single run
    assert (
        run_name(HydraJob(Path("/s/0"), "sweep", 0, Path("/s")), "sft") == "0-sft"
    )  # a job without overrides


LAUNCHERS = {
    # the basic launcher (jobs one after the other, in this process) runs the same job code: its multirun is
    # tests/test_cli.py::test_multirun_basic_launcher, its cache tests/test_stage_cache.py
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    # submitit_local: the same plugin as hydra/launcher=slurm on a cluster
    "submitit_local": ["hydra/launcher=submitit_local"],
}


def sweep_with(launcher: str, cwd: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`rlhf -m` of three jobs (one with a bad value) on `launcher`: the process and its sweep dir."""
    proc = rlhf(
        "-m", *LAUNCHERS[launcher], "ppo.kl_coef=0.02,0.1,-1", "hydra.sweep.dir=sweep", *TINY_CHAIN, cwd=cwd
    )
    return proc, cwd / "sweep"


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The joblib sweep, run once: its test checks it, the Optuna sweep starts from its stage cache."""
    return sweep_with("joblib", tmp_path_factory.mktemp("joblib"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_sweep_trains_shared_stages_once_and_keeps_going_past_a_failed_job(request, tmp_path, launcher):
    if launcher == "joblib":
        proc, sweep = request.getfixturevalue("joblib_sweep")
    else:
        proc, sweep = sweep_with(launcher, tmp_path)
    jobs = _jobs(sweep)
    assert set(jobs) == {"0.02", "0.1", "-1"}, proc.stderr[-2000:]

    # the bad value fails its own job with one line; the others finish
    failed = jobs.pop("-1")["job"]
    assert failed["status"] == "failed" and "ppo.kl_coef" in failed["error"] and "\n" not in failed["error"]
    assert all(j["job"]["status"] == "finished" for j in jobs.values()), proc.stderr[-2000:]

    # SFT and the reward model were trained by one job and reused from the cache by the other, also in parallel
    summaries = [j["summary"]["stages"] for j in jobs.values()]
    for stage in ("sft", "reward"):
        assert sorted(s[stage]["cached"] for s in summaries) == [False, True]
        assert len({s[stage]["cache_entry"] for s in summaries}) == 1
        assert len({s[stage]["key"] for s in summaries}) == 1
        assert Path(summaries[0][stage]["cache_entry"]).parent == (sweep / ".stage_cache").resolve()
    assert not any(s["ppo"]["cached"] for s in summaries)
    assert all("ppo/gold_reward" in s["evaluate"]["metrics"] for s in summaries)

    # W&B: one group for the sweep, names and config columns with the swept value, lineage to the models used
    for kl, job in jobs.items():
        runs = {r["run"]["job_type"]: r for r in map(read_offline_run, find_offline_runs(job["dir"]))}
        stages = job["summary"]["stages"]
        ppo = runs["ppo"]
        assert ppo["run"]["group"] == "sweep" and ppo["run"]["name"] == f"kl_coef={kl}-ppo"
        assert ppo["config"]["swept"] == {"ppo.kl_coef": kl}
        for upstream in ("sft", "reward"):
            used = ppo["config"]["inputs"][upstream]
            assert used["artifact"] == stages[upstream]["wandb_artifact"] is not None
            assert used["key"] == stages[upstream]["key"] and used["cached"] == stages[upstream]["cached"]
        assert set(runs) == {"ppo", "evaluate"} | {s for s in ("sft", "reward") if not stages[s]["cached"]}
    # the report, written by the sweep's callback: every job, the failed one with its error, and the plot
    rows = {row["ppo.kl_coef"]: row for row in csv.DictReader((sweep / "report.csv").open())}
    assert {k: r["status"] for k, r in rows.items()} == {
        "0.02": "finished",
        "0.1": "finished",
        "-1": "failed",
    }
    assert rows["-1"]["error"] == failed["error"]
    # each shared stage is reused by exactly one of the two parallel jobs (which one trained it is a race)
    reused = sorted(stage for k, r in rows.items() if k != "-1" for stage in r["cached"].split())
    assert reused == ["reward", "sft"]
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| job | ppo.kl_coef | status |" in proc.stdout
    assert f"rlhf-sync {sweep.name}" in proc.stdout  # the one command that uploads the sweep
    assert proc.returncode != 0 and "1 of 3 jobs failed" in proc.stderr  # still said, after the report

    # offline, the lineage waits in each run's config; rlhf-sync uploads every run and then declares it
    sync = subprocess.run(
        [str(Path(sys.executable).with_name("rlhf-sync")), str(sweep), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert sync.returncode == 0, sync.stderr
    assert sync.stdout.count("/wandb/offline-run-") == sum(
        len(find_offline_runs(j["dir"])) for j in jobs.values()
    )
    for job in jobs.values():
        stages = job["summary"]["stages"]
        for upstream in ("sft", "reward"):  # PPO's inputs (evaluate reads them too)
            line = f"lineage: run {stages['ppo']['wandb_run']} (kl_coef="
            assert (
                f"{line}{swept_values(tuple(job['job']['overrides']))['ppo.kl_coef']}-ppo) uses "
                + stages[upstream]["wandb_artifact"]
                in sync.stdout
            )


@pytest.mark.slow
def test_the_optuna_sweeper_returns_the_best_value_of_the_named_metric(tmp_path, joblib_sweep):
    # SFT and the reward model come from the joblib sweep's cache (the same settings); no W&B: nothing read here
    proc = rlhf(
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.direction=maximize",
        "+hydra.sweeper.sampler.seed=0",
        "ppo.kl_coef=interval(0.01,0.3)",
        "objective=stages.evaluate.metrics.ppo/gold_reward",
        "hydra.sweep.dir=sweep",
        *TINY_CHAIN,
        "logger=none",
        f"cache_dir={joblib_sweep[1] / '.stage_cache'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "sweep"
    values = [
        json.loads(p.read_text())["stages"]["evaluate"]["metrics"]["ppo/gold_reward"]
        for p in sweep.glob("*/summary.json")
    ]
    assert len(values) == 2
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(values))
    assert 0.01 <= result["best_params"]["ppo.kl_coef"] <= 0.3


@pytest.mark.parametrize("preset", ["kl_seed", "reward_source", "optuna"])
def test_each_sweep_preset_composes_its_sweep(tmp_path, preset):
    proc = rlhf(f"sweep={preset}", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = yaml.safe_load(proc.stdout)["hydra"]["sweeper"]["params"]
    assert {"kl_seed": "ppo.kl_coef", "reward_source": "ppo.reward_source", "optuna": "ppo.kl_coef"}[
        preset
    ] in params


def test_the_slurm_launcher_preset_is_submitits(tmp_path):
    proc = rlhf("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1
