"""The product targets of PPO, measured end to end through the `rlhf` command; prints a markdown table.

    .venv/bin/python benchmarks/ppo.py                      # everything below (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/ppo.py --only review --seeds 0

Targets (issue 4, item 9):
- review (default run, `rlhf hydra.run.dir=DIR`, reward_source=model): whole pipeline <= 300 s on 2 cores and
  ppo/gold_reward - sft/gold_reward >= 0.15, for seeds 0, 1 and 2;
- arithmetic with reward_source=env: gain >= 0.2;
- guess-number (multi-turn): PPO's success rate above SFT's.
Each run is a fresh pipeline (sft -> reward -> ppo -> evaluate) in its own directory; the numbers come from
its summary.json. Runs go one after another: timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import measure

CASES = {
    # name: (overrides, check(metrics, seconds) -> (ok, target text))
    "review": ([], lambda m, s: (m["gold_reward_gain"] >= 0.15 and s <= 300, "gain >= 0.15, <= 300 s")),
    "arithmetic": (
        ["experiment=arithmetic"],
        lambda m, s: (m["gold_reward_gain"] >= 0.2, "gain >= 0.2"),
    ),
    "guess": (
        ["experiment=guess"],
        lambda m, s: (m["ppo/success_rate"] > m["sft/success_rate"], "success ppo > sft"),
    ),
}


def run_case(name: str, seed: int, out: Path, logger: str) -> dict:
    overrides, check = CASES[name]
    run_dir = out / f"{name}-seed{seed}"
    args = [f"hydra.run.dir={run_dir}", *overrides]
    if seed != 0:
        args.append(f"seed={seed}")
    if logger != "wandb":
        args.append(f"logger={logger}")
    run = measure.run_rlhf(args, log=out / f"{name}-seed{seed}.log")
    shown, seconds = run.command, run.seconds
    if run.proc.returncode != 0:
        return {
            "name": name,
            "seed": seed,
            "command": shown,
            "seconds": seconds,
            "error": run.proc.stderr[-500:],
        }
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    metrics = stages["evaluate"]["metrics"]
    ok, target = check(metrics, seconds)
    return {
        "name": name,
        "seed": seed,
        "command": shown,
        "seconds": seconds,
        "ppo_seconds": stages["ppo"]["seconds"],
        "metrics": metrics,
        "ok": ok,
        "target": target,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| task | seed | total s | ppo s | SFT gold | PPO gold | gain | SFT success | PPO success | PPO KL | target | ok |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['seed']} | {r['seconds']:.0f} | failed: {r['error'][-80:]!r} |")
            continue
        m = r["metrics"]

        def f(key: str, fmt: str = ".3f", m: dict = m) -> str:
            return format(m[key], fmt) if key in m else "-"

        lines.append(
            f"| {r['name']} | {r['seed']} | {r['seconds']:.0f} | {r['ppo_seconds']:.0f} | {f('sft/gold_reward')} | "
            f"{f('ppo/gold_reward')} | {f('gold_reward_gain', '+.3f')} | {f('sft/success_rate')} | "
            f"{f('ppo/success_rate')} | {f('ppo/kl', '.2f')} | {r['target']} | {'yes' if r['ok'] else 'NO'} |"
        )
    commands = sorted({r["command"].split(" hydra.run.dir=")[0] + " " + _tail(r["command"]) for r in rows})
    return (
        "\n".join(lines)
        + "\n\nCommands (each with hydra.run.dir=<dir>):\n"
        + "\n".join(f"    {c}" for c in commands)
    )


def _tail(command: str) -> str:
    parts = command.split()
    return " ".join(p for p in parts[1:] if not p.startswith("hydra.run.dir="))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="*", choices=sorted(CASES), default=sorted(CASES, key=list(CASES).index)
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of the review runs")
    parser.add_argument(
        "--task-seeds", nargs="*", type=int, default=[0], help="seeds of arithmetic and guess"
    )
    parser.add_argument("--logger", default="none", choices=["none", "wandb"])
    parser.add_argument(
        "--out", type=Path, default=None, help="where the run directories go (default: a temp dir)"
    )
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only:
        for seed in args.seeds if name == "review" else args.task_seeds:
            rows.append(run_case(name, seed, out, args.logger))
            print(table(rows[-1:]).split("\n\n")[0].splitlines()[-1], file=sys.stderr, flush=True)
    print(table(rows))
    print(f"\nrun directories: {out}")


if __name__ == "__main__":
    main()
