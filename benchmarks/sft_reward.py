"""Time SFT + reward model on the default config through the real pipeline; print a markdown table.

    .venv/bin/python benchmarks/sft_reward.py                       # default: review task, tiny model, W&B offline
    .venv/bin/python benchmarks/sft_reward.py logger=none task=arithmetic

Target (issue 3): SFT + reward <= 90 s on 2 CPU cores, held-out reward accuracy >= 0.80 on the review task.
Stage times are the pipeline's own (`summary.json`); "process" adds interpreter start and imports, i.e. roughly
what `rlhf stages=[sft,reward]` takes on the command line.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as on the rlhf command line")
    parser.add_argument("--run-dir", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from rlhf.cli import compose
    from rlhf.pipeline import run

    cfg = compose(["stages=[sft,reward]", *args.overrides])
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="bench_sft_reward_"))
    t0 = time.perf_counter()
    summary = run(cfg, run_dir=run_dir, group="bench-sft-reward")
    pipeline_seconds = time.perf_counter() - t0
    stages = summary["stages"]

    print()
    print(f"SFT + reward model, `{' '.join(['stages=[sft,reward]', *args.overrides])}`")
    print(
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, task {cfg.task.env_id}, "
        f"{cfg.task.num_demonstrations} demonstrations, {cfg.task.num_preferences} pairs)"
    )
    print()
    print("| stage | seconds | metrics |")
    print("|---|---:|---|")
    for name, entry in stages.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items() if isinstance(v, int | float))
        print(f"| {name} | {entry['seconds']:.1f} | {shown} |")
    stage_total = sum(e["seconds"] for e in stages.values())
    print(f"| **SFT + reward** | **{stage_total:.1f}** | target <= 90 s |")
    print(f"| whole pipeline (base model, W&B, summary) | {pipeline_seconds:.1f} | |")
    print(f"| process (with imports) | {time.perf_counter() - START:.1f} | |")
    accuracy = stages["reward"]["metrics"].get("eval/accuracy")
    if accuracy is not None:
        print(f"\nheld-out reward accuracy {accuracy:.3f} (target >= 0.80)")
    print(f"outputs: {run_dir}")


if __name__ == "__main__":
    main()
