"""A real pretrained model learns: SmolLM2-135M-Instruct through the whole chain, then an independent re-evaluation.

    .venv/bin/python benchmarks/smollm2.py --seeds 0 1                  # the issue's proof (~25 min per seed)
    .venv/bin/python benchmarks/smollm2.py --seeds 0 --extra ppo.advantage=grpo ...
    .venv/bin/python benchmarks/smollm2.py --reevaluate DIR             # only re-evaluate an existing run dir
    .venv/bin/python benchmarks/smollm2.py --precision                  # fp32 vs bf16 autocast on this CPU

For each seed: `rlhf model=smollm2 seed=S hydra.run.dir=DIR` in a subprocess (wall time, peak RSS, stage times,
evaluation from summary.json), then the SFT and PPO artifacts are loaded with plain `transformers` (no code of this
project in the loop but the environment) and sampled on fresh episodes, seeds disjoint from training and evaluation,
to confirm the gain. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import measure
from measure import ROOT

FRESH_SEEDS = range(10_000, 10_128)
"""Episode seeds of the independent re-evaluation: PPO trains on [0, 2**31) from its own seed, evaluation uses
2**31 + i; these are fixed and small, and were never used as prompts of a benchmarked run."""


def run_chain(seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"seed{seed}"
    run = measure.run_rlhf(
        ["model=smollm2", f"seed={seed}", f"hydra.run.dir={run_dir}", *extra], out / f"seed{seed}.log"
    )
    shown, seconds = run.command, run.seconds
    peak_mib = measure.children_peak_rss_mib()
    if run.proc.returncode != 0:
        return {"seed": seed, "command": shown, "seconds": seconds, "error": run.proc.stderr[-800:]}
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    return {
        "seed": seed,
        "command": shown,
        "run_dir": str(run_dir),
        "seconds": seconds,
        "peak_rss_mib": peak_mib,
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "eval": stages["evaluate"]["metrics"],
        "ppo": stages["ppo"]["metrics"],
    }


def reevaluate(
    run_dir: Path, env_id: str = "rlhf/Review-v1", max_new_tokens: int = 24, temperature: float = 0.7
) -> dict[str, float]:
    """Mean gold reward of DIR/sft and DIR/ppo with plain transformers on fresh episodes (model=smollm2's
    sampling: temperature 0.7, no top-k / top-p)."""
    import gymnasium
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import envs  # noqa: F401  (registers the environment ids)

    out = {}
    for name in ("sft", "ppo"):
        tokenizer = AutoTokenizer.from_pretrained(run_dir / name)
        model = AutoModelForCausalLM.from_pretrained(run_dir / name).eval()
        env = gymnasium.make(env_id)
        golds, lengths = [], []
        seeds = list(FRESH_SEEDS)
        for start in range(0, len(seeds), 32):
            batch = seeds[start : start + 32]
            prompts = [env.reset(seed=s)[0] for s in batch]
            texts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            enc = tokenizer(
                texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
            )
            torch.manual_seed(start)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for seed, row in zip(batch, gen[:, enc["input_ids"].shape[1] :]):
                reply = tokenizer.decode(row, skip_special_tokens=True)
                env.reset(seed=seed)
                safe = "".join(c for c in reply if c in env.action_space.character_set)
                golds.append(env.step(safe)[1])
                lengths.append(int((row != tokenizer.pad_token_id).sum()))
        out[f"{name}/gold_reward"] = sum(golds) / len(golds)
        out[f"{name}/response_tokens"] = sum(lengths) / len(lengths)
    out["gold_reward_gain"] = out["ppo/gold_reward"] - out["sft/gold_reward"]
    return out


def precision(seconds: float = 20.0) -> list[dict]:
    """SmolLM2 with LoRA: a PPO-sized forward + backward + AdamW step and a generation, fp32 vs bf16 autocast."""
    return [precision_row(dtype, seconds) for dtype in ("float32", "bfloat16")]


def precision_row(dtype: str, seconds: float) -> dict:
    """Mean train step seconds over at least `seconds` (2 steps at least) and generation tokens/s of one
    generate call, with LoRA r=8, in float32 or under bf16 autocast."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "SmolLM2-135M-Instruct")
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 40_000, (8, 64))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    laps = measure.timed(step, runs=2, seconds=seconds)
    prompt = torch.randint(100, 40_000, (16, 48))
    with torch.no_grad(), autocast:
        generate = measure.timed(
            lambda: model.generate(
                input_ids=prompt, max_new_tokens=32, min_new_tokens=32, do_sample=True, top_k=0
            )
        )[0]
    return {
        "dtype": dtype,
        "train_step_s": sum(lap.wall_s for lap in laps) / len(laps),
        "generate_tokens_per_s": 16 * 32 / generate.wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "smollm2")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--reevaluate", type=Path, nargs="*", default=[])
    parser.add_argument("--precision", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.seeds:
        print(
            "| command | total s | sft s | reward s | ppo s | evaluate s | peak RSS MiB | SFT gold | PPO gold | gain |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for seed in args.seeds:
        r = run_chain(seed, args.out, args.extra)
        results.append(r)
        if "error" in r:
            print(f"| `{r['command']}` | FAILED: {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        st, ev = r["stage_seconds"], r["eval"]
        print(
            f"| `{r['command']}` | {r['seconds']:.0f} | {st['sft']:.0f} | {st['reward']:.0f} | {st['ppo']:.0f} | "
            f"{st['evaluate']:.0f} | {r['peak_rss_mib']:.0f} | {ev['sft/gold_reward']:.3f} | "
            f"{ev['ppo/gold_reward']:.3f} | {ev['gold_reward_gain']:+.3f} |",
            flush=True,
        )
    dirs = [Path(r["run_dir"]) for r in results if "run_dir" in r] + list(args.reevaluate)
    if dirs:
        print("\nIndependent re-evaluation (plain transformers, 128 fresh episodes, temperature 0.7):\n")
        print("| run dir | SFT gold | PPO gold | gain | SFT reply tokens | PPO reply tokens |")
        print("|---|---:|---:|---:|---:|---:|")
        for d in dirs:
            m = reevaluate(d)
            print(
                f"| {d} | {m['sft/gold_reward']:.3f} | {m['ppo/gold_reward']:.3f} | {m['gold_reward_gain']:+.3f} | "
                f"{m['sft/response_tokens']:.1f} | {m['ppo/response_tokens']:.1f} |",
                flush=True,
            )
    if args.precision:
        print("\n| precision (LoRA r=8, batch 8 x 64 tokens) | train step s | generate tokens/s (16 x 32) |")
        print("|---|---:|---:|")
        for row in precision():
            print(f"| {row['dtype']} | {row['train_step_s']:.2f} | {row['generate_tokens_per_s']:.0f} |")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
