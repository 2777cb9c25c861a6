"""Which attention a trained forward should use on this CPU: torch's SDPA or `rlhf.models.attention.float32_cpu_sdpa`.

One SmolLM2 PPO policy step (`update_step.make_update_step`: 16 sequences of 64 + 32 tokens, left padding of 0-7
tokens, so the attention gets a padding mask as in training), with LoRA (`model=smollm2`'s setting) and full
fine-tuning, in float32 and under bf16 autocast, each with both attentions, alternated, the median of `--repeats`
timed steps per configuration. In float32 the two are one code path (the float32 variant only differs under low
precision), which the float32 rows confirm.

    .venv/bin/python benchmarks/attention.py                    # ~6 min on 2 cores
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python benchmarks/attention.py

Prints a markdown table and the CPU torch reports.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import measure
from smollm2_model import default_model, load_policy
from update_step import make_update_batch, make_update_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    import torch

    from rlhf.models.attention import FLOAT32_CPU_SDPA
    from rlhf.models.precision import cpu_features

    torch.set_num_threads(a.threads)
    cpu = cpu_features()
    print(
        f"CPU: {cpu.name}, torch kernels {cpu.capability}, AMX {cpu.amx_bf16}, AVX512-BF16 {cpu.avx512_bf16}"
    )
    print("| tuning | precision | SDPA step s | float32 attention step s | float32 attention speed-up |")
    print("|---|---|---:|---:|---:|")
    for lora in (True, False):
        model = load_policy(a.model, lora)
        data = make_update_batch(model.config.vocab_size, 16, 64, 32, seed=0)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for bf16 in (False, True):
            step = make_update_step(model, data, bf16, "fused")
            times: dict[str, list[float]] = {"sdpa": [], FLOAT32_CPU_SDPA: []}
            for impl in times:  # warm-up, once each
                base.set_attn_implementation(impl)
                step()
            for _ in range(a.repeats):
                for impl, seen in times.items():
                    base.set_attn_implementation(impl)
                    seen.append(measure.timed(step)[0].wall_s)
            sdpa, f32 = (statistics.median(times[k]) for k in ("sdpa", FLOAT32_CPU_SDPA))
            print(
                f"| {'LoRA' if lora else 'full'} | {'bf16 autocast' if bf16 else 'float32'} | {sdpa:.3f} | "
                f"{f32:.3f} | {sdpa / f32:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
