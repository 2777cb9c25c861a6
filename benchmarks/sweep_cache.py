"""Wall time of an 8-job PPO sweep with and without the stage cache, side by side in one run.

    .venv/bin/python benchmarks/sweep_cache.py                       # 8 KL values, the default chain, joblib x2
    .venv/bin/python benchmarks/sweep_cache.py --launcher basic      # jobs one after the other

Each side is the same `rlhf -m ppo.kl_coef=<8 values> ...` into a fresh sweep directory, once with `cache=false`
(every job trains SFT and the reward model again) and once with the cache (the default: the first job trains them,
the other seven reuse them). Prints a Markdown table: wall time, the SFT + reward seconds summed over jobs, how
many jobs trained each stage, and the mean held-out gold reward (the same with and without: the cache changes no
result).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import measure

KL_VALUES = "0.005,0.01,0.02,0.03,0.05,0.07,0.1,0.2"
LAUNCHERS = {"joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "basic": []}


def sweep(out: Path, cache: bool, launcher: str, extra: list[str]) -> dict:
    args = [
        "-m",
        *LAUNCHERS[launcher],
        f"ppo.kl_coef={KL_VALUES}",
        f"hydra.sweep.dir={out}",
        f"cache={cache}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    run = measure.run_rlhf([*args, *extra], env=env)
    command, seconds = run.command, run.seconds
    if run.proc.returncode != 0:
        raise SystemExit(f"{command} failed:\n{run.proc.stderr[-3000:]}")
    jobs = [json.loads(p.read_text())["stages"] for p in sorted(out.glob("*/summary.json"))]
    trained = {s: sum(not j[s].get("cached") for j in jobs) for s in ("sft", "reward", "ppo", "evaluate")}
    upstream = sum(j[s]["seconds"] for j in jobs for s in ("sft", "reward") if not j[s].get("cached"))
    gold = statistics.mean(j["evaluate"]["metrics"]["ppo/gold_reward"] for j in jobs)
    return {"command": command, "seconds": seconds, "jobs": len(jobs), "trained": trained, "upstream": upstream,
            "gold": gold}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="joblib")
    parser.add_argument("extra", nargs="*", help="more overrides for every job")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep_cache_") as tmp:
        rows = {
            "no cache (cache=false)": sweep(Path(tmp) / "off", False, args.launcher, args.extra),
            "stage cache (default)": sweep(Path(tmp) / "on", True, args.launcher, args.extra),
        }
    print(f"\n8-job PPO sweep, launcher {args.launcher}\n")
    print(
        "| | wall time | SFT + reward seconds (all jobs) | jobs that trained sft / reward / ppo | mean gold |"
    )
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["trained"]
        print(
            f"| {name} | {r['seconds']:.0f} s | {r['upstream']:.0f} s | {t['sft']} / {t['reward']} / {t['ppo']} "
            f"| {r['gold']:.3f} |"
        )
    off, on = rows.values()
    print(f"\nspeed-up: {off['seconds'] / on['seconds']:.2f}x; command: {on['command']}")


if __name__ == "__main__":
    main()
