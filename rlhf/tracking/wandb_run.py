"""One W&B run per stage (offline by default), grouped by pipeline run or sweep (reading runs back: `wandb_offline`).

Every stage gets a `StageTracker`. With `logger=none` it is a no-op that still prints one console line per logged
step, so stages never branch on the backend. TRL trainers log into the already-initialised run through
`report_to="wandb"` (transformers' WandbCallback reuses `wandb.run`). The training loops print their own progress bars
and compact lines (`rlhf.tracking.console`): the tracker gets every metric, the console a handful.

W&B keeps everything under the run directory: WANDB_DIR, WANDB_DATA_DIR (artifact staging) and WANDB_CACHE_DIR
point there, so an offline run works with no network, no account and no writes to the home directory;
`wandb sync <run_dir>/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf.config import RLHFConfig

log = logging.getLogger("rlhf")

COPY_LIMIT_BYTES = 256 * 2**20
"""Outputs above this size are logged as references to their directory (no copy, no upload of the weights)."""


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_metrics(stage: str, metrics: dict[str, Any], step: int | None) -> str:
    """One console line: `[sft] step 20 | train/loss=1.234 | ...`."""
    head = f"[{stage}]" + (f" step {step}" if step is not None else "")
    return " | ".join([head, *(f"{k}={_format_value(v)}" for k, v in metrics.items())])


def plain_scalar(value: Any) -> Any:
    """Tensors and numpy scalars -> python numbers (W&B and JSON both want plain values)."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


class StageTracker:
    """A stage's W&B run, or a console-only stand-in when `run` is None."""

    def __init__(self, stage: str = "", run: Any = None, log_artifacts: bool = True) -> None:
        self.stage = stage
        self._run = run
        self._log_artifacts = log_artifacts
        self.run_id: str | None = run.id if run is not None else None
        """W&B run id (None when logging is off)."""
        self.report_to: str = "wandb" if run is not None else "none"
        """What to pass to TRL's `report_to`."""
        self.dir: Path | None = Path(run.dir).parent if run is not None else None
        """The W&B run's own directory (`.../wandb/offline-run-*`), None when logging is off."""
        self.recorded_steps: set[int] = set()
        """Steps that earlier processes of this (resumed) W&B run already wrote: never written twice."""

    @property
    def enabled(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, float], step: int, console: bool = True) -> None:
        """W&B log at `step` and, with `console`, one line of every metric (through `logging`, logger `rlhf`)."""
        metrics = {k: plain_scalar(v) for k, v in metrics.items()}
        if console:
            log.info(format_metrics(self.stage, metrics, step))
        if self._run is not None and not self._recorded(step):
            # W&B steps only move forward: a step already passed (e.g. after TRL's own logging) goes to the next row.
            if step is not None and step >= self._run.step:
                self._run.log(metrics, step=step)
            else:
                self._run.log(metrics)

    def _recorded(self, step: int | None) -> bool:
        """A resumed run never writes a step twice: not one an earlier process wrote, nor one it has passed."""
        if not self.recorded_steps or step is None:
            return False
        return step in self.recorded_steps or step < self._run.step

    def log_table(self, key: str, columns: list[str], rows: list[list], step: int | None = None) -> None:
        """A `wandb.Table` (e.g. prompt / completion / gold reward samples); the first rows also go to the console."""
        for row in rows[:3]:
            log.info(
                "[%s] %s: %s",
                self.stage,
                key,
                " | ".join(f"{c}={_format_value(v)}" for c, v in zip(columns, row)),
            )
        if self._run is None or self._recorded(step):
            return
        import wandb

        table = wandb.Table(columns=list(columns), data=[[plain_scalar(v) for v in row] for row in rows])
        if step is not None and step >= self._run.step:
            self._run.log({key: table}, step=step)
        else:
            self._run.log({key: table})

    def log_artifact(self, path: Path, name: str, type: str) -> None:
        """Log a directory (a stage's `save_pretrained` output) or file as a W&B artifact."""
        if self._run is None or not self._log_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", name), type=type)
        path = Path(path).resolve()
        size = (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if path.is_dir()
            else path.stat().st_size
        )
        if size > COPY_LIMIT_BYTES:  # W&B stages a copy of every file: reference big models in place instead
            artifact.add_reference(path.as_uri(), checksum=False)
        elif path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact)

    def log_image(self, key: str, path: Path) -> None:
        """An image file (e.g. a plot) under `key`."""
        if self._run is None:
            return
        import wandb

        self._run.log({key: wandb.Image(str(path))})

    def set_summary(self, metrics: dict[str, float]) -> None:
        """The run's summary: the stage's final metrics."""
        if self._run is not None:
            self._run.summary.update({k: plain_scalar(v) for k, v in metrics.items()})

    def finish(self, exit_code: int | None = None) -> None:
        """Close the run (flushes the offline file); a non-zero `exit_code` marks it failed. Safe to call twice."""
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
            if self.dir is not None and run.settings.mode == "offline":
                log.info(
                    "[%s] W&B offline run %s: upload with `wandb sync %s`", self.stage, self.run_id, self.dir
                )


def null_tracker(stage: str = "") -> StageTracker:
    """A tracker that only prints: for `logger=none` and for tests of stages without W&B."""
    return StageTracker(stage)


def wandb_api_key_available() -> bool:
    """An API key for online logging: WANDB_API_KEY, or the netrc entry `wandb login` writes for the W&B host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_env(run_dir: Path) -> dict[str, str]:
    """The environment that keeps all of W&B's files under `run_dir`."""
    run_dir = Path(run_dir).resolve()
    return {
        "WANDB_DIR": str(run_dir),
        "WANDB_DATA_DIR": str(run_dir / "wandb" / "data"),
        "WANDB_CACHE_DIR": str(run_dir / "wandb" / "cache"),
        "WANDB_ARTIFACT_DIR": str(run_dir / "wandb" / "artifacts"),
    }


def start_stage(
    cfg: RLHFConfig,
    stage: str,
    run_dir: Path,
    group: str,
    resume_id: str | None = None,
    name: str | None = None,
    swept: dict[str, Any] | None = None,
    inputs: dict[str, dict[str, Any]] | None = None,
) -> StageTracker:
    """Start the stage's W&B run: project from config, `group`, job_type = stage, config = the resolved config.

    `resume_id`: continue that run (a resumed stage); the steps its earlier processes wrote into `run_dir` are
    read back into `tracker.recorded_steps`, so that replaying a stage's history writes each step once.
    `swept`: a sweep job's swept values, added to the config as `swept.<key>` columns. `inputs`: the upstream
    outputs the stage reads (`rlhf.run.plan.stage_inputs`), added to the config as `inputs` and, online, declared with
    `use_artifact` so that W&B's artifact graph links them to this run (cached ones included).
    """
    if cfg.logger.backend == "none" or cfg.logger.mode == "disabled":
        return null_tracker(stage)
    import wandb
    from omegaconf import OmegaConf

    for key, value in wandb_env(run_dir).items():
        os.environ[key] = value
        if key != "WANDB_DIR":
            Path(value).mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else _asdict(cfg)
    if swept:
        config["swept"] = dict(swept)
    if inputs:
        config["inputs"] = inputs
    run = wandb.init(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or group,
        job_type=stage,
        name=name or f"{group}-{stage}",
        tags=list(cfg.logger.tags),
        config=config,
        dir=str(Path(run_dir).resolve()),
        mode=cfg.logger.mode,
        id=resume_id,
        resume="allow" if resume_id else None,
        reinit="finish_previous",
        settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True, disable_git=True),
    )
    tracker = StageTracker(stage, run, log_artifacts=cfg.logger.log_artifacts)
    if run.settings.mode == "online":
        use_inputs(run, inputs or {})
    if resume_id:
        from rlhf.tracking.wandb_offline import logged_steps

        tracker.recorded_steps = logged_steps(Path(run_dir) / "wandb", resume_id, exclude=tracker.dir)
    log.info(
        "[%s] W&B run %s (%s), group %s, files in %s", stage, run.id, cfg.logger.mode, run.group, tracker.dir
    )
    return tracker


def use_inputs(run: Any, inputs: dict[str, dict[str, Any]]) -> None:
    """Declare each upstream W&B artifact as an input of `run` (online only: W&B refuses `use_artifact` offline;
    there the lineage lives in the run's `inputs` config until `rlhf-sync` declares it after `wandb sync`)."""
    for upstream, spec in inputs.items():
        if spec.get("artifact"):
            try:
                run.use_artifact(f"{spec['artifact']}:latest")
            except Exception as e:  # a missing upstream artifact must not stop training
                log.warning("W&B lineage: cannot use artifact %s of %s: %s", spec["artifact"], upstream, e)


def _asdict(cfg: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def rewrite_trainer_logs(logs: dict[str, Any]) -> dict[str, Any]:
    """HF Trainer keys -> W&B-style namespaced keys, as transformers' WandbCallback writes them (`eval_loss` ->
    `eval/loss`, `loss` -> `train/loss`)."""
    out = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if key.startswith("eval_"):
            out["eval/" + key[len("eval_") :]] = value
        elif key.startswith("test_"):
            out["test/" + key[len("test_") :]] = value
        else:
            out["train/" + key] = value
    return out
