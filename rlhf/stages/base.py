"""What every stage receives and returns, and how it finds an upstream stage's model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.tracking.wandb_run import StageTracker


@dataclass
class StageResult:
    """A finished stage: its `save_pretrained` directory, final metrics and wall time."""

    artifact: Path
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class StageContext:
    """Where a stage writes, what ran before it, and its tracker."""

    run_dir: Path
    """The pipeline's run directory (Hydra's output directory)."""
    output_dir: Path
    """This stage's own directory, `run_dir / <stage>`; the stage's artifact lives here."""
    seed: int
    """This stage's seed, derived from the root seed and the stage's name."""
    tracker: StageTracker
    """This stage's W&B run (or a no-op when `logger=none`)."""
    upstream: dict[str, StageResult] = field(default_factory=dict)
    """Results of the stages that ran before (or finished earlier in this run directory for the same config), by
    stage name, and the base model under "base"."""
    key: str | None = None
    """This stage's key (`rlhf.run.stage_keys`): a resumable partial output (a PPO checkpoint) must carry the same."""


def needs_message(stage: str, upstream: str, instead: str) -> str:
    """The one-line error of a stage that cannot run without an upstream stage's output."""
    return (
        f"{stage} needs the {upstream} stage's output: run {upstream} first (add it to stages), or {instead}"
    )


def upstream_model(
    ctx: StageContext, explicit: str | None, stage: str, needed_by: str, instead: str | None
) -> str | None:
    """A model location: the explicit config path, else the upstream stage's artifact. Without either, ValueError
    when the stage `needed_by` cannot run without it (`instead`: what to set otherwise), else None."""
    if explicit:
        return explicit
    if stage in ctx.upstream:
        return str(ctx.upstream[stage].artifact)
    if instead:
        raise ValueError(needs_message(needed_by, stage, instead))
    return None
