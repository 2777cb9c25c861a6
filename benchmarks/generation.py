"""generate (a section of benchmarks/real_model.py): `rlhf.ppo.sampler.KVSampler` against `model.generate`
(do_sample, temperature 1, top_k 0, top_p 1, KV cache, the same left-padded batch of chat-template prompts from
`rlhf/Review-v1`) for the full model and with LoRA adapters (peft), float32, the same torch seed before each
side: (i) --gen-batch different prompts, (ii) --gen-batch / --group prompts x --group samples (a GRPO group:
KVSampler prefills each prompt once, generate all rows), (iii) a 3-turn episode batch: after each reply a short
user message is appended as the chat template lays it out (`rlhf.models.chat_format.ChatFormat`, as the rollout
does); KVSampler reads only the new tokens, generate re-reads the whole context every turn. Both sides generate
exactly --new-tokens tokens per row and turn (KVSampler without a stop token, generate with min_new_tokens =
max_new_tokens), so they do equal work: SmolLM2 rarely ends a reply within 32 tokens, and unequal lengths would
measure the samples rather than the engines. `--stop-at-eos` stops both at eos instead and counts each side's
generated tokens. tokens/s = generated tokens / wall time (prefill included) of the fastest of --repeats runs per
side, run in alternating order (the same seed, so the same tokens every run).
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

from measure import Lap, cpu_share, load_1min, timed
from smollm2_model import load_policy, review_prompts, smollm2_lora

FOLLOW_UPS = ("Tell me more about it.", "Now say that in fewer words.", "Thanks. Anything else?")
"""The user messages of the multi-turn scenario, one per later turn."""


def follow_up_ids(tokenizer, turn: int, reply_ended: bool) -> list[int]:
    """The tokens after a reply in turn `turn`: [end of turn] + the next user message + the generation prompt."""
    from rlhf.models.chat_format import ChatFormat

    return ChatFormat(tokenizer).env_turn_ids(FOLLOW_UPS[turn % len(FOLLOW_UPS)], reply_ended=reply_ended)


def run_kvsampler(model, tokenizer, contexts, turns: int, new_tokens: int, stop_at_eos: bool) -> int:
    """KVSampler on `contexts` for `turns` turns; returns the generated tokens."""
    from rlhf.ppo.sampler import KVSampler

    eos = tokenizer.eos_token_id
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
    return generated


def run_generate(model, tokenizer, contexts, turns: int, new_tokens: int, stop_at_eos: bool) -> int:
    """`model.generate` on `contexts` (left-padded), the whole context again every turn; returns the generated
    tokens."""
    import torch

    from rlhf.ppo.rollout import left_pad

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
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
    return generated


def seeded_run(
    engine, model, tokenizer, contexts, turns: int, new_tokens: int, stop_at_eos: bool, seed: int
) -> Lap:
    """One timed run of `engine` after `torch.manual_seed(seed)`; its Lap's value is the generated tokens."""
    import torch

    torch.manual_seed(seed)
    return timed(lambda: engine(model, tokenizer, contexts, turns, new_tokens, stop_at_eos))[0]


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

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.lora import apply_lora

    tokenizer = load_tokenizer(args.model)
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
                seeded_run(engine, model, tokenizer, scenarios[0][1][:2], 1, 2, False, args.seed)
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
            runs: dict[str, list[Lap]] = {side: [] for side in sides}
            for r in range(args.repeats):  # alternating order: generate first, then KVSampler first, ...
                for side in list(sides)[:: 1 if r % 2 == 0 else -1]:
                    with autocast:
                        runs[side].append(
                            seeded_run(
                                sides[side],
                                model,
                                tokenizer,
                                contexts,
                                turns,
                                args.new_tokens,
                                args.stop_at_eos,
                                args.seed,
                            )
                        )
            for side, laps in runs.items():
                fastest = min(laps, key=lambda lap: lap.wall_s)  # the same seed: the same tokens every repeat
                row[f"{side}_s"], row[f"{side}_tokens"] = fastest.wall_s, fastest.value
                row[f"{side}_tok_s"] = fastest.value / fastest.wall_s
                row[f"{side}_cpu_share"] = cpu_share(fastest.cpu_s, fastest.wall_s)
                row[f"{side}_all_s"] = [lap.wall_s for lap in laps]
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
