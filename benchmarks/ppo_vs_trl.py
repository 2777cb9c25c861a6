"""PPO throughput, ours against trl 1.12.0's PPOTrainer (the last TRL that shipped one), in one run.

    bash benchmarks/setup_peer.sh                     # once: benchmarks/.venv-trl112 with trl 1.12.0
    .venv/bin/python benchmarks/ppo_vs_trl.py [--updates 8] [--repeats 3]

Both sides get the same work: prompts from `rlhf/Review-v0` resets, the same word-level vocabulary, the same tiny
LlamaConfig for policy, reference, critic and reward model (fresh weights; reward_source=model), batch 64,
16 response tokens, 4 PPO epochs x 4 minibatches, float32, `torch.set_num_threads(2)`. Each side runs in its own
process (the peer with benchmarks/.venv-trl112/bin/python), so peak RSS is per side. s/update is the steady state:
the first update (warm-up) is left out. Prints a markdown table.

Measure on an idle machine: with 2 threads on 2 cores, one other busy process slows either side several-fold
(every parallel op waits for its descheduled thread), so the table shows the 1-min load before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".venv-trl112" / "bin" / "python"
ENV_ID = "rlhf/Review-v0"
BATCH_SIZE, RESPONSE_LENGTH = 64, 16


def write_inputs(workdir: Path, num_prompts: int) -> dict[str, str]:
    """The shared inputs: vocabulary, tiny model config and prompts (json files both venvs can read)."""
    import envs
    from rlhf.config import ModelConfig
    from rlhf.models import build_tiny_model
    from rlhf.tokenizer import build_tokenizer

    vocabulary = envs.env_class(ENV_ID).vocabulary()
    paths = {name: str(workdir / name) for name in ("vocab.json", "config.json", "prompts.jsonl")}
    Path(paths["vocab.json"]).write_text(json.dumps(vocabulary))
    build_tiny_model(ModelConfig(), build_tokenizer(vocabulary)).config.to_json_file(paths["config.json"])
    env = envs.make(ENV_ID)
    lines = [json.dumps({"prompt": env.reset(seed=i)[0]}) + "\n" for i in range(num_prompts)]
    Path(paths["prompts.jsonl"]).write_text("".join(lines))
    return paths


def run_ours(workdir: Path, updates: int, threads: int, seed: int) -> dict:
    """Our PPOTrainer on the shared inputs in `workdir`, one `train(max_updates=1)` per timed update."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    import envs
    from rlhf.config import PPOConfig
    from rlhf.ppo.trainer import PPOTrainer
    from rlhf.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(json.loads((workdir / "vocab.json").read_text()))
    config = LlamaConfig.from_json_file(workdir / "config.json")
    policy, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    config.num_labels = 1
    critic, reward = (AutoModelForSequenceClassification.from_config(config) for _ in range(2))
    cfg = PPOConfig(
        reward_source="model",
        batch_size=BATCH_SIZE,
        response_length=RESPONSE_LENGTH,
        num_ppo_epochs=4,
        num_mini_batches=4,
        # one update more than timed: the trainer checkpoints after its last update, TRL's run (save "no") does not
        total_episodes=(updates + 1) * BATCH_SIZE,
        save_every=0,
        samples_every=0,
        resume=False,
    )
    trainer = PPOTrainer(
        cfg,
        policy,
        tokenizer,
        lambda: envs.make(ENV_ID),
        output_dir=workdir / "ours",
        ref_policy=ref,
        reward_model=reward,
        critic=critic,
        seed=seed,
    )
    times, cpu_times, phases = [], [], []
    for _ in range(updates):
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.train(max_updates=1)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})
    steady, steady_cpu, phases = times[1:], cpu_times[1:], phases[1:]  # the first update is warm-up
    s_per_update = sum(steady) / len(steady)
    return {
        "side": "ours (rlhf.ppo.trainer.PPOTrainer)",
        "updates": len(times),
        "batch_size": BATCH_SIZE,
        "episodes_per_s": BATCH_SIZE / s_per_update,
        "s_per_update": s_per_update,
        "cpu_s_per_update": sum(steady_cpu) / len(steady_cpu),
        "total_s": sum(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "phases_s": {k: sum(p[k] for p in phases) / len(phases) for k in phases[0]},  # rollout, score, update
    }


def run_side(cmd: list[str]) -> dict:
    """Run one side in its own process; its result is the last line of its stdout (plus the 1-min load before)."""
    load_before = os.getloadavg()[0]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load_before}


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: median over repeats, the range of episodes/s, and the 1-min load average before each run."""
    rows = [
        "| side | episodes/s | s/update | CPU s/update | peak RSS (MB) | runs (load before each) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for side, runs in results.items():
        eps = [r["episodes_per_s"] for r in runs]
        spread = f" ({min(eps):.1f}-{max(eps):.1f})" if len(runs) > 1 else ""
        s_per_update = statistics.median(r["s_per_update"] for r in runs)
        cpu = statistics.median(r["cpu_s_per_update"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        loads = ", ".join(f"{r['load_before']:.1f}" for r in runs)
        rows.append(
            f"| {side} | {statistics.median(eps):.1f}{spread} | {s_per_update:.3f} | {cpu:.2f} | {rss:.0f} | {len(runs)} ({loads}) |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=8, help="PPO updates per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    # internal: run our side in this process, on the inputs in WORKDIR
    p.add_argument("--ours", metavar="WORKDIR", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be >= 2: the first update is warm-up and is not timed")
    if a.ours:
        print(json.dumps(run_ours(Path(a.ours), a.updates, a.threads, a.seed)))
        return
    if not PEER_PYTHON.exists():
        sys.exit(f"no peer venv at {PEER_PYTHON.parent.parent}: run `bash benchmarks/setup_peer.sh` first")

    results: dict[str, list[dict]] = {"ours": [], "trl 1.12.0 PPOTrainer": []}
    with tempfile.TemporaryDirectory(prefix="ppo_vs_trl_") as tmp:
        paths = write_inputs(Path(tmp), num_prompts=BATCH_SIZE * a.updates)
        common = ["--updates", str(a.updates), "--threads", str(a.threads), "--seed", str(a.seed)]
        peer_cmd = [str(PEER_PYTHON), str(HERE / "trl112_ppo.py"), "--vocab", paths["vocab.json"]]
        peer_cmd += ["--model-config", paths["config.json"], "--prompts", paths["prompts.jsonl"], *common]
        ours_cmd = [sys.executable, __file__, "--ours", tmp, *common]
        for _ in range(a.repeats):
            results["ours"].append(run_side(ours_cmd))
            results["trl 1.12.0 PPOTrainer"].append(run_side(peer_cmd))

    print(
        f"PPO throughput on {ENV_ID}: batch {BATCH_SIZE}, {RESPONSE_LENGTH} response tokens, 4 epochs x 4 minibatches,"
    )
    print(f"tiny Llama (float32), {a.threads} threads, {a.updates} updates per run (the first left out)\n")
    print(table(results))
    phases = results["ours"][-1]["phases_s"]
    print("\nours, one update (last run): " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
    command = [os.path.relpath(sys.executable), "benchmarks/ppo_vs_trl.py", *sys.argv[1:]]
    print(f"\ncommand: {' '.join(command)}")


if __name__ == "__main__":
    main()
