"""memory (a section of benchmarks/real_model.py): peak RSS of a PPO run (`rlhf.ppo.trainer.PPOTrainer`, GAE) with
policy, reference, critic and reward model all SmolLM2 (critic and reward model
`AutoModelForSequenceClassification`, num_labels=1, fresh head), loaded as `rlhf.stages.ppo` loads them: with
LoRA the reference is the policy with adapters disabled and the critic gets LoRA too; frozen models in
`model.dtype`. --mem-updates updates of --mem-batch episodes x --mem-tokens response tokens, one minibatch, one
epoch, review task. Each configuration runs in its own process (`measure.run_side`), so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any

import ppo_run
from measure import ROOT, Stopwatch, current_rss_mib, peak_rss_mib, run_side
from smollm2_model import ENV_ID, quiet_transformers, smollm2_lora

MEMORY_CONFIGS = {
    "full float32": {"lora": False, "dtype": "float32"},
    "LoRA float32": {"lora": True, "dtype": "float32"},
    "full bf16": {"lora": False, "dtype": "bfloat16"},
    "LoRA bf16 (model=smollm2)": {"lora": True, "dtype": "bfloat16"},
}
"""dtype: `model.dtype` (bfloat16: frozen models stored in bf16, trained ones float32 under bf16 autocast)."""


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One PPO run (GAE: policy, reference, critic, reward model) in this process; its peak RSS and timings."""
    import torch
    from accelerate import Accelerator

    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer

    conf = MEMORY_CONFIGS[spec["config"]]
    model = Path(spec["model"])
    quiet_transformers()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    rss_start = current_rss_mib()
    lora = smollm2_lora() if conf["lora"] else None
    dtype = conf["dtype"]
    loading = Stopwatch()
    tokenizer = load_tokenizer(model)
    policy = load_causal_lm(model, "float32", lora=lora)
    reference = None if lora else load_causal_lm(model, dtype)  # with LoRA: the adapter-disabled policy
    reward_model = load_reward_model(model, dtype)
    critic = load_reward_model(model, "float32", lora=lora)
    load_s = loading.wall_s
    gc.collect()
    rss_loaded, peak_loading = current_rss_mib(), peak_rss_mib()
    batch = spec["mem_batch"]
    cfg = ppo_run.ppo_config(
        batch,
        spec["mem_updates"],
        advantage="gae",
        reward_source="model",
        response_length=spec["mem_tokens"],
        num_ppo_epochs=1,
        num_mini_batches=1,
        forward_batch_size=batch,
        console_every=0,
    )
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if dtype == "bfloat16" else "no")
    laps = ppo_run.timed_run(
        cfg,
        policy,
        tokenizer,
        ENV_ID,
        spec["mem_updates"],
        ref_policy=reference,
        reward_model=reward_model,
        critic=critic,
        accelerator=accelerator,
        seed=spec["seed"],
    )
    return {
        "config": spec["config"],
        "lora": conf["lora"],
        "dtype": dtype,
        "rss_start_mib": rss_start,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_loading_mib": peak_loading,
        "rss_end_mib": current_rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "load_s": load_s,
        "update_s": [lap.wall_s for lap in laps],
        "phases_s": ppo_run.phases(laps[-1:]),
        "response_length": laps[-1].value.get("rollout/response_length"),
    }


def memory_bench(args) -> list[dict[str, Any]]:
    """`memory_child` of every configuration of --mem-configs, each in its own process."""
    rows = []
    for name in args.mem_configs:
        spec = {"config": name, "model": str(args.model), "threads": args.threads, "seed": args.seed}
        spec.update(mem_batch=args.mem_batch, mem_tokens=args.mem_tokens, mem_updates=args.mem_updates)
        cmd = [sys.executable, __file__, json.dumps(spec)]
        row = run_side(cmd, env={"WANDB_MODE": "disabled"}, cwd=ROOT, check=False)
        rows.append({"config": name, **row})
        if "error" in row:
            print(f"  memory {name}: FAILED\n{row['error']}", file=sys.stderr, flush=True)
            continue
        print(
            f"  memory {name}: peak {row['peak_rss_mib']:.0f} MiB (load {row['load_before']:.1f})",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description="One configuration of the memory section of benchmarks/real_model.py (which runs this)."
    )
    p.add_argument("spec", help="json: config (a MEMORY_CONFIGS name), model, threads, seed, mem_batch, ...")
    print(json.dumps(memory_child(json.loads(p.parse_args().spec))))  # the row, as the last line


if __name__ == "__main__":
    main()
