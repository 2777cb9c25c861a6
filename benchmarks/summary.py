"""The performance targets from one `make bench` run: each ratio against its goal, read from the benchmarks' --json.

    .venv/bin/python benchmarks/summary.py benchmarks/results

Reads ppo_vs_trl_b32.json, ppo_vs_trl_b64.json, grpo_vs_trl.json, time_to_quality.json, real_model.json and
scaling.json from the directory (a missing file is reported, not fatal) and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(directory: Path, name: str) -> dict | None:
    path = directory / name
    return json.loads(path.read_text()) if path.exists() else None


def rows(directory: Path) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, met) for every target whose benchmark left a result."""
    out = []

    def add(target: str, value: float | None, goal: float, at_least: bool, fmt: str = "{:.2f}x") -> None:
        if value is None:
            out.append((target, "not reached", fmt.format(goal), "no"))
            return
        met = value >= goal if at_least else value <= goal
        out.append(
            (
                target,
                fmt.format(value),
                ("≥ " if at_least else "≤ ") + fmt.format(goal),
                "yes" if met else "no",
            )
        )

    for name, label in (
        ("ppo_vs_trl_b32.json", "batch 32, 1 minibatch"),
        ("ppo_vs_trl_b64.json", "batch 64, 4x4"),
    ):
        r = load(directory, name)
        if r is None:
            out.append((f"PPO vs TRL 1.12 PPOTrainer, episodes/s ({label})", "missing", "≥ 3.00x", "-"))
        else:
            add(
                f"PPO vs TRL 1.12 PPOTrainer, episodes/s ({label}; {r['ours_best']} vs {r['trl_best']})",
                r["ratio"],
                3.0,
                True,
            )
    r = load(directory, "grpo_vs_trl.json")
    if r is None:
        out.append(("grpo mode vs TRL 1.16 GRPOTrainer, completions/s", "missing", "≥ 1.50x", "-"))
    else:
        add("grpo mode vs TRL 1.16 GRPOTrainer, completions/s", r["ratio"], 1.5, True)
    r = load(directory, "time_to_quality.json")
    if r is None:
        out.append(("time to quality vs TRL 1.16 GRPO", "missing", "≤ 0.50x", "-"))
    else:
        for side, ratio in r["ratio_to_trl"].items():
            add(f"time to gold {r['target']} vs TRL 1.16 GRPO ({side}, median over seeds)", ratio, 0.5, False)
    for name in ("real_model.json", "scaling.json"):
        r = load(directory, name)
        if r is None:
            out.append((name.removesuffix(".json"), "missing", "", "-"))
            continue
        for key, value in r.get("key", {}).items():
            target = f"{name.removesuffix('.json')}: {key}"
            if key.startswith("update/") and key.endswith(
                "/fraction_of_peak"
            ):  # update FLOP/s vs the matmul peak
                add(target, value, 0.40, True, "{:.0%}")
            elif key.startswith("generate/") and key.endswith("/ratio"):  # KVSampler vs model.generate
                add(target, value, 2.0, True)
            else:
                measured = f"{value:.3g}" if isinstance(value, float) else str(value)
                out.append((target, measured, "", ""))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", type=Path, nargs="?", default=Path(__file__).parent / "results")
    a = p.parse_args()
    print("| target | measured | goal | met |\n|---|---:|---:|---|")
    for target, measured, goal, met in rows(a.directory):
        print(f"| {target} | {measured} | {goal} | {met} |")


if __name__ == "__main__":
    main()
