"""PPO throughput, ours against trl 1.12.0's PPOTrainer (the last TRL that shipped one), in one run.

    bash benchmarks/setup_peer.sh                     # once: benchmarks/.venv-trl112 with trl 1.12.0
    .venv/bin/python benchmarks/ppo_vs_trl.py [--updates 8] [--repeats 3] [--batch-size 64 --mini-batches 4]

Both sides get the same work: prompts from `rlhf/Review-v0` resets, the same word-level vocabulary, the same tiny
LlamaConfig for policy, reference, critic and reward model (fresh weights; reward_source=model), batch 64,
16 response tokens, 4 PPO epochs x 4 minibatches (or --batch-size / --mini-batches), float32. Each side runs with
every thread count of --threads (default 1 and 2) and is reported at its best; ours also with ppo.critic_process at
each thread count >= 2 (the threads split between its two processes: 1 + 1 at 2). Each run is its own process (the
peer with benchmarks/.venv-trl112/bin/python), so peak RSS is per side (with ppo.critic_process its main process's; the
worker shares the critic's weights). s/update is the steady state: the first
update (warm-up) is left out. Prints a markdown table and the ratio of episodes/s; --json writes them.

Measure on an idle machine: with 2 threads on 2 cores, one other busy process slows either side several-fold
(every parallel op waits for its descheduled thread), so the table shows the 1-min load before each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import measure
import ppo_run

PEER_PYTHON = measure.HERE / ".venv-trl112" / "bin" / "python"
ENV_ID = "rlhf/Review-v0"
RESPONSE_LENGTH = 16


def write_inputs(workdir: Path, num_prompts: int) -> dict[str, str]:
    """The shared inputs: vocabulary, tiny model config and prompts (json files both venvs can read)."""
    import envs
    from rlhf.models.config import ModelConfig
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_tokenizer

    vocabulary = envs.env_class(ENV_ID).vocabulary()
    paths = {name: str(workdir / name) for name in ("vocab.json", "config.json", "prompts.jsonl")}
    Path(paths["vocab.json"]).write_text(json.dumps(vocabulary))
    build_tiny_model(ModelConfig(), build_tokenizer(vocabulary)).config.to_json_file(paths["config.json"])
    env = envs.make(ENV_ID)
    lines = [json.dumps({"prompt": env.reset(seed=i)[0]}) + "\n" for i in range(num_prompts)]
    Path(paths["prompts.jsonl"]).write_text("".join(lines))
    return paths


def run_ours(
    workdir: Path,
    updates: int,
    threads: int,
    seed: int,
    batch_size: int,
    mini_batches: int,
    critic_process: bool = False,
) -> dict:
    """Our PPOTrainer on the shared inputs in `workdir`, one `train(max_updates=1)` per timed update (with
    `critic_process`, ppo.critic_process: `threads` split between this process and the critic's)."""
    import torch
    from transformers import LlamaConfig

    from rlhf.models.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(json.loads((workdir / "vocab.json").read_text()))
    policy, ref, critic, reward = ppo_run.tiny_models(LlamaConfig.from_json_file(workdir / "config.json"))
    cfg = ppo_run.ppo_config(
        batch_size,
        updates,
        reward_source="model",
        response_length=RESPONSE_LENGTH,
        num_ppo_epochs=4,
        num_mini_batches=mini_batches,
        critic_process=critic_process,
    )
    laps = ppo_run.timed_run(
        cfg, policy, tokenizer, ENV_ID, updates, ref_policy=ref, reward_model=reward, critic=critic, seed=seed
    )
    steady = laps[1:]  # the first update is warm-up
    s_per_update = statistics.mean(lap.wall_s for lap in steady)
    return {
        "side": "ours (rlhf.ppo.trainer.PPOTrainer)",
        "updates": len(laps),
        "batch_size": batch_size,
        "episodes_per_s": batch_size / s_per_update,
        "s_per_update": s_per_update,
        "cpu_s_per_update": statistics.mean(lap.cpu_s for lap in steady),
        "total_s": sum(lap.wall_s for lap in laps),
        "peak_rss_mb": measure.peak_rss_mib(),
        "threads": threads,  # with the critic process: the two processes' threads together
        "phases_s": ppo_run.phases(steady),  # rollout, score, update
    }


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: median over repeats, the range of episodes/s, and the 1-min load average before each run."""
    rows = [
        "| side | threads | episodes/s | s/update | CPU s/update | peak RSS (MB) | runs (load before each) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for side, runs in results.items():
        eps = [r["episodes_per_s"] for r in runs]
        spread = f" ({min(eps):.1f}-{max(eps):.1f})" if len(runs) > 1 else ""
        s_per_update = statistics.median(r["s_per_update"] for r in runs)
        cpu = statistics.median(r["cpu_s_per_update"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in runs)
        rows.append(
            f"| {side} | {runs[0]['threads']} | {statistics.median(eps):.1f}{spread} | {s_per_update:.3f} | {cpu:.2f} "
            f"| {rss:.0f} | {len(runs)} ({loads}) |"
        )
    return "\n".join(rows)


def best(results: dict[str, list[dict]], side: str) -> tuple[str, float]:
    """The row of `side` (ours / trl) with the highest median episodes/s, and that median."""
    medians = {
        key: statistics.median(r["episodes_per_s"] for r in runs)
        for key, runs in results.items()
        if key.startswith(side)
    }
    key = max(medians, key=medians.get)
    return key, medians[key]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=8, help="PPO updates per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side and thread count, alternating")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to try on each side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the table's numbers and the ratio as json")
    # internal: run our side in this process, on the inputs in WORKDIR
    p.add_argument("--ours", metavar="WORKDIR", help=argparse.SUPPRESS)
    p.add_argument("--critic-process", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be >= 2: the first update is warm-up and is not timed")
    if a.ours:
        [threads] = a.threads
        result = run_ours(
            Path(a.ours), a.updates, threads, a.seed, a.batch_size, a.mini_batches, a.critic_process
        )
        print(json.dumps(result))
        return
    if not PEER_PYTHON.exists():
        sys.exit(f"no peer venv at {PEER_PYTHON.parent.parent}: run `bash benchmarks/setup_peer.sh` first")

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl_") as tmp:
        paths = write_inputs(Path(tmp), num_prompts=a.batch_size * a.updates)
        shape = ["--updates", str(a.updates), "--seed", str(a.seed), "--batch-size", str(a.batch_size)]
        shape += ["--mini-batches", str(a.mini_batches)]
        peer_cmd = [str(PEER_PYTHON), str(measure.HERE / "trl112_ppo.py"), "--vocab", paths["vocab.json"]]
        peer_cmd += ["--model-config", paths["config.json"], "--prompts", paths["prompts.jsonl"], *shape]
        ours_cmd = [sys.executable, __file__, "--ours", tmp, *shape]
        for _ in range(a.repeats):
            for threads in a.threads:
                t = ["--threads", str(threads)]
                results.setdefault(f"ours, {threads} thr", []).append(measure.run_side(ours_cmd + t))
                results.setdefault(f"trl 1.12.0 PPOTrainer, {threads} thr", []).append(
                    measure.run_side(peer_cmd + t)
                )
                # ppo.critic_process: the threads split, one process each for policy and critic
                if threads >= 2:
                    row = f"ours, ppo.critic_process, {threads} thr"
                    results.setdefault(row, []).append(measure.run_side(ours_cmd + t + ["--critic-process"]))

    print(
        f"PPO throughput on {ENV_ID}: batch {a.batch_size}, {RESPONSE_LENGTH} response tokens, "
        f"4 epochs x {a.mini_batches} minibatches,"
    )
    print(f"tiny Llama (float32), {a.updates} updates per run (the first left out)\n")
    print(table(results))
    ours_key, ours = best(results, "ours")
    trl_key, trl = best(results, "trl")
    print(
        f"\nours / TRL 1.12 PPOTrainer, each at its best thread count: {ours / trl:.2f}x ({ours_key} vs {trl_key})"
    )
    phases = results[ours_key][-1]["phases_s"]
    print("ours, one update (last run): " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    print(f"\ncommand: {measure.command_line('ppo_vs_trl.py')}")
    if a.json:
        summary = {"ratio": ours / trl, "ours": ours, "trl": trl, "ours_best": ours_key, "trl_best": trl_key}
        Path(a.json).write_text(
            json.dumps({**summary, "batch_size": a.batch_size, "runs": results}, indent=1)
        )


if __name__ == "__main__":
    main()
