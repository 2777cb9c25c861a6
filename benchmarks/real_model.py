"""SmolLM2-135M-Instruct on this machine: matmul peak, update-phase FLOP/s, generation tokens/s, PPO memory.

    .venv/bin/python benchmarks/real_model.py                              # every section (~15 min on 2 idle cores)
    .venv/bin/python benchmarks/real_model.py --only peak update           # some sections
    .venv/bin/python benchmarks/real_model.py --profile                    # + where the time goes (torch.profiler)
    .venv/bin/python benchmarks/real_model.py --smoke                      # tiny shapes: checks the script runs
    .venv/bin/python benchmarks/real_model.py --json results.json          # also write the key numbers

The model is `models/SmolLM2-135M-Instruct` (`make smollm2`, rlhf/models/pretrained.py), fp32 weights; LoRA is the r / alpha /
targets of conf/model/smollm2.yaml. Every section runs in this process with `torch.set_num_threads(--threads)`, except
`memory`, which runs each configuration in its own subprocess (its peak RSS is that process's own high-water mark,
VmHWM: a child's `ru_maxrss` would include this process's RSS at the spawn, see `peak_rss_mib`).

Sections:

- peak: sustained FLOP/s of 2048^3 matmuls (torch.mm) in float32 and bfloat16: the best 1-second window (total
  FLOPs / time) of `--peak-seconds`, and the mean over all of them; the same thread count as everything else. Plus copy
  bandwidth (GB/s read + written of a 256 MiB tensor), the bound of a memory-bound decode step.
- update: one PPO minibatch step of the policy as `rlhf.ppo.trainer` does it (forward over prompt + response with
  position ids from the mask, float32 log-probabilities of the response tokens, clipped policy loss, entropy as a
  detached statistic, backward, gradient clipping, AdamW), on `--batch` sequences of `--prompt-len` + `--response-len`
  tokens (left padding of up to 7 tokens on some rows), for full fine-tuning and LoRA, float32 and bf16 autocast
  (float32 master weights, as `model.dtype=bfloat16` trains). FLOPs are counted by
  `torch.utils.flop_counter.FlopCounterMode` on one step: every matmul that actually ran (forward, activation
  gradients, weight gradients, and the fused head's recomputation of its logits in the backward) plus attention
  (torch 2.13 does not count CPU SDPA: registered here with torch's own `sdpa_flop_count` formulas, dense, i.e. the
  causal half not subtracted). Elementwise work (softmax over the 49,152-token vocabulary, norms, AdamW) counts 0
  FLOPs but takes time. "model" FLOPs are the analytic count without recomputation: k * N_body * T +
  k * V * H * T_head + 3 * 4 * L * B * S^2 * d * H_q (attention forward, x3 with its backward), k = 6 for full
  fine-tuning (forward 2, activation gradients 2, weight gradients 2) and 4 for LoRA (no weight gradients of the
  frozen base; adapters add 6 * N_adapters * T), N_body = the transformer blocks' Linear weights, T = batch * sequence
  tokens, T_head = the positions the LM head runs on (--head fused: batch * (response + 1); full: T).
  GFLOP/s = counted FLOPs / the fastest timed step (other processes only ever add time; the median is in the JSON);
  "% peak" divides that by the matmul peak (best window) of the same dtype.
- generate: `rlhf.ppo.sampler.KVSampler` against `model.generate` (do_sample, temperature 1, top_k 0, top_p 1, KV
  cache, the same left-padded batch of chat-template prompts from `rlhf/Review-v1`) for the full model and with LoRA
  adapters (peft), float32, the same torch seed before each side: (i) --gen-batch different prompts, (ii) --gen-batch /
  --group prompts x --group samples (a GRPO group: KVSampler prefills each prompt once, generate all rows), (iii) a
  3-turn episode batch: after each reply a short user message is appended as the chat template lays it out
  (`rlhf.models.chat_format.ChatFormat`, as the rollout does); KVSampler reads only the new tokens, generate re-reads the whole
  context every turn. Both sides generate exactly --new-tokens tokens per row and turn (KVSampler without a stop token,
  generate with min_new_tokens = max_new_tokens), so they do equal work: SmolLM2 rarely ends a reply within 32 tokens,
  and unequal lengths would measure the samples rather than the engines. `--stop-at-eos` stops both at eos instead
  and counts each side's generated tokens. tokens/s = generated tokens / wall time (prefill included) of the fastest of
  --repeats runs per side, run in alternating order (the same seed, so the same tokens every run).
- memory: peak RSS of a PPO run (`rlhf.ppo.trainer.PPOTrainer`, GAE) with policy, reference, critic and reward model
  all SmolLM2 (critic and reward model `AutoModelForSequenceClassification`, num_labels=1, fresh head), loaded as
  `rlhf.stages.ppo` loads them: with LoRA the reference is the policy with adapters disabled and the critic gets LoRA
  too; frozen models in `model.dtype`. --mem-updates updates of --mem-batch episodes x --mem-tokens response tokens,
  one minibatch, one epoch, review task.
- profile (with --profile): torch.profiler's top operators of one update step and of KVSampler decode steps.

Measure on an idle machine: with N threads on N cores one other busy process slows every parallel op, so each row
shows the 1-min load average when it was measured, and the timed rows their CPU share: this process's CPU time /
(wall time x threads), ~100% when its threads had the cores to themselves. On a busy machine `--threads 1` is the
steadier measurement (no thread waits at a barrier for a descheduled sibling).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the repository root on the path)
from common import ROOT, load_1min  # noqa: E402

ENV_ID = "rlhf/Review-v1"
FOLLOW_UPS = ("Tell me more about it.", "Now say that in fewer words.", "Thanks. Anything else?")
"""The user messages of the multi-turn scenario, one per later turn."""


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (VmHWM; MiB).

    Not `ru_maxrss` where /proc has VmHWM: Linux carries the spawning process's peak RSS over into a child's
    `ru_maxrss` (exec records the old address space's high-water mark, and subprocess's vfork shares the parent's),
    so a child started by a process holding 2.8 GB reports >= 2.8 GB whatever it uses itself.
    """
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now (VmRSS; MiB), or nan where /proc is missing."""
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else float("nan")


def default_model() -> Path:
    from rlhf.models.pretrained import RECIPES

    return ROOT / RECIPES["smollm2"].default_out


def smollm2_lora():
    """The LoRA settings of conf/model/smollm2.yaml as `rlhf.models.config.LoraConfig` (read, so they stay in sync)."""
    from omegaconf import OmegaConf

    from rlhf.models.config import LoraConfig

    lora = OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml").model.lora
    return LoraConfig(r=lora.r, alpha=lora.alpha, target_modules=list(lora.target_modules))


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_policy(path: Path, lora: bool):
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.lora import apply_lora

    model = load_causal_lm(path, "float32")
    return apply_lora(model, smollm2_lora()) if lora else model


def timed(
    fn: Callable[[], Any], seconds: float, min_runs: int, cpu: list[float] | None = None
) -> list[float]:
    """Run `fn` until `seconds` have passed and at least `min_runs` times; the wall time of each run (and, into
    `cpu` when given, this process's CPU time of each run)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        if cpu is not None:
            cpu.append(time.process_time() - c)
    return times


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """This process's CPU time / (wall time x torch threads): ~1 when its threads had the cores to themselves, lower
    when other processes took turns on them (the time is then inflated)."""
    import torch

    return cpu_s / max(wall_s * torch.get_num_threads(), 1e-9)


# ---------------------------------------------------------------------------------------------- a. peak


def matmul_peak(n: int, dtype_name: str, seconds: float, window: float = 1.0) -> dict[str, float]:
    """Sustained FLOP/s of (n, n) @ (n, n) in `dtype_name` over `seconds`, in windows of `window` seconds: the best
    window's rate (other processes only ever slow a window down) and the mean over all of them. One warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, pages
    load = load_1min()
    flops = 2 * n**3
    rates, shares, total_flops, start = [], [], 0, time.perf_counter()
    while len(rates) < 3 or time.perf_counter() - start < seconds:
        cpu: list[float] = []
        times = timed(lambda: torch.mm(a, b, out=out), window, 1, cpu)
        rates.append(flops * len(times) / sum(times))
        shares.append(cpu_share(sum(cpu), sum(times)))
        total_flops += flops * len(times)
    best = rates.index(max(rates))
    return {
        "dtype": dtype_name,
        "n": n,
        "gflops": rates[best] / 1e9,
        "mean_gflops": total_flops / (time.perf_counter() - start) / 1e9,
        "cpu_share": shares[best],
        "load": load,
    }


def copy_bandwidth(mib: int, seconds: float) -> dict[str, float]:
    """GB/s moved (read + written) by copying a `mib` MiB float32 tensor: the ceiling of a memory-bound op."""
    import torch

    a = torch.randn(mib * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    load = load_1min()
    times = timed(lambda: b.copy_(a), seconds, 3)
    return {"gbps": 2 * a.numel() * 4 / min(times) / 1e9, "load": load}  # the fastest copy


# ---------------------------------------------------------------------------------------------- b. update

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


def make_update_step(model, data: UpdateBatch, bf16: bool, head: str) -> Callable[[], None]:
    """One PPO minibatch step of the policy, as `PPOTrainer` does it for the policy (`_micro_loss` + the step of
    `_minibatch_step`, one micro-batch). head: fused (the trainer's path: the LM head applied a chunk of response
    tokens at a time by `rollout.response_logprobs`) | full (full (b, R, V) logits, the path without a plain head)."""
    import torch

    from rlhf.ppo.losses import policy_loss
    from rlhf.ppo.ops import masked_mean
    from rlhf.ppo.rollout import output_head, response_logprobs

    lm_head = output_head(model) if head == "fused" else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, eps=1e-5)
    Q = data.context_length

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logprobs, entropy = response_logprobs(
                model, data.query_responses, data.attention_mask, Q, 1.0, lm_head
            )  # (b, R), (b, R) float32
        loss, _ = policy_loss(logprobs, data.old_logprobs, data.advantages, data.action_mask, 0.2)
        masked_mean(entropy.detach(), data.action_mask)  # the trainer's statistic
        loss.backward()
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

    model = load_policy(args.model, lora=mode == "lora")
    model.eval()  # the trainer keeps dropout off
    data = make_update_batch(
        model.config.vocab_size, args.batch, args.prompt_len, args.response_len, args.seed
    )
    with torch.no_grad():  # old log-probabilities = the current ones: ratio 1, as the first epoch
        from rlhf.ppo.rollout import response_logprobs

        data.old_logprobs = response_logprobs(
            model, data.query_responses, data.attention_mask, data.context_length, 1.0, None
        )[0]
    step = make_update_step(model, data, bf16=dtype == "bfloat16", head=args.head)
    flops, per_op = count_flops(step)  # also the warm-up step
    load = load_1min()
    cpu: list[float] = []
    times = timed(step, args.seconds, args.min_steps, cpu)
    fastest = times.index(min(times))
    seconds = times[fastest]  # other processes on a shared machine only ever add time
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {
        "mode": mode,
        "dtype": dtype,
        "batch": args.batch,
        "seq": args.prompt_len + args.response_len,
        "tokens": args.batch * (args.prompt_len + args.response_len),
        "trainable_params": trainable,
        "step_s": seconds,
        "median_step_s": statistics.median(times),
        "cpu_share": cpu_share(cpu[fastest], seconds),
        "steps": len(times),
        "flops": flops,
        "model_flops": analytic_flops(
            model, args.batch, args.prompt_len, args.response_len, mode == "lora", args.head
        ),
        "head": args.head,
        "gflops": flops / seconds / 1e9,
        "flops_by_op": per_op,
        "load": load,
        "rss_mib": peak_rss_mib(),
    }
    del model, step
    return row


# ---------------------------------------------------------------------------------------------- c. generate


def review_prompts(tokenizer, n: int) -> list[list[int]]:
    """n chat-template prompts (user turn + generation prompt) of the review task, as the rollout builds them."""
    import envs
    from rlhf.models.chat_format import ChatFormat

    env = envs.make(ENV_ID)
    fmt = ChatFormat(tokenizer)
    return [fmt.prompt_ids(env.reset(seed=10_000 + i)[0]) for i in range(n)]


def follow_up_ids(tokenizer, turn: int, reply_ended: bool) -> list[int]:
    """The tokens after a reply in turn `turn`: [end of turn] + the next user message + the generation prompt."""
    from rlhf.models.chat_format import ChatFormat

    return ChatFormat(tokenizer).env_turn_ids(FOLLOW_UPS[turn % len(FOLLOW_UPS)], reply_ended=reply_ended)


def run_kvsampler(model, tokenizer, contexts, turns: int, new_tokens: int, stop_at_eos: bool, seed: int):
    """KVSampler on `contexts` for `turns` turns; returns (seconds, generated tokens, CPU seconds)."""
    import torch

    from rlhf.ppo.sampler import KVSampler

    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    sampler = KVSampler(
        model,
        temperature=1.0,
        stop_token_ids={eos} if stop_at_eos else None,
        pad_token_id=tokenizer.pad_token_id,
    )
    sampler.start(contexts)
    generated = 0
    for turn in range(turns):
        replies, _ = sampler.sample(new_tokens)
        generated += sum(len(r) for r in replies)
        if turn + 1 < turns:
            sampler.extend([follow_up_ids(tokenizer, turn, bool(r) and r[-1] == eos) for r in replies])
    return time.perf_counter() - start, generated, time.process_time() - cpu


def run_generate(model, tokenizer, contexts, turns: int, new_tokens: int, stop_at_eos: bool, seed: int):
    """`model.generate` on `contexts` (left-padded), the whole context again every turn; (seconds, generated tokens,
    CPU seconds)."""
    import torch

    from rlhf.ppo.rollout import left_pad

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    contexts = [list(c) for c in contexts]
    generated = 0
    for turn in range(turns):
        ids, mask = left_pad(contexts, pad)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=None if stop_at_eos else new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for context, row in zip(contexts, out[:, ids.shape[1] :].tolist()):
            reply = row[: row.index(eos) + 1] if stop_at_eos and eos in row else row
            generated += len(reply)
            if turn + 1 < turns:
                context += reply + follow_up_ids(tokenizer, turn, bool(reply) and reply[-1] == eos)
    return time.perf_counter() - start, generated, time.process_time() - cpu


def generation_scenarios(tokenizer, batch: int, group: int) -> list[tuple[str, list[list[int]], int]]:
    prompts = review_prompts(tokenizer, batch)
    grouped = [p for p in prompts[: batch // group] for _ in range(group)]
    return [
        (f"{batch} prompts", prompts, 1),
        (f"{batch // group} prompts x {group} samples", grouped, 1),
        (f"{batch} prompts, 3 turns", prompts, 3),
    ]


def generate_bench(args) -> list[dict[str, Any]]:
    import torch

    from rlhf.models.loading import load_tokenizer as load_tok
    from rlhf.models.lora import apply_lora

    tokenizer = load_tok(args.model)
    model = load_policy(args.model, lora=False).eval()
    scenarios = generation_scenarios(tokenizer, args.gen_batch, args.group)
    rows = []
    for weights, precision in itertools.product(("full", "lora"), args.gen_precisions):
        if weights == "lora" and not hasattr(model, "get_base_model"):
            model = apply_lora(model, smollm2_lora()).eval()
        # float32 weights either way; bf16: both sides run under bf16 autocast, as the PPO rollout does under
        # mixed precision (model.dtype=bfloat16)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
        with autocast:
            # warm-up of both engines (first-call costs: kernel selection, allocations)
            for engine in (run_kvsampler, run_generate):
                engine(model, tokenizer, scenarios[0][1][:2], 1, 2, False, args.seed)
        for name, contexts, turns in scenarios:
            load = load_1min()
            row: dict[str, Any] = {
                "weights": weights,
                "precision": precision,
                "scenario": name,
                "turns": turns,
                "load": load,
            }
            sides = {"generate": run_generate, "kvsampler": run_kvsampler}
            runs: dict[str, list[tuple[float, int, float]]] = {side: [] for side in sides}
            for r in range(args.repeats):  # alternating order: generate first, then KVSampler first, ...
                for side in list(sides)[:: 1 if r % 2 == 0 else -1]:
                    with autocast:
                        runs[side].append(
                            sides[side](
                                model,
                                tokenizer,
                                contexts,
                                turns,
                                args.new_tokens,
                                args.stop_at_eos,
                                args.seed,
                            )
                        )
            for side, results in runs.items():
                seconds, generated, cpu = min(results)  # the same seed: the same tokens every repeat
                row[f"{side}_s"], row[f"{side}_tokens"] = seconds, generated
                row[f"{side}_tok_s"] = generated / seconds
                row[f"{side}_cpu_share"] = cpu_share(cpu, seconds)
                row[f"{side}_all_s"] = [t for t, _, _ in results]
            row["ratio"] = row["kvsampler_tok_s"] / row["generate_tok_s"]
            row["context_tokens"] = sum(len(c) for c in contexts)
            row["load_after"] = load_1min()
            rows.append(row)
            print(
                f"  {weights:4s} {precision:13s} {name:28s} generate {row['generate_tok_s']:6.1f} tok/s, "
                f"KVSampler {row['kvsampler_tok_s']:6.1f} tok/s, x{row['ratio']:.2f} (load {load:.1f})",
                file=sys.stderr,
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------------------------------- memory

MEMORY_CONFIGS = {
    "full float32": {"lora": False, "dtype": "float32"},
    "LoRA float32": {"lora": True, "dtype": "float32"},
    "full bf16": {"lora": False, "dtype": "bfloat16"},
    "LoRA bf16 (model=smollm2)": {"lora": True, "dtype": "bfloat16"},
}
"""dtype: `model.dtype` (bfloat16: frozen models stored in bf16, trained ones float32 under bf16 autocast)."""


def memory_child(args) -> dict[str, Any]:
    """One PPO run (GAE: policy, reference, critic, reward model) in this process; its peak RSS and timings."""
    import torch
    from accelerate import Accelerator

    import envs
    from rlhf.config import PPOConfig
    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.ppo.trainer import PPOTrainer

    conf = MEMORY_CONFIGS[args.memory_child]
    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rss_start = current_rss_mib()
    lora = smollm2_lora() if conf["lora"] else None
    dtype = conf["dtype"]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    policy = load_causal_lm(args.model, "float32", lora=lora)
    reference = None if lora else load_causal_lm(args.model, dtype)  # with LoRA: the adapter-disabled policy
    reward_model = load_reward_model(args.model, dtype)
    critic = load_reward_model(args.model, "float32", lora=lora)
    load_s = time.perf_counter() - t0
    import gc

    gc.collect()
    rss_loaded, peak_loading = current_rss_mib(), peak_rss_mib()
    cfg = PPOConfig(
        advantage="gae",
        reward_source="model",
        batch_size=args.mem_batch,
        # one more update than run: the trainer checkpoints after its last update
        total_episodes=(args.mem_updates + 1) * args.mem_batch,
        response_length=args.mem_tokens,
        num_ppo_epochs=1,
        num_mini_batches=1,
        forward_batch_size=args.mem_batch,
        save_every=0,
        samples_every=0,
        console_every=0,
        resume=False,
    )
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if dtype == "bfloat16" else "no")
    with tempfile.TemporaryDirectory(prefix="real_model_mem_") as tmp:
        trainer = PPOTrainer(
            cfg,
            policy,
            tokenizer,
            lambda: envs.make(ENV_ID),
            output_dir=tmp,
            ref_policy=reference,
            reward_model=reward_model,
            critic=critic,
            accelerator=accelerator,
            seed=args.seed,
        )
        times, phases = [], []
        for _ in range(args.mem_updates):
            t = time.perf_counter()
            metrics = trainer.train(max_updates=1)
            times.append(time.perf_counter() - t)
            phases.append({k: v for k, v in metrics.items() if k.startswith("time/")})
    return {
        "config": args.memory_child,
        "lora": conf["lora"],
        "dtype": dtype,
        "rss_start_mib": rss_start,
        "rss_loaded_mib": rss_loaded,
        "peak_rss_loading_mib": peak_loading,
        "rss_end_mib": current_rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
        "load_s": load_s,
        "update_s": times,
        "phases_s": phases[-1],
        "response_length": metrics.get("rollout/response_length"),
    }


def memory_bench(args) -> list[dict[str, Any]]:
    rows = []
    for name in args.mem_configs:
        cmd = [sys.executable, __file__, "--memory-child", name, "--model", str(args.model)]
        cmd += ["--threads", str(args.threads), "--seed", str(args.seed), "--mem-batch", str(args.mem_batch)]
        cmd += ["--mem-tokens", str(args.mem_tokens), "--mem-updates", str(args.mem_updates)]
        load = load_1min()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            rows.append({"config": name, "error": proc.stderr[-2000:], "load": load})
            print(f"  memory {name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
            continue
        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "load": load}
        rows.append(row)
        print(
            f"  memory {name}: peak {row['peak_rss_mib']:.0f} MiB (load {load:.1f})",
            file=sys.stderr,
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- profile


def top_ops(prof, limit: int) -> list[tuple[str, float, float]]:
    """(operator, self CPU s, share of the total self CPU time), the `limit` largest."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events[:limit]]


MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::_weight_int4pack_mm",
)


def matmul_share(prof) -> float:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def profile_bench(args) -> dict[str, Any]:
    """Where one update step (full and LoRA, float32) and KVSampler's decode steps spend their time."""
    from torch.profiler import ProfilerActivity, profile

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

    from rlhf.models.loading import load_tokenizer as load_tok

    tokenizer = load_tok(args.model)
    prompts = review_prompts(tokenizer, args.gen_batch)
    for weights in ("full", "lora"):
        model = load_policy(args.model, lora=weights == "lora").eval()
        sampler = KVSampler(model, temperature=1.0, stop_token_ids=None, pad_token_id=tokenizer.pad_token_id)
        sampler.start(prompts)
        sampler.sample(3)  # warm-up
        steps = max(3, args.new_tokens // 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            sampler.sample(steps)  # steps - 1 forward passes: the first token comes from the cached logits
            seconds = time.perf_counter() - start
        step_s = seconds / (steps - 1)
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


# ---------------------------------------------------------------------------------------------- report


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
                    f"| {r['config']} | FAILED: {r['error'].strip().splitlines()[-1]} | | | | | | {r['load']:.1f} |"
                )
                continue
            per_update = statistics.median(r["update_s"])
            print(
                f"| {r['config']} | {r['rss_start_mib']:.0f} | {r['rss_loaded_mib']:.0f} | "
                f"{r['peak_rss_loading_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['load_s']:.0f} | "
                f"{per_update:.1f} | {r['load']:.1f} |"
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
    print(f"\ncommand: {common.command_line('real_model.py')}")
    return key


SECTIONS = ("peak", "update", "generate", "memory", "profile")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", type=Path, default=None, help="SmolLM2 directory (default: models/SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=None, help="sections (default: all but profile)"
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
    p.add_argument("--mem-configs", nargs="+", choices=list(MEMORY_CONFIGS), default=list(MEMORY_CONFIGS))
    p.add_argument("--profile-rows", type=int, default=12)
    p.add_argument(
        "--smoke", action="store_true", help="tiny shapes and windows: checks that everything runs"
    )
    p.add_argument("--json", type=Path, default=None, help="write the key numbers (and every row) here")
    p.add_argument("--memory-child", choices=sorted(MEMORY_CONFIGS), help=argparse.SUPPRESS)
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
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    import torch

    from rlhf.models.pretrained import is_complete

    if not is_complete(args.model):
        sys.exit(f"no model at {args.model}: run `make smollm2` first")
    quiet_transformers()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    sections = args.only or [s for s in SECTIONS if s != "profile"]
    if args.profile and "profile" not in sections:
        sections.append("profile")
    results: dict[str, Any] = {}
    print(
        f"SmolLM2 benchmarks: {args.model}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        file=sys.stderr,
    )
    if "peak" in sections:
        results["peak"] = [matmul_peak(args.matmul_n, d, args.peak_seconds) for d in ("float32", "bfloat16")]
        results["bandwidth"] = copy_bandwidth(64 if args.smoke else 256, args.peak_seconds)
    if "update" in sections:
        results["update"] = []
        for mode in ("full", "lora"):
            for dtype in ("float32", "bfloat16"):
                row = update_bench(args, mode, dtype)
                results["update"].append(row)
                print(
                    f"  update {mode} {dtype}: {row['step_s']:.2f} s/step, {row['gflops']:.1f} GFLOP/s "
                    f"(load {row['load']:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
    if "generate" in sections:
        results["generate"] = generate_bench(args)
    if "memory" in sections:
        results["memory"] = memory_bench(args)
    if "profile" in sections:
        results["profile"] = profile_bench(args)
    key = print_tables(results, args)
    if args.json:
        common.write_results(args.json, "real_model.py", key, results)


if __name__ == "__main__":
    main()
