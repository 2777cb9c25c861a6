"""update (a section of benchmarks/real_model.py): one PPO minibatch step of the policy as `rlhf.ppo.trainer` does
it (forward over prompt + response with position ids from the mask, float32 log-probabilities of the response
tokens, clipped policy loss, entropy as a detached statistic, backward, gradient clipping, AdamW), on `--batch`
sequences of `--prompt-len` + `--response-len` tokens (left padding of up to 7 tokens on some rows), for full
fine-tuning and LoRA, float32 and bf16 autocast (float32 master weights, as `model.dtype=bfloat16` trains). FLOPs
are counted by `torch.utils.flop_counter.FlopCounterMode` on one step: every matmul that actually ran (forward,
activation gradients, weight gradients, and the fused head's recomputation of its logits in the backward) plus
attention (torch 2.13 does not count CPU SDPA: registered here with torch's own `sdpa_flop_count` formulas,
dense, i.e. the causal half not subtracted). Elementwise work (softmax over the 49,152-token vocabulary, norms,
AdamW) counts 0 FLOPs but takes time. "model" FLOPs are the analytic count without recomputation: k * N_body * T
+ k * V * H * T_head + 3 * 4 * L * B * S^2 * d * H_q (attention forward, x3 with its backward), k = 6 for full
fine-tuning (forward 2, activation gradients 2, weight gradients 2) and 4 for LoRA (no weight gradients of the
frozen base; adapters add 6 * N_adapters * T), N_body = the transformer blocks' Linear weights, T = batch *
sequence tokens, T_head = the positions the LM head runs on (--head fused: batch * (response + 1); full: T).
GFLOP/s = counted FLOPs / the fastest timed step (other processes only ever add time; the median is in the JSON);
"% peak" divides that by the matmul peak (best window) of the same dtype.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from measure import cpu_share, load_1min, peak_rss_mib, timed
from smollm2_model import load_policy

_SDPA_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (torch 2.13 counts only the CUDA ones), with torch's own
    dense SDPA formulas (GQA aware)."""
    global _SDPA_REGISTERED
    import torch
    from torch.utils import flop_counter as fc

    if _SDPA_REGISTERED:
        return
    _SDPA_REGISTERED = True
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd.default not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)

    if bwd is not None and bwd.default not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def analytic_flops(model, batch: int, prompt_len: int, response_len: int, lora: bool, head: str) -> float:
    """Model FLOPs of one update step (no recomputation; see the module docstring)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    lm_head = base.get_output_embeddings()
    seq = prompt_len + response_len
    tokens = batch * seq
    head_tokens = batch * (response_len + 1) if head == "fused" else tokens  # fused: + logits_to_keep=1
    linears = [m for m in base.modules() if isinstance(m, nn.Linear) and m is not lm_head]
    adapters = sum(m.weight.numel() for m in linears if m.weight.requires_grad) if lora else 0
    body = sum(m.weight.numel() for m in linears) - adapters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention_fwd = 4 * cfg.num_hidden_layers * batch * seq * seq * head_dim * cfg.num_attention_heads
    k = 4 if lora else 6  # forward 2, activation gradients 2, weight gradients 2 (not for a frozen base)
    return (
        k * body * tokens
        + 6 * adapters * tokens
        + k * lm_head.weight.numel() * head_tokens
        + 3 * attention_fwd
    )


@dataclass
class UpdateBatch:
    """A PPO minibatch as the trainer holds it: ids (b, Q + R), mask, response tokens' action mask, advantages."""

    query_responses: Any
    attention_mask: Any
    action_mask: Any
    advantages: Any
    old_logprobs: Any
    context_length: int


def make_update_batch(vocab: int, batch: int, prompt_len: int, response_len: int, seed: int) -> UpdateBatch:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab, (batch, prompt_len + response_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):  # left padding of 0-7 tokens, as a batch of prompts of different lengths has
        mask[i, : i % 8] = 0
    ids = ids.masked_fill(mask == 0, 2)
    action_mask = torch.ones((batch, response_len), dtype=torch.bool)
    advantages = torch.randn((batch, response_len), generator=g)
    old = torch.zeros((batch, response_len))
    return UpdateBatch(ids, mask, action_mask, advantages, old, prompt_len)


def policy_minibatch_loss(model, data: UpdateBatch, bf16: bool, lm_head):
    """The policy's loss of one minibatch as the trainer computes it (`rlhf.ppo.optimise`): the forward of
    `rollout.response_logprobs`, then `losses.ppo_loss` with the settings this benchmark times (cliprange 0.2,
    ent_coef 0, KL in the reward, temperature 1, no critic)."""
    import torch

    from rlhf.ppo.losses import ppo_loss
    from rlhf.ppo.rollout import response_logprobs

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logprobs, entropy = response_logprobs(
            model, data.query_responses, data.attention_mask, data.context_length, 1.0, lm_head
        )  # (b, R), (b, R) float32
    loss, _ = ppo_loss(logprobs, entropy, data.old_logprobs, data.advantages, data.action_mask, cliprange=0.2)
    return loss


def make_update_step(model, data: UpdateBatch, bf16: bool, head: str) -> Callable[[], None]:
    """One PPO minibatch step of the policy, as `PPOTrainer` does it for the policy (its minibatch loss, backward,
    gradient clipping and AdamW step; one micro-batch). head: fused (the trainer's path: the LM head applied a chunk
    of response tokens at a time by `rollout.response_logprobs`) | full (full (b, R, V) logits, the path without a
    plain head)."""
    import torch

    from rlhf.ppo.rollout import output_head

    lm_head = output_head(model) if head == "fused" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, eps=1e-5)

    def step() -> None:
        policy_minibatch_loss(model, data, bf16, lm_head).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def count_flops(step: Callable[[], None]) -> tuple[float, dict[str, float]]:
    """FLOPs of one call of `step` (FlopCounterMode), total and per operator."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        step()
    per_op = {str(op).replace("aten.", ""): float(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return float(counter.get_total_flops()), per_op


def update_bench(args, mode: str, dtype: str) -> dict[str, Any]:
    """Time and count one PPO policy step for mode full|lora and dtype float32|bfloat16 (autocast)."""
    import torch

    from rlhf.ppo.rollout import response_logprobs

    model = load_policy(args.model, lora=mode == "lora")
    model.eval()  # the trainer keeps dropout off
    data = make_update_batch(
        model.config.vocab_size, args.batch, args.prompt_len, args.response_len, args.seed
    )
    with torch.no_grad():  # old log-probabilities = the current ones: ratio 1, as the first epoch
        data.old_logprobs = response_logprobs(
            model, data.query_responses, data.attention_mask, data.context_length, 1.0, None
        )[0]
    step = make_update_step(model, data, bf16=dtype == "bfloat16", head=args.head)
    flops, per_op = count_flops(step)  # also the warm-up step
    load = load_1min()
    laps = timed(step, runs=args.min_steps, seconds=args.seconds)
    times = [lap.wall_s for lap in laps]
    fastest = laps[times.index(min(times))]  # other processes on a shared machine only ever add time
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "mode": mode,
        "dtype": dtype,
        "batch": args.batch,
        "seq": args.prompt_len + args.response_len,
        "tokens": args.batch * (args.prompt_len + args.response_len),
        "trainable_params": trainable,
        "step_s": fastest.wall_s,
        "median_step_s": statistics.median(times),
        "cpu_share": cpu_share(fastest.cpu_s, fastest.wall_s),
        "steps": len(times),
        "flops": flops,
        "model_flops": analytic_flops(
            model, args.batch, args.prompt_len, args.response_len, mode == "lora", args.head
        ),
        "head": args.head,
        "gflops": flops / fastest.wall_s / 1e9,
        "flops_by_op": per_op,
        "load": load,
        "rss_mib": peak_rss_mib(),
    }
    del model, step
    return row
