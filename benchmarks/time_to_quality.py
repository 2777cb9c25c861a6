"""Time to quality: wall seconds of training until the mean gold reward reaches a target, ours (PPO with GAE and a
critic; group-baseline mode `ppo.advantage=grpo`) against TRL 1.16's GRPOTrainer, from one SFT checkpoint.

    .venv/bin/python benchmarks/time_to_quality.py [--seeds 0 1 2] [--target 0.9] [--max-seconds 150]

Task: `rlhf/Review-v0` with the default chain's tiny word-level model. The start point is the SFT stage of our CLI,
made once (`python -m rlhf "stages=[sft]" task.env_id=rlhf/Review-v0 logger=none seed=0 hydra.run.dir=DIR`, ~30 s)
and reused while DIR/sft exists (--sft-run-dir; delete it to retrain). Every side trains the same SFT weights
against the environment's reward: 32 completions per update, <= 16 tokens, temperature 1, learning rate 1e-3
decaying linearly over --max-updates, KL coefficient 0.04 (benchmarks/group_setup.py lists every shared setting):
- ours, grpo: 8 prompts x 4 completions, 1 epoch, k3 KL in the loss (the setting of TRL's side, field for field);
- ours, gae: 32 prompts, critic from the SFT backbone (fresh head), 4 epochs x 1 minibatch of 32 (the PPO setting of
  `ppo_vs_trl.py --batch-size 32 --mini-batches 1`), k1 KL in the reward (the project's default), same learning
  rate for policy and critic;
- ours, gae with `ppo.critic_process` (at 2 threads only: 1 in each process): the same run, the critic trained in a
  second process; the clock starts once that process is up (its start counts as setup, like loading);
- TRL GRPOTrainer: 8 prompts x 4, num_iterations=1, beta=0.04, the environment's reward through a reward function.

Gold reward = the environment's reward of the training batch: our `env/gold` per update, TRL's logged `reward` per
step (one reward function, weight 1: the batch's mean environment reward). A run reaches the target when the mean
over its last --window updates first reaches it (one batch of 32 is noisy); its time is from the start of training
(after loading, before the first update) to the end of that update. Runs stop there, or after --max-seconds
("not reached"). Each run is its own process (`torch.set_num_threads(t)` for each t of --threads), sides alternating
per seed; the table gives the median over seeds per side and thread count (a run that did not reach counts as
infinite), and the ratio ours / TRL with each side at its best thread count.

Target: 0.9 lies below the plateau TRL's GRPO reaches on `rlhf/Review-v0` with this setting, so every side can reach
it; on `rlhf/Arithmetic-v0` no target above the SFT start is reachable in a few minutes, hence the review task.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import group_setup
import measure

SIDES = {
    "ours-gae": "ours, PPO (GAE + critic)",
    "ours-gae-cp": "ours, PPO (GAE + critic), ppo.critic_process",
    "ours-grpo": "ours, group baseline (advantage=grpo)",
    "trl": "trl 1.16 GRPOTrainer",
}
ENV_ID = "rlhf/Review-v0"
LEARNING_RATE = 1e-3
GAE = {"num_ppo_epochs": 4, "num_mini_batches": 1, "kl_in": "reward", "kl_estimator": "k1"}
"""Our GAE side's settings beyond the shared ones (the KL placement is the project's default, rlhf/config.py)."""


class Goal:
    """Running mean of the gold reward over the last `window` updates; `reached` when it first hits `target`."""

    def __init__(self, target: float, window: int, max_seconds: float) -> None:
        self.target, self.window, self.max_seconds = target, window, max_seconds
        self.clock = measure.Stopwatch()
        self.golds: list[float] = []
        self.times: list[float] = []
        self.reached_at: float | None = None

    def add(self, gold: float) -> bool:
        """Record one update's gold reward; True when training should stop (target reached or time up)."""
        self.golds.append(gold)
        self.times.append(self.clock.wall_s)
        recent = self.golds[-self.window :]
        if (
            self.reached_at is None
            and len(recent) == self.window
            and sum(recent) / self.window >= self.target
        ):
            self.reached_at = self.times[-1]
        return self.reached_at is not None or self.times[-1] >= self.max_seconds

    def result(self, side: str) -> dict:
        n = len(self.golds)
        return {
            "side": side,
            "reached": self.reached_at is not None,
            "seconds": self.reached_at,
            "updates": n,
            "s_per_update": self.times[-1] / n if n else None,
            "first_gold": self.golds[0] if n else None,
            "last_window_gold": statistics.mean(self.golds[-self.window :]) if n else None,
            "peak_rss_mb": measure.peak_rss_mib(),
            "versions": group_setup.versions(),
        }


def train_side(side: str, model_dir: Path, setup: group_setup.GroupSetup, a: argparse.Namespace) -> dict:
    """One side and seed in this process: train until the goal is reached or the time is up."""
    group_setup.set_threads(a.threads[0], setup.seed)
    with tempfile.TemporaryDirectory(prefix="ttq_") as out:
        if side == "trl":
            goal: list[Goal] = []

            def on_log(state, control, logs) -> None:
                if "reward" in logs and goal[0].add(logs["reward"]):
                    control.should_training_stop = True

            callback = group_setup.trl_callback(on_log=on_log)
            trainer = group_setup.build_trl(
                model_dir, setup, group_setup.trl_config(setup, Path(out)), [callback]
            )
            goal.append(Goal(a.target, a.window, a.max_seconds))  # the clock starts after loading
            trainer.train()
            return goal[0].result(side)
        if side.startswith("ours-gae"):
            cfg = group_setup.ours_config(setup, "gae", critic_process=side == "ours-gae-cp", **GAE)
        else:
            cfg = group_setup.ours_config(setup, "grpo")
        trainer = group_setup.build_ours(model_dir, setup, cfg, Path(out))
        trainer.critic.wait_ready()  # a critic worker's start (a fresh interpreter's imports) is setup
        goal_ = Goal(a.target, a.window, a.max_seconds)
        for _ in range(setup.updates):
            if goal_.add(trainer.train(max_updates=1)["env/gold"]):
                break
        return goal_.result(side)


def sft_checkpoint(run_dir: Path, seed: int) -> Path:
    """The SFT stage's output in `run_dir` (made by our CLI when missing)."""
    sft = run_dir / "sft"
    if (sft / "config.json").exists():
        print(f"SFT checkpoint: {sft} (reused; delete {run_dir} to retrain)", flush=True)
        return sft
    args = [
        "stages=[sft]",
        f"task.env_id={ENV_ID}",
        "logger=none",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = measure.run_rlhf(args).proc
    if proc.returncode != 0 or not (sft / "config.json").exists():
        sys.exit(f"SFT failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return sft


def table(
    results: dict[tuple[str, int], list[dict]], seeds: list[int], max_seconds: float
) -> tuple[str, dict[str, tuple[float, int]]]:
    """Markdown: median seconds to target per side and thread count (inf when most runs did not reach), per-seed
    seconds; and each side's best (median, threads)."""

    def fmt(r: dict) -> str:
        if r["reached"]:
            return f"{r['seconds']:.1f} s ({r['updates']} upd.)"
        return f"not reached in {max_seconds:.0f} s (last {r['last_window_gold']:.2f})"

    rows = [
        "| side | threads | median s to target | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | s/update | peak RSS MB | load before each |",
        "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|---|",
    ]
    best: dict[str, tuple[float, int]] = {}
    for (side, threads), runs in results.items():
        median = statistics.median(r["seconds"] if r["reached"] else math.inf for r in runs)
        if side not in best or median < best[side][0]:
            best[side] = (median, threads)
        med = "not reached" if math.isinf(median) else f"{median:.1f}"
        s_per_update = statistics.median(r["s_per_update"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in runs)
        cells = " | ".join(fmt(r) for r in runs)
        rows.append(
            f"| {SIDES[side]} | {threads} | {med} | {cells} | {s_per_update:.3f} | {rss:.0f} | {loads} |"
        )
    return "\n".join(rows), best


def _ratio(ours: float, trl: float) -> float | None:
    """ours / TRL seconds; None when either median did not reach the target."""
    return None if math.isinf(ours) or math.isinf(trl) else round(ours / trl, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="RL seeds (prompts and sampling)")
    p.add_argument("--target", type=float, default=0.9, help="mean gold reward to reach")
    p.add_argument(
        "--window", type=int, default=4, help="updates in the running mean compared with the target"
    )
    p.add_argument("--max-seconds", type=float, default=150.0, help="training time cap per run")
    p.add_argument(
        "--max-updates", type=int, default=400, help="updates the learning rate decays over (a cap too)"
    )
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts; each side at its best"
    )
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    p.add_argument(
        "--sft-run-dir",
        type=Path,
        default=measure.ROOT / "outputs" / "bench" / "time_to_quality",
        help="run dir of the SFT stage (reused when DIR/sft exists)",
    )
    p.add_argument("--json", type=Path, help="also write the medians and the ratios here")
    # internal: run one side and seed in this process
    p.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()

    def setup(seed: int) -> group_setup.GroupSetup:
        return group_setup.GroupSetup(
            env_id=ENV_ID, learning_rate=LEARNING_RATE, updates=a.max_updates, seed=seed
        )

    if a.side:
        print(json.dumps(train_side(a.side, a.model, setup(a.seed), a)))
        return

    model_dir = sft_checkpoint(a.sft_run_dir, seed=0)
    # the critic-process side runs at 2 threads and more: its threads split between two processes, 1 + 1 at 2
    runs = [(s, t) for t in a.threads for s in a.sides if s != "ours-gae-cp" or t >= 2]
    results: dict[tuple[str, int], list[dict]] = {run: [] for run in runs}
    for seed in a.seeds:
        for side, threads in runs:
            cmd = [
                sys.executable,
                __file__,
                "--side",
                side,
                "--seed",
                str(seed),
                "--model",
                str(model_dir),
            ]
            cmd += [
                "--target",
                str(a.target),
                "--window",
                str(a.window),
                "--max-seconds",
                str(a.max_seconds),
            ]
            cmd += ["--max-updates", str(a.max_updates), "--threads", str(threads)]
            label = f"{side}, seed {seed}, {threads} thread(s)"
            results[side, threads].append(measure.run_side(cmd, label))
    text, best = table(results, a.seeds, a.max_seconds)
    ratios = {s: _ratio(best[s][0], best["trl"][0]) for s in best if s != "trl" and "trl" in best}
    if a.json:
        finite = {s: None if math.isinf(m) else round(m, 2) for s, (m, _) in best.items()}
        threads = {s: t for s, (_, t) in best.items()}
        a.json.write_text(
            json.dumps(
                {"target": a.target, "median_s": finite, "threads": threads, "ratio_to_trl": ratios}, indent=1
            )
        )
    print(
        f"\nTime to mean gold reward >= {a.target} (mean of the last {a.window} updates) on {ENV_ID}, from the SFT "
        f"checkpoint {model_dir}; 32 completions per update, lr {LEARNING_RATE}, cap {a.max_seconds:.0f} s\n"
    )
    print(text)
    for side, ratio in ratios.items():
        print(
            f"\n{SIDES[side]} ({best[side][1]} thr) / TRL ({best['trl'][1]} thr): "
            + ("undefined (not reached)" if ratio is None else f"{ratio:.2f}x the time"),
            end="",
        )
    print(f"\n\ncommand: {measure.command_line('time_to_quality.py')}")


if __name__ == "__main__":
    main()
