"""`rlhf-sync DIR`: upload every offline W&B run under a run or sweep directory, then record their lineage.

W&B refuses `use_artifact` in offline mode, so an offline stage run keeps the upstream outputs it read in its
config (`inputs`: the W&B artifact each SFT / reward model was logged as, cached ones included). After `wandb sync`
has uploaded the runs and their artifacts, this resumes each such run online and declares those artifacts as its
inputs, so W&B's artifact graph shows which models fed which run. Online runs declare them as they start.

    rlhf-sync multirun/2026-11-30/12-00-00            # wandb sync + lineage
    rlhf-sync multirun/2026-11-30/12-00-00 --dry-run  # only print what it would do
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from rlhf.tracking.wandb_offline import find_offline_runs, read_offline_run


def lineage(runs: dict[Path, dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(run, upstream artifact name) for every input recorded in the runs' configs."""
    return [
        (run["run"], spec["artifact"])
        for run in runs.values()
        for spec in (run["config"].get("inputs") or {}).values()
        if isinstance(spec, dict) and spec.get("artifact")
    ]


def sync_command(paths: list[Path]) -> list[str]:
    return ["wandb", "sync", *map(str, paths)]  # wandb 0.31 includes offline runs by default


def declare_inputs(run: dict[str, Any], artifact: str, entity: str | None) -> None:
    """Resume `run` online and declare `artifact` (logged by an upstream run of the same project) as its input."""
    import wandb

    online = wandb.init(id=run["id"], project=run["project"], entity=entity, resume="must")
    try:
        online.use_artifact(f"{artifact}:latest")
    finally:
        online.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run directory or a sweep directory")
    parser.add_argument("--entity", default=None, help="W&B entity (default: the account's)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, do nothing")
    args = parser.parse_args(argv)

    paths = find_offline_runs(args.dir)
    if not paths:
        print(f"rlhf-sync: error: no W&B runs under {args.dir}", file=sys.stderr)
        return 1
    runs = {p: read_offline_run(p, wait_seconds=0) for p in paths}
    command = sync_command(paths)
    print(f"{len(paths)} runs: {shlex.join(command)}")
    links = lineage(runs)
    for run, artifact in links:
        print(f"lineage: run {run['id']} ({run.get('name')}) uses {artifact}")
    if args.dry_run:
        return 0
    done = subprocess.run(command)
    if done.returncode != 0:
        return done.returncode
    for run, artifact in links:
        declare_inputs(run, artifact, args.entity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
