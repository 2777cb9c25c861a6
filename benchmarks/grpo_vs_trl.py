"""Group-baseline throughput, ours (`ppo.advantage=grpo`) against TRL 1.16's GRPOTrainer, in one run.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--updates 12] [--warmup 2] [--repeats 2] [--threads 1 2] [--json PATH]

Both sides train the project's tiny Llama from one `save_pretrained` directory (fresh weights, the word-level
tokenizer; `--model DIR` starts from another, e.g. an SFT output) on prompts from `rlhf/Review-v0` resets, the same
prompts in the same order: 8 prompts x 4 completions = 32 per update, <= 16 completion tokens, plain sampling at
temperature 1 (top-k 0, top-p 1, KV cache, no vLLM), one optimizer step per update (ours: 1 epoch x 1 minibatch;
TRL: num_iterations=1), KL to the reference as 0.04 * k3 in the loss, the environment's reward (ours:
reward_source=env; TRL: a reward function that resets a fresh env with the prompt's seed and steps it), float32,
no checkpoints, no evaluation; benchmarks/group_setup.py lists every shared setting. Each run is its own process
(`torch.set_num_threads(t)` for each t of --threads), the sides alternate, and the first --warmup updates are left
out: completions/s is the steady state, 32 / (wall seconds per update) from the end of the last warm-up update to
the end of the last update (ours: `train(max_updates=1)` calls; TRL: a TrainerCallback's on_step_end). The table
gives the median over repeats per side and thread count, then each side's best and the ratio ours / TRL.

Measure on an idle machine: another busy process slows either side several-fold; the 1-min load before each run is
printed and tabled. --json PATH also writes {"ratio": ..., "ours": ..., "trl": ...} (each side's best).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import group_setup
import measure
import ppo_run

SIDES = {"ours": "ours (PPOTrainer, advantage=grpo)", "trl": "trl 1.16 GRPOTrainer"}


def run_ours(model_dir: Path, setup: group_setup.GroupSetup, updates: int, warmup: int, threads: int) -> dict:
    """Our trainer, one timed `train(max_updates=1)` per update."""
    group_setup.set_threads(threads, setup.seed)
    # one update more than run: the trainer saves after its last update, TRL (save_strategy="no") does not
    cfg = group_setup.ours_config(setup, total_episodes=(updates + 1) * setup.batch_size)
    with tempfile.TemporaryDirectory(prefix="grpo_ours_") as out:
        trainer = group_setup.build_ours(model_dir, setup, cfg, Path(out))
        laps = ppo_run.timed_updates(trainer, updates)
    steady = laps[warmup:]
    phases = ppo_run.phases(steady)
    return _result(
        "ours",
        setup,
        updates,
        warmup,
        s_per_update=statistics.mean(lap.wall_s for lap in steady),
        cpu_s_per_update=statistics.mean(lap.cpu_s for lap in steady),
        completion_tokens=statistics.mean(lap.value["rollout/response_length"] for lap in steady),
        in_step_s=sum(phases.values()),
        phases_s=phases,
    )


def run_trl(model_dir: Path, setup: group_setup.GroupSetup, updates: int, warmup: int, threads: int) -> dict:
    """TRL's GRPOTrainer; update boundaries from a TrainerCallback (on_step_begin / on_step_end)."""
    group_setup.set_threads(threads, setup.seed)
    clock = measure.Stopwatch()
    begins, ends, cpu_ends, logs = [], [], [], []
    callback = group_setup.trl_callback(
        on_step_begin=lambda state, control: begins.append(clock.wall_s),
        on_step_end=lambda state, control: (ends.append(clock.wall_s), cpu_ends.append(clock.cpu_s)),
        on_log=lambda state, control, log: logs.append(log),
    )
    with tempfile.TemporaryDirectory(prefix="grpo_trl_") as out:
        args = group_setup.trl_config(setup, Path(out), max_steps=updates)
        group_setup.build_trl(model_dir, setup, args, [callback]).train()
    # steady state: from the end of the last warm-up update to the end of the last update
    n = len(ends) - warmup
    steady_in_step = [e - b for b, e in zip(begins[warmup:], ends[warmup:])]
    lengths = [log["completions/mean_length"] for log in logs if "completions/mean_length" in log]
    return _result(
        "trl",
        setup,
        len(ends),
        warmup,
        s_per_update=(ends[-1] - ends[warmup - 1]) / n,
        cpu_s_per_update=(cpu_ends[-1] - cpu_ends[warmup - 1]) / n,
        completion_tokens=statistics.mean(lengths[warmup:]),
        in_step_s=statistics.mean(steady_in_step),
        phases_s={},
    )


def _result(side: str, setup: group_setup.GroupSetup, updates: int, warmup: int, **measured) -> dict:
    """One side's row: `measured` (s_per_update and cpu_s_per_update over the updates after the warm-up, ...)."""
    import torch

    return {
        "side": side,
        "updates": updates,
        "warmup": warmup,
        "completions_per_update": setup.batch_size,
        "completions_per_s": setup.batch_size / measured["s_per_update"],
        "peak_rss_mb": measure.peak_rss_mib(),
        "threads": torch.get_num_threads(),
        **measured,
        "versions": group_setup.versions(),
    }


def table(results: dict[tuple[str, int], list[dict]]) -> tuple[str, dict[str, dict]]:
    """Markdown rows per (side, threads): medians over repeats; and each side's best row."""
    rows = [
        "| side | threads | completions/s | s/update | in-step s | CPU s/update | completion tokens | peak RSS MB "
        "| runs (load before each) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    best: dict[str, dict] = {}
    for (side, threads), runs in results.items():
        cps = [r["completions_per_s"] for r in runs]
        spread = f" ({min(cps):.0f}-{max(cps):.0f})" if len(runs) > 1 else ""
        keys = ("completions_per_s", "s_per_update", "in_step_s", "cpu_s_per_update", "completion_tokens")
        med = {k: statistics.median(r[k] for r in runs) for k in (*keys, "peak_rss_mb")}
        loads = ", ".join(f"{r['load_before']:.1f}" for r in runs)
        rows.append(
            f"| {SIDES[side]} | {threads} | {med['completions_per_s']:.0f}{spread} | {med['s_per_update']:.3f} "
            f"| {med['in_step_s']:.3f} | {med['cpu_s_per_update']:.3f} | {med['completion_tokens']:.1f} "
            f"| {med['peak_rss_mb']:.0f} | {len(runs)} ({loads}) |"
        )
        if side not in best or med["completions_per_s"] > best[side]["completions_per_s"]:
            best[side] = {**med, "threads": threads, "runs": len(runs)}
    return "\n".join(rows), best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=12, help="updates per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first updates left out of the timing")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and thread count, alternating sides")
    p.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads to try (each side's best)"
    )
    p.add_argument("--env", default="rlhf/Review-v0", help="environment id (prompts and reward)")
    p.add_argument(
        "--model", type=Path, help="start from this save_pretrained dir (default: fresh tiny weights)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help='also write {"ratio", "ours", "trl"} (each side\'s best) here')
    # internal: run one side in this process
    p.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.warmup < 1 or a.updates <= a.warmup:
        p.error("need --warmup >= 1 and --updates > --warmup (the warm-up updates are not timed)")
    setup = group_setup.GroupSetup(env_id=a.env, updates=a.updates, seed=a.seed)
    if a.side:
        run = run_ours if a.side == "ours" else run_trl
        print(json.dumps(run(a.model, setup, a.updates, a.warmup, a.threads[0])))
        return

    results: dict[tuple[str, int], list[dict]] = {(s, t): [] for s in SIDES for t in a.threads}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        model_dir = a.model or group_setup.save_fresh_model(Path(tmp) / "start", a.env, a.seed)
        for _ in range(a.repeats):
            for threads in a.threads:
                for side in SIDES:
                    cmd = [sys.executable, __file__, "--side", side, "--model", str(model_dir)]
                    cmd += ["--threads", str(threads), "--updates", str(a.updates), "--warmup", str(a.warmup)]
                    cmd += ["--env", a.env, "--seed", str(a.seed)]
                    results[(side, threads)].append(measure.run_side(cmd, f"{side}, {threads} thread(s)"))
    text, best = table(results)
    ratio = best["ours"]["completions_per_s"] / best["trl"]["completions_per_s"]
    if a.json:
        a.json.write_text(json.dumps({"ratio": round(ratio, 3), **{s: best[s] for s in SIDES}}, indent=1))
    start = a.model or f"fresh tiny weights (seed {a.seed})"
    print(
        f"\nGroup-baseline throughput on {a.env}: {setup.num_prompts} prompts x {setup.num_generations} completions, "
        f"<= {setup.response_length} tokens, 1 epoch, beta {setup.beta} (k3 in the loss), start: {start};"
    )
    print(f"{a.updates} updates per run, the first {a.warmup} left out; medians of {a.repeats} run(s)\n")
    print(text)
    o, t = best["ours"], best["trl"]
    print(
        f"\nbest: ours {o['completions_per_s']:.0f} completions/s ({o['threads']} threads), "
        f"TRL {t['completions_per_s']:.0f} ({t['threads']} threads): ratio ours / TRL = {ratio:.2f}"
    )
    phases = results[("ours", o["threads"])][-1]["phases_s"]
    print("ours, one update (last run): " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    print(f"\ncommand: {measure.command_line('grpo_vs_trl.py')}")


if __name__ == "__main__":
    main()
