"""The Hydra job a run is (its directory, W&B group and, in a multirun, its number and swept values) and the records
it leaves: Hydra's own `.hydra/` record and, in a multirun, `job.json`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.run.sweep import declared_keys, swept_values

if TYPE_CHECKING:
    from rlhf.config import RLHFConfig

JOB_RECORD = "job.json"
"""A multirun job's record in its directory: status, one-line error, overrides, seconds, number."""


@dataclass(frozen=True)
class HydraJob:
    """Where Hydra runs this invocation and, in a multirun, which job of which sweep it is."""

    run_dir: Path
    group: str
    """The W&B group: the sweep directory's name in a multirun, else the run directory's."""
    num: int | None = None
    """The job's number in a multirun, else None."""
    sweep_dir: Path | None = None
    """The sweep directory in a multirun, else None."""
    overrides: tuple[str, ...] = ()
    """The job's own command-line overrides (`ppo.kl_coef=0.02`, the swept values among them)."""
    swept: frozenset[str] | None = None
    """The keys the sweep varies (None: unknown, every override counts)."""


def hydra_job() -> HydraJob:
    """This invocation's place, from Hydra's runtime config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = tuple(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir).resolve()
        swept = declared_keys(sweep_dir, hc.sweeper.get("params")) or None
        return HydraJob(run_dir, group_name(sweep_dir), hc.job.num, sweep_dir, overrides, swept)
    return HydraJob(run_dir, group_name(run_dir), overrides=overrides)


def job_outside_hydra(run_dir: Path) -> HydraJob:
    """A run started from Python (`run(cfg, run_dir=...)`): a single run, grouped by its directory's name."""
    return HydraJob(Path(run_dir), group_name(Path(run_dir)))


def group_name(path: Path) -> str:
    """A readable group name: the directory's name, with its parent's when that is only a time (Hydra's default)."""
    path = path.resolve()
    name = path.name
    if re.fullmatch(r"[\d_:.-]+", name) and path.parent.name:
        name = f"{path.parent.name}_{name}"
    return name


def run_name(job: HydraJob, stage: str) -> str:
    """A W&B run's name: in a sweep, the job's swept values (`kl_coef=0.02,seed=1-ppo`), else `<group>-<stage>`."""
    if job.num is None:
        return f"{job.group}-{stage}"
    values = swept_values(job.overrides, job.swept)
    swept = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
    return f"{swept or job.num}-{stage}"


def write_hydra_record(cfg: RLHFConfig, run_dir: Path) -> None:
    """Hydra's record of the invocation (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`), written only once
    the config passed validation and the directory is locked: conf/config.yaml turns off Hydra's own early write
    (`hydra.output_subdir: null`), which would overwrite a finished run's record with a refused config."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def write_job_record(job_dir: Path, record: dict[str, Any]) -> None:
    """`<job dir>/job.json` (JOB_RECORD), written atomically: status (running | finished | failed), one-line
    error, overrides, seconds, number."""
    job_dir.mkdir(parents=True, exist_ok=True)
    tmp = job_dir / f"{JOB_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(job_dir / JOB_RECORD)


def read_job_record(job_dir: Path) -> dict[str, Any]:
    """`<job dir>/job.json`, or {} when there is none or it is unreadable."""
    try:
        return json.loads((Path(job_dir) / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return {}
