"""`rlhf-report SWEEP_DIR`: one table and one plot for a whole Hydra multirun sweep.

A sweep leaves one directory per job, each with its own summary.json; comparing them by hand means opening every
one. The report gathers them:

    SWEEP_DIR/report.csv   one row per job: swept values, status, error, seconds, cached stages, every final metric
    SWEEP_DIR/report.md    the same jobs with the headline metrics (printed too), and the mean over seeds per setting
    SWEEP_DIR/report.png   gold and proxy reward against KL to the reference policy, across jobs
                           (`rlhf.tracking.report_plot`); jobs that differ only in `seed` are one point (mean,
                           min-max bars)

`SweepReport`, a Hydra callback registered in conf/config.yaml, writes it at the end of every multirun.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, TextIO

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from rlhf.run.hydra_job import JOB_RECORD, read_job_record
from rlhf.run.summary import SUMMARY, in_pipeline_order, read_summary
from rlhf.run.sweep import MULTIRUN_RECORD, declared_keys, override_values
from rlhf.tracking.report_plot import plot

log = logging.getLogger("rlhf")

MAX_DEPTH = 3
"""How deep under the sweep dir a job dir may lie (`hydra.sweep.subdir` may nest it)."""
SEED_KEY = "seed"

HEADLINE = [
    ("evaluate", "ppo/kl"),
    ("evaluate", "ppo/gold_reward"),
    ("evaluate", "ppo/proxy_reward"),
    ("evaluate", "sft/gold_reward"),
    ("evaluate", "sft/proxy_reward"),
    ("evaluate", "ppo/success_rate"),
    ("ppo", "objective/kl"),
    ("ppo", "env/gold"),
    ("reward", "eval/accuracy"),
    ("sft", "train/loss"),
]
"""The metrics report.md shows, when some job has them (report.csv has them all)."""

PLOTTED = ("ppo/kl", "ppo/gold_reward", "ppo/proxy_reward", "sft/gold_reward", "sft/proxy_reward")
"""Evaluate metrics the plot reads; averaged per setting."""


# ------------------------------------------------------------------------------------------------- reading jobs


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job dirs of the sweep: sub-dirs holding job.json or summary.json, at most MAX_DEPTH levels down.

    Found by their files, not by name, so that any `hydra.sweep.subdir` layout works."""
    found = []
    for depth in range(1, MAX_DEPTH + 1):
        for path in sweep_dir.glob("/".join(["*"] * depth)):
            if path.is_dir() and ((path / JOB_RECORD).exists() or (path / SUMMARY).exists()):
                found.append(path)
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    """Sort `2` before `10`: Hydra numbers job dirs without padding."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def read_stages(job_dir: Path) -> dict[str, Any]:
    """The job's finished stages from its summary.json, or {} when it has none or it is unreadable."""
    try:
        return read_summary(job_dir)["stages"]
    except (OSError, ValueError):
        return {}


def job_overrides(job_dir: Path, job: dict[str, Any]) -> dict[str, str]:
    """The job's overrides: from job.json, else from Hydra's `.hydra/overrides.yaml` record."""
    if "overrides" in job:
        return override_values(list(job["overrides"]))
    record = job_dir / ".hydra" / "overrides.yaml"
    if record.exists():
        return override_values([str(o) for o in OmegaConf.load(record)])
    return {}


def job_status(job: dict[str, Any], stages: dict[str, Any]) -> str:
    """finished / failed / running from job.json; without it, finished when PPO or evaluate has finished."""
    if job.get("status"):
        return str(job["status"])
    return "finished" if "evaluate" in stages or "ppo" in stages else "unknown"


def collapse_whitespace(text: Any) -> str:
    """`text` on one line, each run of whitespace (newlines included) one space; "" for None."""
    return " ".join(str(text).split()) if text else ""


def read_job(sweep_dir: Path, job_dir: Path) -> dict[str, Any]:
    """Everything the report needs from one job dir, flat: its row of report.csv (plus `overrides`)."""
    job = read_job_record(job_dir)
    stages = read_stages(job_dir)
    seconds = job.get("seconds")
    if seconds is None and stages:
        seconds = sum(float(entry.get("seconds", 0.0)) for entry in stages.values())
    row: dict[str, Any] = {
        "job": job_dir.relative_to(sweep_dir).as_posix(),
        "status": job_status(job, stages),
        "error": collapse_whitespace(job.get("error")),
        "seconds": round(float(seconds), 1) if seconds is not None else None,
        "cached": " ".join(name for name in in_pipeline_order(stages) if stages[name].get("cached", False)),
        "overrides": job_overrides(job_dir, job),
    }
    for name in in_pipeline_order(stages):
        for metric, value in stages[name].get("metrics", {}).items():
            row[f"{name}/{metric}"] = value
    return row


# -------------------------------------------------------------------------------------------------- swept keys


def swept_keys(jobs: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """Override keys whose value differs across jobs, plus the sweep params named in multirun.yaml (so a sweep
    whose other jobs have not started yet still shows its column); in order of first appearance."""
    keys: list[str] = []
    for job in jobs:
        keys += [key for key in job["overrides"] if key not in keys]
    declared = sorted(declared_keys(sweep_dir))
    return [
        key
        for key in keys + [k for k in declared if k not in keys]
        if key in declared or len({job["overrides"].get(key) for job in jobs}) > 1
    ]


def add_swept_values(jobs: list[dict[str, Any]], keys: list[str]) -> None:
    """Give every job one column per swept key (empty when the job did not set it)."""
    for job in jobs:
        for key in keys:
            job[key] = job["overrides"].get(key, "")


# ------------------------------------------------------------------------------------------------- aggregation


def plottable(job: dict[str, Any]) -> bool:
    """A job on the plot: not failed, with the evaluate stage's PPO KL and gold reward."""
    return (
        job["status"] != "failed"
        and _number(job.get("evaluate/ppo/kl")) is not None
        and _number(job.get("evaluate/ppo/gold_reward")) is not None
    )


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, text, NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def aggregate(jobs: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One row per setting (swept values other than `seed`) over its plottable jobs: `n`, and for each PLOTTED
    metric `<metric> mean`, `min`, `max`, `std` (0 for one seed). Settings sorted by mean PPO KL."""
    setting_keys = [key for key in keys if key != SEED_KEY]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in filter(plottable, jobs):
        groups.setdefault(tuple(job[key] for key in setting_keys), []).append(job)
    settings = []
    for values, members in groups.items():
        row: dict[str, Any] = dict(zip(setting_keys, values))
        row["n"] = len(members)
        for metric in PLOTTED:
            numbers = [
                n for n in (_number(job.get(f"evaluate/{metric}")) for job in members) if n is not None
            ]
            if numbers:
                row[f"{metric} mean"] = statistics.fmean(numbers)
                row[f"{metric} min"] = min(numbers)
                row[f"{metric} max"] = max(numbers)
                row[f"{metric} std"] = statistics.pstdev(numbers)
        settings.append(row)
    return sorted(settings, key=lambda row: row["ppo/kl mean"])


# ----------------------------------------------------------------------------------------------------- writing


def table_columns(jobs: list[dict[str, Any]], keys: list[str], headline: bool) -> list[str]:
    """Job, swept keys, status, seconds, cached, the metrics (headline ones or all), error last (it is long)."""
    present = [column for job in jobs for column in job if "/" in column and column not in keys]
    if headline:
        metrics = [f"{stage}/{m}" for stage, m in HEADLINE if f"{stage}/{m}" in present]
    else:
        metrics = list(dict.fromkeys(present))
    return ["job", *keys, "status", "seconds", "cached", *metrics, "error"]


def write_csv(path: Path, jobs: list[dict[str, Any]], columns: list[str]) -> None:
    """report.csv: every job, every column, full precision (for pandas / a spreadsheet)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: "" if job.get(c) is None else job.get(c) for c in columns} for job in jobs)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table; numbers to 4 significant digits."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def settings_table(settings: list[dict[str, Any]], keys: list[str]) -> str:
    """Mean over seeds per setting, `mean (min..max)`, for the sweep's report.md."""
    metrics = [m for m in PLOTTED if any(f"{m} mean" in s for s in settings)]
    rows = []
    for s in settings:
        row = {key: s[key] for key in keys if key != SEED_KEY} | {"seeds": s["n"]}
        for m in metrics:
            if f"{m} mean" in s:
                row[m] = f"{s[f'{m} mean']:.4g} ({s[f'{m} min']:.4g}..{s[f'{m} max']:.4g})"
        rows.append(row)
    return markdown_table(rows, [key for key in keys if key != SEED_KEY] + ["seeds", *metrics])


def sync_command(sweep_dir: Path) -> str | None:
    """The one command that uploads every offline W&B run of the sweep and then declares their lineage
    (`rlhf-sync`, rlhf/tracking/wandb_sync.py), or None when the sweep logged no W&B run."""
    if not any(sweep_dir.glob("**/wandb/offline-run-*")):
        return None
    return f"rlhf-sync {shlex.quote(str(sweep_dir))}"


def write_report(sweep_dir: Path) -> dict[str, Any]:
    """Write report.csv, report.md and report.png into the sweep dir; returns the Markdown table and the paths."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir} is not a directory: pass a Hydra multirun sweep dir (hydra.sweep.dir)")
    jobs = [read_job(sweep_dir, job_dir) for job_dir in find_jobs(sweep_dir)]
    if not jobs:
        raise ValueError(f"{sweep_dir} holds no job (no sub-dir with {JOB_RECORD} or {SUMMARY})")
    keys = swept_keys(jobs, sweep_dir)
    add_swept_values(jobs, keys)
    write_csv(sweep_dir / "report.csv", jobs, table_columns(jobs, keys, headline=False))
    table = markdown_table(jobs, table_columns(jobs, keys, headline=True))
    settings = aggregate(jobs, keys)
    text = f"# Sweep {sweep_dir.name}: {len(jobs)} jobs\n\n{table}\n"
    if any(s["n"] > 1 for s in settings):
        text += f"\n## Mean over seeds per setting (min..max)\n\n{settings_table(settings, keys)}\n"
    (sweep_dir / "report.md").write_text(text)
    png = plot(sweep_dir / "report.png", settings, [key for key in keys if key != SEED_KEY])
    return {
        "markdown": text,
        "table": table,
        "settings": settings,
        "png": png,
        "sync": sync_command(sweep_dir),
        "jobs": jobs,
        "failed": [job for job in jobs if job["status"] == "failed"],
    }


def print_report(sweep_dir: Path, report: dict[str, Any], out: TextIO | None = None) -> None:
    """The Markdown, where the files are, and the W&B sync command."""
    out = out or sys.stdout
    print(report["markdown"], file=out)
    written = ["report.csv", "report.md"] + (["report.png"] if report["png"] else [])
    print(f"Sweep report: {', '.join(str(Path(sweep_dir) / name) for name in written)}", file=out)
    if report["png"] is None:
        print(
            "No plot: no job has finished its evaluate stage (evaluate/ppo/kl, evaluate/ppo/gold_reward).",
            file=out,
        )
    if report["sync"]:
        print(f"Upload the sweep's offline W&B runs and their lineage: {report['sync']}", file=out)


class SweepReport(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): records the sweep's command line before the jobs start
    and writes the sweep report when they have all ended.

    A report is a convenience: any error in it is one warning. A sweep with a failed job exits non-zero after the
    report, as Hydra's own sweeps do, but only once every other job has finished."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra's basic sweeper writes multirun.yaml itself; others (Optuna) do not, and the jobs read the swept keys
        # from it for their W&B run names
        path = Path(config.hydra.sweep.dir) / MULTIRUN_RECORD
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, path)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            report = write_report(sweep_dir)
            print_report(sweep_dir, report)
        except Exception as e:
            log.warning("sweep report not written: %s: %s", type(e).__name__, collapse_whitespace(e))
            return
        if report["failed"]:
            first = report["failed"][0]
            raise SystemExit(
                f"rlhf: {len(report['failed'])} of {len(report['jobs'])} jobs failed (job {first['job']}: "
                f"{first['error']}); the others finished: see {sweep_dir / 'report.md'}"
            )


def main(argv: list[str] | None = None) -> None:
    """`rlhf-report SWEEP_DIR`."""
    parser = argparse.ArgumentParser(
        prog="rlhf-report",
        description="Table (report.csv, report.md) and reward-vs-KL plot (report.png) of a Hydra multirun sweep.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.sweep_dir)
    except ValueError as e:
        raise SystemExit(f"rlhf-report: error: {e}") from None
    print_report(args.sweep_dir, report)


if __name__ == "__main__":
    main()
