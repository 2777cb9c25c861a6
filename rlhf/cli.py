"""The `rlhf` command: Hydra composes `conf/` over the dataclass schemas and hands the config to the pipeline."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rlhf.config import register_configs

if TYPE_CHECKING:
    from rlhf.run.hydra_job import HydraJob

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""`conf/` beside the `rlhf` package (the repository, or site-packages for a wheel install)."""

log = logging.getLogger("rlhf")

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One run, or one job of a multirun; returns `cfg.objective`'s value (what the Optuna sweeper optimises)."""
    from rlhf.run.hydra_job import hydra_job
    from rlhf.run.pipeline import InputError, run

    job = hydra_job()
    if job.num is None:
        try:
            return objective_value(run(cfg), cfg.objective)
        except InputError as e:  # a user mistake found before training: one line, no traceback
            raise SystemExit(f"rlhf: error: {e}") from None
    return sweep_job(cfg, job)


def sweep_job(cfg: DictConfig, job: HydraJob) -> float | None:
    """A multirun job: a failure (a bad value, an environment that raises) is recorded in `<job dir>/job.json`
    with its one-line error and the traceback in the job's log, and does not stop the sweep's other jobs, with
    any launcher; the sweep report lists it. Returns None when it failed (Optuna: a failed trial)."""
    from rlhf.run.hydra_job import write_job_record
    from rlhf.run.pipeline import InputError, run

    record = {
        "status": "running",
        "error": None,
        "overrides": list(job.overrides),
        "seconds": 0.0,
        "num": job.num,
    }
    write_job_record(job.run_dir, record)
    start = time.perf_counter()
    try:
        summary = run(cfg)
        record["status"] = "finished"
        return objective_value(summary, cfg.objective)
    except Exception as e:  # noqa: BLE001 -- isolate the job; KeyboardInterrupt still stops the sweep
        record["status"], record["error"] = "failed", error_line(e)
        if isinstance(e, InputError):
            log.error("rlhf: error: %s", e)
        else:
            log.exception("job %s failed", job.num)
        return None
    finally:
        record["seconds"] = round(time.perf_counter() - start, 3)
        write_job_record(job.run_dir, record)


def error_line(error: BaseException) -> str:
    """An exception as one line: the message of a user error, `Type: first line` of anything else."""
    from rlhf.run.pipeline import InputError

    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, InputError) else f"{type(error).__name__}: {text}"


def objective_value(summary: dict[str, Any], path: str) -> float | None:
    """The value at a dotted `path` into summary.json (`stages.evaluate.metrics.ppo/gold_reward`), or None when
    the run has none (e.g. it did not evaluate). Keys may contain dots: the longest matching one is taken."""
    node: Any = summary
    rest = path
    while rest:
        if not isinstance(node, dict):
            return None
        match = max((k for k in node if rest == k or rest.startswith(k + ".")), key=len, default=None)
        if match is None:
            return None
        node, rest = node[match], rest[len(match) + 1 :]
    return float(node) if isinstance(node, int | float) else None


def main() -> None:
    """`rlhf <overrides>`: every user error is one line, `rlhf: error: ...`, Hydra's (unknown key, wrong type,
    unknown option, malformed override) included; any other failure keeps its full traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a multi-line report
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"rlhf: error: {hydra_error_line(e)}") from None


def hydra_error_line(error: BaseException) -> str:
    """A Hydra or OmegaConf error on one line: its message and its cause's, the first `full_key` last (Hydra's
    config search path and the lines that echo the override left out): `Error merging override
    ppo.batch_size=abc: Value 'abc' of type 'str' could not be converted to Integer (full_key: ppo.batch_size)`."""
    parts = [str(error)]
    if error.__cause__ is not None and str(error.__cause__) not in parts[0]:
        parts.append(str(error.__cause__))
    text = ": ".join(p.strip() for p in parts if p.strip()).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keys = [line for line in lines if line.startswith("full_key:") and line != "full_key:"]
    head = [line for line in lines if "=" not in line.split(" ")[0] and not line.startswith("full_key:")]
    return " ".join(head) + (f" ({keys[0]})" if keys else "")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `rlhf <overrides>` would run, without Hydra's app machinery (tests, notebooks, benchmarks).

    Pass it to `rlhf.run.pipeline.run(cfg, run_dir=...)`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="rlhf"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


if __name__ == "__main__":
    main()
