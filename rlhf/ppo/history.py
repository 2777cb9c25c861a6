"""history.jsonl: one row of metrics per PPO update (`{"update": k, ...}`), written by the main process.

A resumed run keeps the rows up to its checkpoint (the updates after it are redone) and hands them to its callback,
which may replay them into a tracker that lost the rows of a killed process.
"""

from __future__ import annotations

import json
from pathlib import Path

HISTORY = "history.jsonl"


def history_path(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / HISTORY


def read_history(stage_dir: str | Path) -> list[dict]:
    """Every row of the stage's history, in order ([] when there is none)."""
    path = history_path(stage_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(stage_dir: str | Path, update: int, metrics: dict[str, float]) -> None:
    """Add update `update`'s metrics as one line."""
    path = history_path(stage_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"update": update, **metrics}) + "\n")


def truncate_history(stage_dir: str | Path, update: int) -> list[dict]:
    """Drop the rows after update `update` (redone after a resume); returns the rows kept."""
    path = history_path(stage_dir)
    if not path.exists():
        return []
    kept = [row for row in read_history(stage_dir) if row["update"] <= update]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return kept
