"""SFT + reward model: our pipeline side by side with bare TRL on the same model, data and hyper-parameters.

    .venv/bin/python benchmarks/sft_reward.py                       # default: review task, tiny model
    .venv/bin/python benchmarks/sft_reward.py task=arithmetic       # Hydra overrides apply to every side
    .venv/bin/python benchmarks/sft_reward.py --sides trl,ours      # a subset of trl, ours, ours-nolog

Sides, each in its own subprocess (so that peak RSS is its own), one after the other:
- `trl`: bare TRL, a script-like function: tokenizer + tiny LlamaConfig, SFTTrainer on the task's demonstrations,
  save, AutoModelForSequenceClassification from that, RewardTrainer on the task's preferences. No Hydra, no W&B,
  no pipeline. Its LlamaConfig, SFTConfig / RewardConfig arguments, seeds, data sizes and torch threads are
  read from our composed config and stage code (`rlhf.stages.trl_common.trainer_arguments`), so they stay identical,
  except `report_to="none"`.
- `ours`: `rlhf.cli.compose(["stages=[sft,reward]", ...])` + `rlhf.run.pipeline.run` (logger=wandb offline by default).
- `ours-nolog`: the same with `logger=none`, to separate W&B's cost from the rest (Hydra, checks, extras).

Target (issue 3): SFT + reward <= 90 s on 2 CPU cores, held-out reward accuracy >= 0.80 on the review task.
Stage seconds are the pipeline's own (`summary.json`: load, data, train, evals, samples, save); for bare TRL the
same span of its script. "in-process" is everything after the imports both sides share (torch, transformers,
datasets, trl): Hydra compose, input checks, base model, W&B runs and artifacts. "process" is the subprocess's
wall time with interpreter start, imports and exit, i.e. roughly what `rlhf stages=[sft,reward]` takes.
Peak RSS is the side's own process (`measure.peak_rss_mib`); "(+N)" is the sampled peak of its subprocesses
(wandb-core, `measure.sample_descendants_rss`).
Reward accuracy is per held-out pair (chosen scored above rejected), computed the same way on every side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import measure

START = measure.Stopwatch()
SIDES = {
    "trl": "bare TRL (SFTTrainer -> RewardTrainer)",
    "ours": "ours, logger=wandb (offline)",
    "ours-nolog": "ours, logger=none",
}


# ---------------------------------------------------------------------------------------------- the bare peer
def peer_settings(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Everything the bare-TRL side must share with ours, read from our composed config and stage code."""
    import envs
    from rlhf.cli import compose
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_tokenizer
    from rlhf.run.pipeline import BASE, derive_seed, set_threads
    from rlhf.stages.trl_common import trainer_arguments

    cfg = compose(["stages=[sft,reward]", *overrides])
    if (
        cfg.model.name_or_path
        or cfg.model.lora.r
        or cfg.sft.dataset
        or cfg.reward.dataset
        or cfg.reward.init_from
    ):
        raise ValueError(
            "the bare-TRL side covers the tiny model on the task's own data only; drop those overrides"
        )
    if round(min(cfg.task.num_demonstrations, cfg.task.num_preferences) * cfg.task.eval_fraction) == 0:
        raise ValueError(
            f"task.eval_fraction={cfg.task.eval_fraction} holds out nothing; the benchmark needs eval data"
        )
    seeds = {stage: derive_seed(cfg.seed, stage) for stage in (BASE, "sft", "reward")}
    model_dir = run_dir / "llama_config"
    tokenizer = build_tokenizer(envs.env_class(cfg.task.env_id).vocabulary())
    build_tiny_model(cfg.model, tokenizer).config.save_pretrained(model_dir)  # our LlamaConfig: config.json

    def args(stage: str, stage_cfg: Any) -> dict[str, Any]:
        ctx = SimpleNamespace(
            output_dir=run_dir / "trl" / stage, tracker=SimpleNamespace(report_to="none"), seed=seeds[stage]
        )
        return trainer_arguments(cfg, ctx, stage_cfg, has_eval=True)

    return {
        "env_id": cfg.task.env_id,
        "num_demonstrations": cfg.task.num_demonstrations,
        "num_preferences": cfg.task.num_preferences,
        "eval_fraction": cfg.task.eval_fraction,
        "seeds": seeds,
        "threads": set_threads(cfg),
        "llama_config": str(model_dir),
        # the extra arguments our stages pass (assistant_only_loss is set per data format, as ours does)
        "sft_args": {**args("sft", cfg.sft), "packing": False},
        "reward_args": {**args("reward", cfg.reward), "center_rewards_coefficient": None},
    }


def bare_trl(hp: dict[str, Any], out: Path) -> dict[str, Any]:
    """SFT then reward model with TRL directly, as a user's script would: no Hydra, no W&B, no pipeline."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, set_seed
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    import envs
    from rlhf.models.tokenizer import build_tokenizer

    torch.set_num_threads(hp["threads"])
    task = envs.env_class(hp["env_id"])

    def space(row: dict) -> dict:  # TRL joins prompt + completion as strings: keep a word boundary
        if not isinstance(row.get("prompt"), str):
            return row
        return {
            k: " " + v if k != "prompt" and isinstance(v, str) and v[:1] != " " else v for k, v in row.items()
        }

    def splits(rows: list[dict], seed: int) -> tuple[Dataset, Dataset]:
        ds = Dataset.from_list(rows).map(space)
        parts = ds.train_test_split(test_size=round(len(ds) * hp["eval_fraction"]), seed=seed, shuffle=True)
        return parts["train"], parts["test"]

    whole = measure.Stopwatch()
    set_seed(hp["seeds"]["base"])
    tokenizer = build_tokenizer(task.vocabulary())
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(hp["llama_config"]))

    sft_clock = measure.Stopwatch()
    seed = hp["seeds"]["sft"]
    set_seed(seed)
    train, evals = splits(task.demonstrations(hp["num_demonstrations"], seed), seed)
    sft_args = {**hp["sft_args"], "output_dir": str(out / "sft")}
    args = SFTConfig(**sft_args, assistant_only_loss="messages" in train.column_names)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    trainer.train()
    sft_eval_loss = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e][-1]
    trainer.save_model(out / "sft")
    sft_seconds = sft_clock.wall_s

    reward_clock = measure.Stopwatch()
    seed = hp["seeds"]["reward"]
    set_seed(seed)
    train, evals = splits(task.preferences(hp["num_preferences"], seed), seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(out / "sft"), num_labels=1)
    args = RewardConfig(**{**hp["reward_args"], "output_dir": str(out / "reward")})
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    trainer.train()
    trl_accuracy = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e][-1]
    trainer.save_model(out / "reward")
    reward_seconds = reward_clock.wall_s
    total = whole.wall_s

    # measurement only (not timed): per-pair accuracy, as ours reports it (TRL's logs average per-batch means)
    collate = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    data, model, hits = trainer.eval_dataset, trainer.model.eval(), 0
    with torch.no_grad():
        for i in range(0, len(data), 64):
            batch = collate(
                [
                    {k: data[j][k] for k in ("chosen_ids", "rejected_ids")}
                    for j in range(i, min(i + 64, len(data)))
                ]
            )
            chosen, rejected = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                .logits.squeeze(-1)
                .chunk(2)
            )
            hits += int((chosen > rejected).sum())
    return {
        "sft": sft_seconds,
        "reward": reward_seconds,
        "in_process": total,
        "sft_eval_loss": sft_eval_loss,
        "accuracy": hits / len(data),
        "trl_logged_accuracy": trl_accuracy,
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- our pipeline
def ours(overrides: list[str], out: Path) -> dict[str, Any]:
    """`rlhf stages=[sft,reward] <overrides>` through compose + pipeline.run, as the command line does."""
    import torch

    from rlhf.cli import compose
    from rlhf.run.pipeline import run

    clock = measure.Stopwatch()
    cfg = compose(["stages=[sft,reward]", *overrides])
    composed = clock.wall_s
    summary = run(cfg, run_dir=out, group="bench-sft-reward")
    total = clock.wall_s
    stages = summary["stages"]
    return {
        "sft": stages["sft"]["seconds"],
        "reward": stages["reward"]["seconds"],
        "in_process": total,
        "compose": composed,
        "sft_eval_loss": stages["sft"]["metrics"].get("eval/loss"),
        "accuracy": stages["reward"]["metrics"].get("eval/accuracy"),
        "metrics": {name: entry["metrics"] for name, entry in stages.items()},
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------- driver
def child(side: str, overrides: list[str], run_dir: Path, settings: Path | None) -> None:
    """Run one side in this (fresh) process and write its numbers to `run_dir/<side>.json`."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    subprocess_peak = measure.sample_descendants_rss()
    # the heavy imports both sides share, outside the in-process time (ours imports them lazily, mid-run)
    import datasets  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM  # noqa: F401
    from trl import RewardTrainer, SFTTrainer  # noqa: F401

    imports = START.wall_s
    if side == "trl":
        result = bare_trl(json.loads(settings.read_text()), run_dir / "trl")
    else:
        extra = ["logger=none"] if side == "ours-nolog" else []
        result = ours([*overrides, *extra], run_dir / side)
    result["imports"] = imports
    result["rss_mib"], result["rss_subprocess_mib"] = measure.peak_rss_mib(), subprocess_peak[0]
    (run_dir / f"{side}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def launch(side: str, overrides: list[str], run_dir: Path, settings: Path) -> dict[str, Any]:
    """One side in a fresh subprocess (output in `run_dir/<side>.log`); its numbers plus its wall time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"{side}.log"
    print(f"running {side} ... (log: {log})", flush=True)
    cmd = [sys.executable, __file__, "--child", side, "--run-dir", str(run_dir), "--settings", str(settings)]
    return measure.run_side([*cmd, *overrides], log=log)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median of the numbers of repeated runs (other values from the first run)."""
    return {
        k: statistics.median(r[k] for r in runs) if isinstance(v, int | float) else v
        for k, v in runs[0].items()
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def change(value: float, base: float) -> str:
    return f"{value - base:+.1f} ({(value / base - 1) * 100:+.0f}%)"


def print_report(
    results: dict[str, dict[str, Any]], overrides: list[str], repeats: int, run_dir: Path
) -> None:
    import torch

    threads = "/".join(sorted({str(int(r["threads"])) for r in results.values()}))
    print()
    print(
        f"SFT + reward model, `{' '.join(['stages=[sft,reward]', *overrides])}`"
        + (f", median of {repeats} runs" if repeats > 1 else "")
    )
    print(
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"torch threads {threads}, load average now {measure.load_1min():.2f})"
    )
    print()
    print(
        "| side | SFT s | reward s | SFT + reward s | in-process s | process s | peak RSS MiB | SFT eval loss | reward accuracy |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, r in results.items():
        rss = fmt(r["rss_mib"], ".0f") + (
            f" (+{r['rss_subprocess_mib']:.0f})" if r["rss_subprocess_mib"] else ""
        )
        print(
            f"| {SIDES[side]} | {fmt(r['sft'])} | {fmt(r['reward'])} | {fmt(r['sft'] + r['reward'])} "
            f"| {fmt(r['in_process'])} | {fmt(r['process_s'])} | {rss} | {fmt(r['sft_eval_loss'], '.3f')} "
            f"| {fmt(r['accuracy'], '.3f')} |"
        )
    base = results.get("trl")
    for side, r in results.items():
        if base is None or side == "trl":
            continue
        both = change(r["sft"] + r["reward"], base["sft"] + base["reward"])
        print(
            f"| overhead of {SIDES[side]} over bare TRL | {change(r['sft'], base['sft'])} "
            f"| {change(r['reward'], base['reward'])} | {both} | {change(r['in_process'], base['in_process'])} "
            f"| {change(r['process_s'], base['process_s'])} | {r['rss_mib'] - base['rss_mib']:+.0f} | | |"
        )
    print()
    print(
        "imports (torch, transformers, datasets, trl) s: "
        + ", ".join(f"{s} {r['imports']:.1f}" for s, r in results.items())
        + "; Hydra compose s: "
        + ", ".join(f"{s} {r['compose']:.2f}" for s, r in results.items() if "compose" in r)
    )
    if base is not None:
        print(
            f"bare TRL's own logged eval_accuracy (mean of per-batch means): {base['trl_logged_accuracy']:.3f}"
        )
    for side in [s for s in results if s != "trl"][:1]:
        shown = "; ".join(
            f"{stage}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, int | float))
            for stage, m in results[side]["metrics"].items()
        )
        print(f"our metrics: {shown}")
    print("target: SFT + reward <= 90 s, reward accuracy >= 0.80 (review task)")
    print(f"outputs and logs: {run_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as on the rlhf command line")
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="keep outputs and logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated subset of {', '.join(SIDES)}"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every side this often, interleaved; report medians"
    )
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--settings", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_dir = (args.run_dir or Path(tempfile.mkdtemp(prefix="bench_sft_reward_"))).resolve()
    if args.child:
        return child(args.child, args.overrides, run_dir, args.settings)

    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or not sides:
        parser.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    settings = run_dir / "peer_settings.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    if "trl" in sides:
        settings.write_text(json.dumps(peer_settings(args.overrides, run_dir), indent=2))
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(args.repeats):  # interleaved, so that a busy spell on a shared machine hits every side
        for side in sides:
            runs[side].append(launch(side, args.overrides, run_dir / f"run{i}", settings))
    print_report({side: median_of(r) for side, r in runs.items()}, args.overrides, args.repeats, run_dir)
    print("\n`" + " ".join([".venv/bin/python benchmarks/sft_reward.py", *sys.argv[1:]]) + "`")


if __name__ == "__main__":
    main()
