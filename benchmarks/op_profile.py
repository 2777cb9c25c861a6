"""profile (a section of benchmarks/real_model.py, with --profile): torch.profiler's top operators of one update
step and of KVSampler decode steps.
"""

from __future__ import annotations

from typing import Any

from measure import Stopwatch
from smollm2_model import load_policy, review_prompts
from update_step import make_update_batch, make_update_step

MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_weight_int4pack_mm",
)


def top_ops(prof, limit: int) -> list[tuple[str, float, float]]:
    """(operator, self CPU s, share of the total self CPU time), the `limit` largest."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events[:limit]]


def matmul_share(prof) -> float:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def profile_bench(args) -> dict[str, Any]:
    """Where one update step (full and LoRA, float32) and KVSampler's decode steps spend their time."""
    from torch.profiler import ProfilerActivity, profile

    from rlhf.models.loading import load_tokenizer
    from rlhf.ppo.sampler import KVSampler

    out: dict[str, Any] = {}
    for mode in ("full", "lora"):
        model = load_policy(args.model, lora=mode == "lora").eval()
        data = make_update_batch(
            model.config.vocab_size, args.batch, args.prompt_len, args.response_len, args.seed
        )
        step = make_update_step(model, data, bf16=False, head=args.head)
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out[f"update {mode} float32"] = {
            "top": top_ops(prof, args.profile_rows),
            "matmul_share": matmul_share(prof),
        }
        del model, step

    tokenizer = load_tokenizer(args.model)
    prompts = review_prompts(tokenizer, args.gen_batch)
    for weights in ("full", "lora"):
        model = load_policy(args.model, lora=weights == "lora").eval()
        sampler = KVSampler(model, temperature=1.0, stop_token_ids=None, pad_token_id=tokenizer.pad_token_id)
        sampler.start(prompts)
        sampler.sample(3)  # warm-up
        steps = max(3, args.new_tokens // 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            watch = Stopwatch()
            sampler.sample(steps)  # steps - 1 forward passes: the first token comes from the cached logits
            step_s = watch.wall_s / (steps - 1)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        out[f"decode {weights} float32"] = {
            "top": top_ops(prof, args.profile_rows),
            "matmul_share": matmul_share(prof),
            "step_s": step_s,
            "weight_gb_per_s": weight_bytes / step_s / 1e9,
            "batch": len(prompts),
        }
        del model, sampler
    return out
