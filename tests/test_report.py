"""rlhf.tracking.report: the sweep table, the mean over seeds, the plot, the Hydra callback, and a real multirun."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf.tracking import report

KL_COEFS = ("0.02", "0.05", "0.1")
SEEDS = (0, 1)


def evaluate_metrics(kl_coef: str, seed: int) -> dict[str, float]:
    """Synthetic evaluate metrics: a lower kl_coef drifts further (more KL), the proxy keeps rising while
    gold falls past a point; the seed shifts every value a little."""
    kl = 0.2 / float(kl_coef) + seed  # 10, 4, 2 (+ seed)
    return {
        "ppo/kl": kl,
        "ppo/gold_reward": 0.6 - 0.02 * (kl - 4) ** 2 + 0.1 * seed,
        "ppo/proxy_reward": 0.1 * kl + 0.2 * seed,
        "sft/gold_reward": 0.3 + 0.1 * seed,
        "sft/proxy_reward": 0.0 + 0.1 * seed,
        "sft/kl": 0.0,
    }


def write_job(
    job_dir: Path,
    overrides: list[str],
    stages: dict[str, dict[str, float]],
    job: dict | None = None,
    cached: tuple[str, ...] = (),
) -> None:
    """A job dir as rlhf writes it: summary.json (rlhf.run.summary's format) and, in multirun, job.json."""
    job_dir.mkdir(parents=True)
    entries = {
        name: {
            "artifact": str(job_dir / name),
            "seconds": 2.5,
            "metrics": metrics,
            "wandb_run": None,
            "key": f"key-{name}",
            "config": {},
            **({"cached": True, "cache_entry": f"/cache/{name}"} if name in cached else {}),
        }
        for name, metrics in stages.items()
    }
    summary = {"base": {"artifact": str(job_dir / "base"), "key": "b", "config": {}}, "stages": entries}
    (job_dir / "summary.json").write_text(json.dumps(summary))
    if job is not None:
        (job_dir / "job.json").write_text(json.dumps({"overrides": overrides, **job}))


def chain(kl_coef: str, seed: int) -> dict[str, dict[str, float]]:
    return {
        "sft": {"train/loss": 2.0 - 0.1 * seed},
        "reward": {"eval/accuracy": 0.8},
        "ppo": {"objective/kl": 1.0, "env/gold": 0.5},
        "evaluate": evaluate_metrics(kl_coef, seed),
    }


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """3 kl_coef x 2 seeds, finished (job 0 reused its cached sft and reward), and job 6 failed after SFT."""
    sweep = tmp_path / "sweep"
    num = 0
    for kl_coef in KL_COEFS:
        for seed in SEEDS:
            overrides = [f"ppo.kl_coef={kl_coef}", f"seed={seed}", "ppo.total_episodes=64"]
            job = {"status": "finished", "error": None, "seconds": 10.0 + num, "num": num}
            cached = ("sft", "reward") if num == 0 else ()
            write_job(sweep / str(num), overrides, chain(kl_coef, seed), job, cached)
            num += 1
    failed = {
        "status": "failed",
        "error": "ValueError: ppo.batch_size=7\n  must divide 64",
        "seconds": 3.0,
        "num": 6,
    }
    write_job(
        sweep / "6",
        ["ppo.kl_coef=0.5", "seed=0", "ppo.total_episodes=64"],
        {"sft": {"train/loss": 2.0}},
        failed,
    )
    return sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_table_has_every_job_its_swept_values_status_and_error(sweep, capsys):
    report.main([str(sweep)])
    rows = read_csv(sweep / "report.csv")
    assert [row["job"] for row in rows] == [str(i) for i in range(7)]
    columns = list(rows[0])
    # only the keys that differ across jobs; ppo.total_episodes is the same everywhere
    assert columns[:6] == ["job", "ppo.kl_coef", "seed", "status", "seconds", "cached"]
    assert columns[-1] == "error"
    assert {"evaluate/ppo/gold_reward", "reward/eval/accuracy", "sft/train/loss"} <= set(columns)
    first = rows[0]
    assert (first["ppo.kl_coef"], first["seed"], first["status"]) == ("0.02", "0", "finished")
    assert float(first["seconds"]) == 10.0
    assert first["cached"] == "sft reward" and rows[1]["cached"] == ""
    assert float(rows[3]["evaluate/ppo/kl"]) == pytest.approx(5.0)  # kl_coef 0.05, seed 1
    failed = rows[6]
    assert (failed["ppo.kl_coef"], failed["status"]) == ("0.5", "failed")
    assert failed["error"] == "ValueError: ppo.batch_size=7 must divide 64"  # one line
    assert failed["evaluate/ppo/gold_reward"] == "" and failed["sft/train/loss"] == "2.0"

    markdown = (sweep / "report.md").read_text()
    printed = capsys.readouterr().out
    header = "| job | ppo.kl_coef | seed | status | seconds | cached | evaluate/ppo/kl |"
    assert header in markdown and header in printed
    assert "| 6 | 0.5 | 0 | failed | 3 |" in markdown
    assert "evaluate/sft/kl" not in markdown  # report.md shows the headline metrics only
    assert str(sweep / "report.png") in printed


def test_seeds_are_averaged_per_setting_and_failed_jobs_left_out(sweep):
    jobs = [report.read_job(sweep, d) for d in report.find_jobs(sweep)]
    keys = report.swept_keys(jobs, sweep)
    report.add_swept_values(jobs, keys)
    settings = report.aggregate(jobs, keys)
    # sorted by mean KL: kl_coef 0.1 (KL 2, 3), 0.05 (4, 5), 0.02 (10, 11); the failed 0.5 has no evaluate
    assert [(s["ppo.kl_coef"], s["n"]) for s in settings] == [("0.1", 2), ("0.05", 2), ("0.02", 2)]
    assert all("seed" not in s for s in settings)  # the seeds are what is averaged over
    mid = settings[1]
    golds = [evaluate_metrics("0.05", seed)["ppo/gold_reward"] for seed in SEEDS]
    assert mid["ppo/kl mean"] == pytest.approx(4.5)
    assert (mid["ppo/kl min"], mid["ppo/kl max"], mid["ppo/kl std"]) == pytest.approx((4.0, 5.0, 0.5))
    assert mid["ppo/gold_reward mean"] == pytest.approx(sum(golds) / 2)
    assert (mid["ppo/gold_reward min"], mid["ppo/gold_reward max"]) == pytest.approx((min(golds), max(golds)))
    assert mid["sft/proxy_reward mean"] == pytest.approx(0.05)

    report.write_report(sweep)
    markdown = (sweep / "report.md").read_text()
    assert "## Mean over seeds per setting" in markdown
    assert "| 0.05 | 2 | 4.5 (4..5) |" in markdown


def test_plot_is_a_png_of_the_evaluated_jobs(sweep):
    from matplotlib import image

    report.write_report(sweep)
    png = sweep / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # two panels with points, bars, labels: not an empty canvas
    height, width, _ = image.imread(png).shape
    assert width > height > 300


def test_jobs_without_job_json_nor_evaluate(tmp_path, capsys):
    """Hydra's .hydra/overrides.yaml stands in for job.json; a sweep of SFT only has a table and no plot; the
    keys swept in multirun.yaml are columns even before a second job exists."""
    sweep = tmp_path / "sweep"
    write_job(sweep / "0", [], {"sft": {"train/loss": 2.0}})
    (sweep / "0" / ".hydra").mkdir()
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- stages=[sft]\n- sft.learning_rate=0.001\n")
    task = ["stages=[sft]", "sft.learning_rate=0.001,0.003"]
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), sweep / "multirun.yaml")
    (sweep / "report.png").write_bytes(b"stale")

    report.main([str(sweep)])
    (row,) = read_csv(sweep / "report.csv")
    assert row["sft.learning_rate"] == "0.001" and "stages" not in row
    assert row["status"] == "unknown" and float(row["seconds"]) == 2.5
    assert not (sweep / "report.png").exists()
    assert "No plot" in capsys.readouterr().out


def test_nested_job_dirs_are_found(tmp_path):
    """hydra.sweep.subdir=${ppo.kl_coef}/${seed} nests job dirs two levels down."""
    sweep = tmp_path / "sweep"
    for seed in SEEDS:
        job = {"status": "finished", "error": None, "seconds": 1.0, "num": seed}
        write_job(sweep / "0.1" / str(seed), ["ppo.kl_coef=0.1", f"seed={seed}"], chain("0.1", seed), job)
    (sweep / "0.1" / "0" / "ppo").mkdir()  # a stage's output dir is no job
    assert [d.relative_to(sweep).as_posix() for d in report.find_jobs(sweep)] == ["0.1/0", "0.1/1"]


def test_bad_sweep_dir_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="rlhf-report: error: .* holds no job"):
        report.main([str(tmp_path)])


def test_callback_prints_table_and_sync_command_and_exits_non_zero_after_a_failed_job(
    sweep, tmp_path, capsys, caplog
):
    for job in ("0", "1"):
        run = sweep / job / "wandb" / f"offline-run-20260101_000000-run{job}"
        run.mkdir(parents=True)
        (run / f"run-run{job}.wandb").write_bytes(b"")
    callback = report.SweepReport()
    with pytest.raises(
        SystemExit, match=r"rlhf: 1 of 7 jobs failed \(job 6: ValueError: ppo.batch_size=7 must"
    ):
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    out = capsys.readouterr().out  # the report came first
    assert "| job | ppo.kl_coef | seed |" in out
    (command,) = [line.split(": ", 1)[1] for line in out.splitlines() if "rlhf-sync" in line]
    assert command == f"rlhf-sync {sweep}"
    assert (sweep / "report.md").exists()

    with caplog.at_level(logging.WARNING, logger="rlhf"):
        callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "none")}}}))
    assert "sweep report not written" in caplog.text


def test_config_registers_the_callback():
    from hydra.utils import get_class

    conf = OmegaConf.load(Path(__file__).parent.parent / "conf" / "config.yaml")
    assert get_class(conf.hydra.callbacks.sweep_report._target_) is report.SweepReport
