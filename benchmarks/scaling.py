"""How one PPO update scales with batch size and response length, and whether micro-batching keeps memory flat.

    .venv/bin/python benchmarks/scaling.py                    # both tables (~10 min on 2 idle cores)
    .venv/bin/python benchmarks/scaling.py --only time        # time per update only
    .venv/bin/python benchmarks/scaling.py --smoke            # tiny settings: checks the script runs
    .venv/bin/python benchmarks/scaling.py --json scaling.json

Our `PPOTrainer` (GAE, reward model score) on the tiny setup of benchmarks/ppo_vs_trl.py: the project's tiny Llama
(`rlhf.models.config.ModelConfig` defaults, fresh weights) for policy, reference, critic and reward model, the word-level
tokenizer of `rlhf/Review-v0`, float32, `torch.set_num_threads(--threads)`. Every configuration runs in its own
subprocess, so its peak RSS is its own (`measure.peak_rss_mib`).

- time: s/update (median of the updates after the first, a warm-up) and its phases (`time/rollout`, `time/score`,
  `time/update`) at 1x, 2x, 4x `--batch` (response length fixed) and 1x, 2x, 4x `--response-length` (batch fixed),
  with `--epochs` PPO epochs of `--mini-batches` minibatches. Linear scaling doubles s/update with each doubling.
- memory: peak RSS at 1x, 2x, 4x `--mem-batch` episodes per update, one minibatch of the whole batch, without
  micro-batching (the minibatch's forward and backward at once: activations grow with the batch) and with
  `ppo.micro_batch_size=--micro-batch` (gradients accumulated over micro-batches: the update's activations stay those
  of one micro-batch). Every row scores (reference, critic, reward model) in no-grad chunks of --micro-batch episodes
  (`ppo.forward_batch_size`), so only the update differs. The rollout (its KV cache) and the batch's own tensors still
  grow with the batch; the "above 1x" column shows how much.

Measure on an idle machine: each row shows the 1-min load average when its process started.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import measure
import ppo_run

ENV_ID = "rlhf/Review-v0"
SCALES = (1, 2, 4)


def has_micro_batch_size() -> bool:
    from rlhf.ppo.config import PPOConfig

    return any(f.name == "micro_batch_size" for f in fields(PPOConfig))


# ---------------------------------------------------------------------------------------------- one configuration


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One PPO run on the tiny setup in this process: s/update, phases, peak RSS."""
    import torch
    from transformers.utils import logging as hf_logging

    import envs
    from rlhf.models.config import ModelConfig
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_tokenizer

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    tokenizer = build_tokenizer(envs.env_class(ENV_ID).vocabulary())
    policy, ref, critic, reward = ppo_run.tiny_models(build_tiny_model(ModelConfig(), tokenizer).config)
    rss_models = measure.peak_rss_mib()
    extra = {"micro_batch_size": spec["micro_batch_size"]} if spec.get("micro_batch_size") else {}
    cfg = ppo_run.ppo_config(
        spec["batch_size"],
        spec["updates"],
        reward_source="model",
        advantage="gae",
        response_length=spec["response_length"],
        num_ppo_epochs=spec["epochs"],
        num_mini_batches=spec["mini_batches"],
        forward_batch_size=spec.get("forward_batch_size", 64),
        console_every=0,
        **extra,
    )
    laps = ppo_run.timed_run(
        cfg,
        policy,
        tokenizer,
        ENV_ID,
        spec["updates"],
        ref_policy=ref,
        reward_model=reward,
        critic=critic,
        seed=spec["seed"],
    )
    steady = laps[1:] or laps  # the first update is warm-up
    return {
        **spec,
        "s_per_update": statistics.median(lap.wall_s for lap in steady),
        "phases_s": ppo_run.phases(steady, statistics.median),
        "response_tokens": statistics.mean(lap.value["rollout/response_length"] for lap in laps),
        "rss_models_mib": rss_models,
        "peak_rss_mib": measure.peak_rss_mib(),
    }


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """`run_child(spec)` in a fresh process (its own peak RSS), with the 1-min load average before it."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    row = measure.run_side(cmd, env={"WANDB_MODE": "disabled"}, cwd=measure.ROOT)
    print(
        f"  {spec['series']}: batch {spec['batch_size']}, response {spec['response_length']}, micro "
        f"{spec.get('micro_batch_size')}: {row['s_per_update']:.3f} s/update, peak {row['peak_rss_mib']:.0f} MiB "
        f"(load {row['load_before']:.1f})",
        file=sys.stderr,
        flush=True,
    )
    return row


# ---------------------------------------------------------------------------------------------- the two tables


def time_rows(args) -> list[dict[str, Any]]:
    base = {
        "threads": args.threads,
        "seed": args.seed,
        "updates": args.updates,
        "epochs": args.epochs,
        "mini_batches": args.mini_batches,
    }
    rows = []
    for k in SCALES:
        spec = {**base, "series": "batch", "scale": k, "batch_size": k * args.batch}
        rows.append(run_config({**spec, "response_length": args.response_length}))
    for k in SCALES:
        spec = {**base, "series": "response", "scale": k, "batch_size": args.batch}
        rows.append(run_config({**spec, "response_length": k * args.response_length}))
    return rows


def memory_rows(args) -> list[dict[str, Any]]:
    base = {
        "threads": args.threads,
        "seed": args.seed,
        "updates": args.mem_updates,
        "epochs": 1,
        "mini_batches": 1,  # the whole batch is one minibatch: what micro-batching is for
        "response_length": args.response_length,
        # the no-grad forwards (reference, critic, reward model) in chunks of the same size in every row: only the
        # update's micro-batching differs
        "forward_batch_size": args.micro_batch,
    }
    micro_options: list[int | None] = [None]
    if has_micro_batch_size():
        micro_options.append(args.micro_batch)
    rows = []
    for micro in micro_options:
        for k in SCALES:
            batch = k * args.mem_batch
            spec = {**base, "series": "memory", "scale": k, "batch_size": batch, "micro_batch_size": micro}
            rows.append(run_config(spec))
    return rows


def print_tables(results: dict[str, list[dict[str, Any]]], args) -> dict[str, float]:
    key: dict[str, float] = {}
    if "time" in results:
        rows = results["time"]
        print(
            f"\n### Time per PPO update (tiny Llama, GAE, {args.epochs} epochs x {args.mini_batches} minibatches, "
            f"{args.threads} threads; median of {args.updates - 1} updates after a warm-up)\n"
        )
        print(
            "| scaled | batch | response tokens | s/update | x of 1x | rollout s | score s | update s | load |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for series in ("batch", "response"):
            group = [r for r in rows if r["series"] == series]
            first = group[0]["s_per_update"]
            for r in group:
                ph = r["phases_s"]
                print(
                    f"| {series} {r['scale']}x | {r['batch_size']} | {r['response_length']} | "
                    f"{r['s_per_update']:.3f} | {r['s_per_update'] / first:.2f} | {ph['time/rollout']:.3f} | "
                    f"{ph['time/score']:.3f} | {ph['time/update']:.3f} | {r['load_before']:.1f} |"
                )
                key[f"time/{series}_{r['scale']}x/s_per_update"] = r["s_per_update"]
    if "memory" in results:
        rows = results["memory"]
        print(
            f"\n### Peak RSS per PPO run (tiny Llama, GAE, one minibatch of the whole batch, {args.mem_updates} "
            "updates; each its own process)\n"
        )
        print(
            "| micro_batch_size | batch | response tokens | peak RSS MiB | above 1x MiB | s/update | load |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for micro in dict.fromkeys(r["micro_batch_size"] for r in rows):
            group = [r for r in rows if r["micro_batch_size"] == micro]
            first = group[0]["peak_rss_mib"]
            for r in group:
                print(
                    f"| {micro or 'none (whole minibatch)'} | {r['batch_size']} | {r['response_length']} | "
                    f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - first:+.0f} | {r['s_per_update']:.2f} | "
                    f"{r['load_before']:.1f} |"
                )
                key[f"memory/micro_{micro or 'none'}/batch_{r['batch_size']}/peak_rss_mib"] = r[
                    "peak_rss_mib"
                ]
        if not has_micro_batch_size():
            print(
                "\nTODO: PPOConfig has no micro_batch_size yet; only the rows without micro-batching were measured."
            )
    print(f"\ncommand: {measure.command_line('scaling.py')}")
    return key


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=("time", "memory"), default=["time", "memory"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="time: 1x episodes per update")
    p.add_argument("--response-length", type=int, default=16, help="1x response tokens")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mini-batches", type=int, default=4)
    p.add_argument("--updates", type=int, default=4, help="time: updates per run (the first is warm-up)")
    p.add_argument("--mem-batch", type=int, default=256, help="memory: 1x episodes per update")
    p.add_argument(
        "--micro-batch", type=int, default=32, help="memory: ppo.micro_batch_size of the flat rows"
    )
    p.add_argument("--mem-updates", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks that everything runs")
    p.add_argument("--json", type=Path, default=None, help="write the key numbers (and every row) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if args.smoke:
        args.batch, args.response_length, args.epochs, args.mini_batches, args.updates = 8, 4, 1, 2, 2
        args.mem_batch, args.micro_batch, args.mem_updates = 8, 4, 1
    results: dict[str, list[dict[str, Any]]] = {}
    if "time" in args.only:
        results["time"] = time_rows(args)
    if "memory" in args.only:
        results["memory"] = memory_rows(args)
    key = print_tables(results, args)
    if args.json:
        measure.write_results(args.json, "scaling.py", key, results)


if __name__ == "__main__":
    main()
