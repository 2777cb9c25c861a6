"""Evaluate stage: the SFT and PPO policies on held-out environment episodes, side by side.

For each policy available (`sft` and `ppo`, from upstream or from `ppo.policy_path`),
`evaluate.num_prompts` episodes with seeds disjoint from PPO's training seeds report:

    <policy>/gold_reward      the environment's reward (ground truth), mean per episode
    <policy>/proxy_reward     the reward model's score (what PPO may have optimised), when a reward model exists
    <policy>/kl               KL(policy || reference) per episode (sum over the reply tokens, k1 estimate on its own
                              samples; the reference is the SFT policy), 0 for the SFT policy itself
    <policy>/response_length  policy tokens per episode
    <policy>/success_rate     share of successful episodes, for environments that report `info["success"]`
    <policy>/reward/<name>    each component of the task's reward rubric (`rlhf.rewards`), weight 0 included

plus `gold_reward_gain` = ppo - sft. Both policies play the same episodes (same seeds) with the same sampling
seed. A short before/after table goes to the console; a samples table to W&B; everything to `eval.json`.
"""

from __future__ import annotations

import json
import logging

import torch
from accelerate import PartialState

from rlhf.config import RLHFConfig
from rlhf.models.loading import (
    check_tokenizers_match,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_device,
)
from rlhf.models.tokenizer import stop_token_ids
from rlhf.ppo.seeds import EVAL_SEED_OFFSET
from rlhf.rewards import Component, Episodes, component_values
from rlhf.rewards.reward_model import RewardScorer
from rlhf.stages.base import StageContext, StageResult, upstream_model
from rlhf.task import environment as task

log = logging.getLogger("rlhf")

POLICIES = ("sft", "ppo")


def run(cfg: RLHFConfig, ctx: StageContext) -> StageResult:
    e = cfg.evaluate
    paths = {
        "sft": upstream_model(ctx, cfg.ppo.policy_path, "sft", "evaluate", None),
        "ppo": upstream_model(ctx, None, "ppo", "evaluate", None),
    }
    paths = {name: path for name, path in paths.items() if path is not None}
    if not paths:
        raise ValueError(
            "nothing to evaluate: run the sft and/or ppo stage first, or set ppo.policy_path=<model dir>"
        )
    reward_path = upstream_model(ctx, cfg.ppo.reward_model_path, "reward", "evaluate", None)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(next(iter(paths.values())))
    scorer = None
    if reward_path is not None:
        reward_model = load_reward_model(reward_path, cfg.model.dtype).to(device).eval()
        scorer = RewardScorer(
            reward_model, load_tokenizer(reward_path), tokenizer, cfg.ppo.forward_batch_size
        )
    reference = (
        load_causal_lm(paths.get("sft", next(iter(paths.values()))), cfg.model.dtype).to(device).eval()
    )
    rubric = task.rubric(cfg)
    if scorer is None:  # no reward model to evaluate with: its component is left out
        rubric = [c for c in rubric if c.kind != "model"]
    envs = [task.make_env(cfg) for _ in range(min(e.batch_size, e.num_prompts))]
    seeds = [EVAL_SEED_OFFSET + i for i in range(e.num_prompts)]

    metrics: dict[str, float] = {}
    samples: list[list] = []
    for name, path in paths.items():
        check_tokenizers_match(tokenizer, load_tokenizer(path), f"evaluate: {name} policy {path}")
        policy = reference if name == "sft" else load_causal_lm(path, cfg.model.dtype).to(device)
        torch.manual_seed(ctx.seed)  # the same sampling noise for every policy
        result = evaluate_policy(cfg, policy.eval(), reference, scorer, tokenizer, envs, seeds, rubric)
        metrics.update({f"{name}/{k}": v for k, v in result.pop("metrics").items()})
        samples += [[name, *row] for row in result["rows"][: e.num_samples]]
    if "sft/gold_reward" in metrics and "ppo/gold_reward" in metrics:
        metrics["gold_reward_gain"] = metrics["ppo/gold_reward"] - metrics["sft/gold_reward"]

    if not PartialState().is_main_process:  # under torchrun every process evaluates; one reports
        return StageResult(artifact=ctx.output_dir, metrics=metrics)
    table = format_table(metrics)
    log.info("[evaluate] %d held-out episodes of %s\n%s", e.num_prompts, cfg.task.env_id, table)
    ctx.tracker.log(metrics, step=0)
    ctx.tracker.log_table("evaluate/samples", ["policy", "query", "response", "gold", "proxy"], samples)
    (ctx.output_dir / "eval.json").write_text(
        json.dumps(
            {"metrics": metrics, "paths": paths, "reward_model": reward_path, "samples": samples}, indent=1
        )
    )
    return StageResult(artifact=ctx.output_dir, metrics=metrics)


@torch.no_grad()
def evaluate_policy(
    cfg: RLHFConfig, policy, reference, scorer, tokenizer, envs, seeds, rubric: list[Component] = ()
) -> dict:
    """Play every seed once with `policy`; gold, proxy, KL to `reference`, lengths, the rubric's components,
    sample rows."""
    from rlhf.ppo.rollout import rollout, sequence_logprobs

    e = cfg.evaluate
    stop = stop_token_ids(tokenizer, cfg.ppo.stop_token, getattr(policy, "generation_config", None))
    temperature = e.temperature if e.temperature > 0 else 1.0
    gold, proxy, kl, length, success, rows = [], [], [], [], [], []
    components: dict[str, list[torch.Tensor]] = {c.name: [] for c in rubric}
    for start in range(0, len(seeds), len(envs)):
        batch_seeds = seeds[start : start + len(envs)]
        ro = rollout(
            policy,
            tokenizer,
            envs[: len(batch_seeds)],
            batch_seeds,
            response_length=cfg.ppo.response_length,
            temperature=e.temperature,
            stop_token_ids=stop,
        )
        ref = sequence_logprobs(  # the SFT policy's KL to itself is 0 up to float rounding
            reference,
            ro.query_responses,
            ro.attention_mask,
            ro.context_length,
            temperature,
            cfg.ppo.forward_batch_size,
        )
        kl.append(torch.where(ro.action_mask, ro.logprobs - ref, 0.0).sum(1))
        gold.append(ro.env_rewards)
        length.append(ro.response_lengths.float())
        success += [float(info["success"]) for info in ro.infos if "success" in info]
        scores = torch.full((len(ro),), float("nan"))
        if scorer is not None:
            scores = scorer.score(ro).cpu()
            proxy.append(scores)
        episodes = Episodes(
            prompts=ro.queries,
            completions=["\n".join(replies) for replies in ro.replies],
            infos=ro.infos,
            env_rewards=ro.env_rewards.cpu(),
            lengths=ro.response_lengths.cpu(),
            model_scores=scores if scorer is not None else None,
        )
        for name, values in component_values(rubric, episodes).items():
            components[name].append(values)
        rows += [
            [q, t, g, s]
            for q, t, g, s in zip(ro.queries, ro.transcripts, ro.env_rewards.tolist(), scores.tolist())
        ]
    metrics = {
        "gold_reward": torch.cat(gold).mean().item(),
        "kl": torch.cat(kl).mean().item(),
        "response_length": torch.cat(length).mean().item(),
    }
    if proxy:
        metrics["proxy_reward"] = torch.cat(proxy).mean().item()
    if len(success) == len(seeds):
        metrics["success_rate"] = sum(success) / len(success)
    metrics |= {f"reward/{name}": torch.cat(values).mean().item() for name, values in components.items()}
    return {"metrics": metrics, "rows": rows}


def format_table(metrics: dict[str, float]) -> str:
    """A markdown before/after table: one row per quantity, one column per policy."""
    names = [n for n in POLICIES if any(k.startswith(f"{n}/") for k in metrics)]
    quantities = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics if "/" in k))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for q in quantities:
        cells = [f"{metrics[f'{n}/{q}']:.4f}" if f"{n}/{q}" in metrics else "" for n in names]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    if "gold_reward_gain" in metrics:
        lines.append(f"| gold_reward_gain | {'':s} | {metrics['gold_reward_gain']:+.4f} |")
    return "\n".join(lines)
