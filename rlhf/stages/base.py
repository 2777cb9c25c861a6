"""What every stage receives and returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlhf.tracking import StageTracker


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
    """Results of the stages that ran before, by stage name."""
