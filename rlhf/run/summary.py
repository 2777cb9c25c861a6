"""`summary.json`, a run directory's record of its finished stages: the one place that knows its format.

    {"precision": {"requested", "dtype", "reason"},        how `model.dtype` was resolved (kept on resume)
     "base": {"artifact", "key", "config"},                 the base model the stages started from
     "stages": {name: entry}}                               finished stages, in pipeline order

A stage's entry: `artifact` (its output directory), `seconds`, `metrics`, `wandb_run`, `wandb_artifact`, `key` and
`config` (its stage key, `rlhf.run.stage_keys`), `cached` (reused from the stage cache) and, with a stage cache,
`cache_entry`. The pipeline writes it after every step; the sweep report reads one per job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.common.stage_names import STAGES
from rlhf.tracking.wandb_run import plain_scalar

if TYPE_CHECKING:
    from rlhf.run.stage_keys import StageKey
    from rlhf.stages.base import StageResult

SUMMARY = "summary.json"


def in_pipeline_order(stages: Iterable[str]) -> list[str]:
    """Stage names in pipeline order (`rlhf.common.stage_names.STAGES`), unknown ones last, sorted."""
    names = set(stages)
    return [name for name in STAGES if name in names] + sorted(names - set(STAGES))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """`run_dir/summary.json` ({"stages": {}} when there is none)."""
    path = Path(run_dir) / SUMMARY
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.setdefault("stages", {})
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically, stages in pipeline order."""
    stages = summary["stages"]
    out = {k: summary[k] for k in ("precision", "base") if summary.get(k) is not None}
    out["stages"] = {name: stages[name] for name in in_pipeline_order(stages)}
    path = Path(run_dir) / SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path


def summary_entry(
    result: StageResult, key: StageKey, wandb_run: str | None, wandb_artifact: str | None
) -> dict[str, Any]:
    """A stage that ran: its output, time, metrics, W&B run and artifact, and stage key."""
    return {
        "artifact": str(Path(result.artifact).resolve()),
        "seconds": round(float(result.seconds), 3),
        "metrics": {k: plain_scalar(v) for k, v in result.metrics.items()},
        "wandb_run": wandb_run,
        "wandb_artifact": wandb_artifact,
        "key": key.key,
        "config": key.config,
        "cached": False,
    }


def cached_entry(record: dict[str, Any], entry_dir: Path) -> dict[str, Any]:
    """A stage reused from the stage cache: the cache entry's record (its W&B run and artifact are the ones that
    made it), marked cached and naming the cache entry."""
    keep = ("artifact", "seconds", "metrics", "wandb_run", "wandb_artifact", "key", "config")
    return {**{k: record.get(k) for k in keep}, "cached": True, "cache_entry": str(entry_dir)}
