"""SmolLM2-135M-Instruct on this machine: matmul peak, update-phase FLOP/s, generation tokens/s, PPO memory.

    .venv/bin/python benchmarks/real_model.py                              # every section (~15 min on 2 idle cores)
    .venv/bin/python benchmarks/real_model.py --only peak update           # some sections
    .venv/bin/python benchmarks/real_model.py --profile                    # + where the time goes (torch.profiler)
    .venv/bin/python benchmarks/real_model.py --smoke                      # tiny shapes: checks the script runs
    .venv/bin/python benchmarks/real_model.py --json results.json          # also write the key numbers

The model is `models/SmolLM2-135M-Instruct` (`make smollm2`, rlhf/models/pretrained.py), fp32 weights; LoRA is the r /
alpha / targets of conf/model/smollm2.yaml (benchmarks/smollm2_model.py). Every section runs in this process with
`torch.set_num_threads(--threads)`, except `memory`, which runs each configuration in its own subprocess (its peak RSS
is that process's own high-water mark, `measure.peak_rss_mib`). Each section is a module named for what it measures:
machine_peak.py, update_step.py, generation.py, ppo_memory.py, op_profile.py; this script runs them and prints the
tables.

Measure on an idle machine: with N threads on N cores one other busy process slows every parallel op, so each row
shows the 1-min load average when it was measured, and the timed rows their CPU share: this process's CPU time /
(wall time x threads), ~100% when its threads had the cores to themselves. On a busy machine `--threads 1` is the
steadier measurement (no thread waits at a barrier for a descheduled sibling).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

import generation
import machine_peak
import measure
import op_profile
import ppo_memory
import update_step
from smollm2_model import default_model, quiet_transformers

SECTION_MODULES = {
    "peak": machine_peak,
    "update": update_step,
    "generate": generation,
    "memory": ppo_memory,
    "profile": op_profile,
}
"""Each section's module; its docstring describes what the section measures (shown by --help)."""


def print_tables(results: dict[str, Any], args) -> dict[str, float]:
    """Markdown tables; returns the flat key numbers for --json."""
    key: dict[str, float] = {}
    peaks = {r["dtype"]: r for r in results.get("peak", [])}
    if "peak" in results:
        print(f"\n### Matmul peak ({args.threads} threads, torch.mm {args.matmul_n}^3)\n")
        print(f"| dtype | GFLOP/s, best 1 s window | mean over {args.peak_seconds:g} s | CPU share | load |")
        print("|---|---:|---:|---:|---:|")
        for r in results["peak"]:
            print(
                f"| {r['dtype']} | {r['gflops']:.0f} | {r['mean_gflops']:.0f} | {100 * r['cpu_share']:.0f}% | "
                f"{r['load']:.1f} |"
            )
            key[f"peak/{r['dtype']}_gflops"] = r["gflops"]
        bw = results["bandwidth"]
        print(
            f"\ncopy bandwidth (read + write, 256 MiB float32): {bw['gbps']:.1f} GB/s (load {bw['load']:.1f})"
        )
        key["peak/copy_gbps"] = bw["gbps"]
    if "update" in results:
        r0 = results["update"][0]
        print(
            f"\n### Update phase: one PPO policy step, {r0['batch']} x {r0['seq']} tokens, LM head {r0['head']} "
            "(forward + backward + clip + AdamW)\n"
        )
        print(
            "| weights | dtype | trainable | step s | GFLOP/step counted | model | GFLOP/s | % of peak | CPU share "
            "| load |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["update"]:
            peak = peaks.get(r["dtype"])
            frac = r["gflops"] / peak["gflops"] if peak else float("nan")
            r["fraction_of_peak"] = frac
            print(
                f"| {r['mode']} | {r['dtype']} | {r['trainable_params'] / 1e6:.2f}M | {r['step_s']:.2f} | "
                f"{r['flops'] / 1e9:.0f} | {r['model_flops'] / 1e9:.0f} | {r['gflops']:.1f} | "
                f"{100 * frac:.0f}% | {100 * r['cpu_share']:.0f}% | {r['load']:.1f} |"
            )
            name = f"update/{r['mode']}_{r['dtype']}"
            key[f"{name}/step_s"], key[f"{name}/gflops"] = r["step_s"], r["gflops"]
            key[f"{name}/fraction_of_peak"] = frac
    if "generate" in results:
        how = "stopping at eos" if args.stop_at_eos else f"exactly {args.new_tokens} tokens per row and turn"
        print(f"\n### Generation: KVSampler vs model.generate (float32 weights, temperature 1, {how})\n")
        print(
            "| weights | precision | batch | generate tok/s | KVSampler tok/s | ratio | tokens (gen / KV) "
            "| CPU share (gen / KV) | load |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for r in results["generate"]:
            print(
                f"| {r['weights']} | {r['precision']} | {r['scenario']} | {r['generate_tok_s']:.1f} | "
                f"{r['kvsampler_tok_s']:.1f} | "
                f"{r['ratio']:.2f}x | {r['generate_tokens']} / {r['kvsampler_tokens']} | "
                f"{100 * r['generate_cpu_share']:.0f}% / {100 * r['kvsampler_cpu_share']:.0f}% | {r['load']:.1f} |"
            )
            precision = "" if r["precision"] == "float32" else "_bf16"
            name = f"generate/{r['weights']}{precision}/{r['scenario'].replace(' ', '_')}"
            key[f"{name}/generate_tok_s"] = r["generate_tok_s"]
            key[f"{name}/kvsampler_tok_s"] = r["kvsampler_tok_s"]
            key[f"{name}/ratio"] = r["ratio"]
    if "memory" in results:
        print(
            f"\n### Memory: PPO (GAE) with policy, reference, critic, reward model = SmolLM2-135M; "
            f"{args.mem_updates} updates of {args.mem_batch} episodes x {args.mem_tokens} tokens\n"
        )
        print(
            "| config | RSS after imports MiB | RSS after loading | peak while loading | peak RSS MiB | "
            "loading s | s/update | load |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["memory"]:
            if "error" in r:
                print(
                    f"| {r['config']} | FAILED: {r['error'].strip().splitlines()[-1]} | | | | | | "
                    f"{r['load_before']:.1f} |"
                )
                continue
            per_update = statistics.median(r["update_s"])
            print(
                f"| {r['config']} | {r['rss_start_mib']:.0f} | {r['rss_loaded_mib']:.0f} | "
                f"{r['peak_rss_loading_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['load_s']:.0f} | "
                f"{per_update:.1f} | {r['load_before']:.1f} |"
            )
            key[f"memory/{r['config'].split(' (')[0].replace(' ', '_')}/peak_rss_mib"] = r["peak_rss_mib"]
    if "profile" in results:
        for name, p in results["profile"].items():
            extra = ""
            if "step_s" in p:
                extra = (
                    f", {1000 * p['step_s']:.0f} ms per decode step of {p['batch']} rows, weights streamed at "
                    f"{p['weight_gb_per_s']:.1f} GB/s"
                )
            print(
                f"\n### Profile: {name} (matmul share of self CPU time {100 * p['matmul_share']:.0f}%{extra})\n"
            )
            print("| operator | self CPU s | share |")
            print("|---|---:|---:|")
            for op, seconds, share in p["top"]:
                print(f"| {op} | {seconds:.3f} | {100 * share:.1f}% |")
            key[f"profile/{name.replace(' ', '_')}/matmul_share"] = p["matmul_share"]
    print(f"\ncommand: {measure.command_line('real_model.py')}")
    return key


def description() -> str:
    """--help: this module's docstring, then what each section measures."""
    sections = [textwrap.indent(m.__doc__.strip(), "  ")[2:] for m in SECTION_MODULES.values()]
    return __doc__ + "\nSections:\n\n" + "".join(f"- {doc}\n" for doc in sections)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=description(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=None, help="SmolLM2 directory (default: models/SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTION_MODULES),
        default=None,
        help="sections (default: all but profile)",
    )
    p.add_argument("--profile", action="store_true", help="add the profile section")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seconds", type=float, default=20.0, help="minimum timing window per update configuration"
    )
    p.add_argument("--min-steps", type=int, default=2, help="minimum timed update steps per configuration")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--peak-seconds", type=float, default=6.0)
    p.add_argument("--batch", type=int, default=16, help="update: sequences per minibatch")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument(
        "--head",
        choices=("fused", "full"),
        default="fused",
        help="update: LM head chunked over response tokens (the trainer's path) or full logits",
    )
    p.add_argument("--gen-batch", type=int, default=16, help="generate: rows per batch")
    p.add_argument("--group", type=int, default=4, help="generate: samples per prompt in the group scenario")
    p.add_argument("--new-tokens", type=int, default=32, help="generate: tokens per row and turn")
    p.add_argument(
        "--gen-precisions",
        nargs="+",
        choices=("float32", "bf16 autocast"),
        default=["float32", "bf16 autocast"],
        help="generate: precisions to compare the engines in",
    )
    p.add_argument(
        "--stop-at-eos", action="store_true", help="generate: stop at eos instead of fixed lengths"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="generate: runs per side, alternating; the fastest counts"
    )
    p.add_argument("--mem-batch", type=int, default=8)
    p.add_argument("--mem-tokens", type=int, default=16)
    p.add_argument("--mem-updates", type=int, default=2)
    p.add_argument(
        "--mem-configs",
        nargs="+",
        choices=list(ppo_memory.MEMORY_CONFIGS),
        default=list(ppo_memory.MEMORY_CONFIGS),
    )
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and windows: checks that everything runs"
    )
    p.add_argument("--json", type=Path, default=None, help="write the key numbers (and every row) here")
    a = p.parse_args()
    if a.smoke:
        a.seconds, a.min_steps, a.matmul_n, a.peak_seconds = 0.0, 1, 512, 1.0
        a.batch, a.prompt_len, a.response_len = 2, 12, 4
        a.gen_batch, a.group, a.new_tokens, a.repeats = 4, 2, 3, 1
        a.mem_batch, a.mem_tokens, a.mem_updates = 2, 3, 1
        a.profile_rows = 5
    a.model = a.model or default_model()
    return a


def main() -> None:
    args = parse_args()
    import torch

    from rlhf.models.pretrained import is_complete

    if not is_complete(args.model):
        sys.exit(f"no model at {args.model}: run `make smollm2` first")
    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sections = args.only or [s for s in SECTION_MODULES if s != "profile"]
    if args.profile and "profile" not in sections:
        sections.append("profile")
    results: dict[str, Any] = {}
    print(
        f"SmolLM2 benchmarks: {args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        file=sys.stderr,
    )
    if "peak" in sections:
        results["peak"] = [
            machine_peak.matmul_peak(args.matmul_n, d, args.peak_seconds) for d in ("float32", "bfloat16")
        ]
        results["bandwidth"] = machine_peak.copy_bandwidth(64 if args.smoke else 256, args.peak_seconds)
    if "update" in sections:
        results["update"] = []
        for mode in ("full", "lora"):
            for dtype in ("float32", "bfloat16"):
                row = update_step.update_bench(args, mode, dtype)
                results["update"].append(row)
                print(
                    f"  update {mode} {dtype}: {row['step_s']:.2f} s/step, {row['gflops']:.1f} GFLOP/s "
                    f"(load {row['load']:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
    if "generate" in sections:
        results["generate"] = generation.generate_bench(args)
    if "memory" in sections:
        results["memory"] = ppo_memory.memory_bench(args)
    if "profile" in sections:
        results["profile"] = op_profile.profile_bench(args)
    key = print_tables(results, args)
    if args.json:
        measure.write_results(args.json, "real_model.py", key, results)


if __name__ == "__main__":
    main()
