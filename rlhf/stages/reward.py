"""Reward stage: TRL's RewardTrainer on preference pairs, backbone from the SFT model, one scalar head.

Writes a `save_pretrained` directory (AutoModelForSequenceClassification with num_labels=1 and
`config.pad_token_id` set, plus the tokenizer) at `ctx.output_dir` and reports held-out pairwise accuracy
(the fraction of eval pairs where the chosen response scores higher) as `eval/accuracy`. Labels of the built-in
tasks carry Bradley-Terry noise, so `eval/accuracy` is capped by the task's label ceiling;
`eval/gold_accuracy` (agreement with the gold reward's ordering) is not, and shows what the model really learned.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from rlhf.config import RLHFConfig
from rlhf.models.chat_format import ChatFormat, single_text
from rlhf.models.loading import load_reward_model, load_tokenizer
from rlhf.models.lora import merge_lora
from rlhf.stages.base import StageContext, StageResult
from rlhf.stages.trl_common import final_eval, replace_progress, trainer_arguments

log = logging.getLogger("rlhf")


def backbone_path(cfg: RLHFConfig, ctx: StageContext) -> Path | str:
    """`reward.init_from`, else the SFT stage's output, else (no SFT in this run) the base model."""
    if cfg.reward.init_from:
        return cfg.reward.init_from
    if "sft" in ctx.upstream:
        return ctx.upstream["sft"].artifact
    if "base" in ctx.upstream:
        log.warning(
            "[reward] no SFT stage in this run and reward.init_from unset: starting from the base model"
        )
        return ctx.upstream["base"].artifact
    raise ValueError(
        "the reward stage needs a backbone: set reward.init_from=<model dir> or run the sft stage first"
    )


@torch.no_grad()
def pair_margins(model, dataset: Dataset, pad_token_id: int, batch_size: int = 64) -> list[float]:
    """score(chosen) - score(rejected) for every pair of a tokenized preference dataset (`chosen_ids` /
    `rejected_ids`), in order. Exact per pair, where TRL's logged eval accuracy averages per-batch means."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    margins: list[float] = []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate([{"chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]} for r in rows])
        logits = model(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
        ).logits.squeeze(-1)
        chosen, rejected = logits.float().chunk(2)
        margins += (chosen - rejected).tolist()
    model.train(was_training)
    return margins


def gold_accuracy(cfg: RLHFConfig, pairs: Dataset, margins: list[float]) -> float | None:
    """How often the reward model orders a held-out pair as the task's gold reward does (ties skipped).

    Unlike `eval/accuracy`, which is capped by the label noise, this can reach 1: it shows whether the model
    learned the gold reward rather than the noise. None for a user's dataset or a dialogue task.
    """
    if cfg.reward.dataset or "prompt" not in pairs.column_names:
        return None
    texts = [[single_text(row[k]) for k in ("prompt", "chosen", "rejected")] for row in pairs]
    if any(t is None for row in texts for t in row):
        return None  # dialogues: no single-turn gold
    from envs import env_class

    gold = env_class(cfg.task.env_id).gold_reward
    hits = total = 0
    for (prompt, chosen, rejected), margin in zip(texts, margins):
        gap = gold(prompt, chosen) - gold(prompt, rejected)
        if gap != 0:
            hits += (gap > 0) == (margin > 0)
            total += 1
    return hits / total if total else None


def log_pair_samples(ctx: StageContext, pairs: Dataset, margins: list[float], n: int = 8) -> None:
    """A samples table of held-out pairs with the trained model's score margin (> 0: chosen ranked higher)."""
    rows = [
        [str(row["prompt"]), str(row["chosen"]), str(row["rejected"]), margin]
        for row, margin in zip(pairs.select(range(min(n, len(pairs)))), margins)
    ]
    ctx.tracker.log_table("samples", ["prompt", "chosen", "rejected", "score_margin"], rows)


def run(cfg: RLHFConfig, ctx: StageContext) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    from rlhf.task.data import preference_splits

    backbone = backbone_path(cfg, ctx)
    tokenizer = load_tokenizer(backbone)
    train, evals = preference_splits(cfg, ctx.seed, chat=ChatFormat(tokenizer).is_chat)
    model = load_reward_model(backbone, "float32", cfg.model.lora)
    args = RewardConfig(
        **trainer_arguments(cfg, ctx, cfg.reward, has_eval=evals is not None),
        center_rewards_coefficient=None,
    )
    trainer = RewardTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    replace_progress(trainer, "reward")
    log.info("[reward] %d train / %d eval pairs from %s", len(train), len(evals or []), backbone)

    out = trainer.train()
    metrics: dict[str, float] = {"train/loss": out.training_loss}
    if evals is not None:
        ev = final_eval(trainer)
        metrics["eval/loss"] = ev["eval_loss"]
        margins = pair_margins(trainer.model, trainer.eval_dataset, tokenizer.pad_token_id)
        metrics["eval/accuracy"] = sum(m > 0 for m in margins) / len(margins)
        metrics["eval/margin"] = sum(margins) / len(margins)
        if len(trainer.eval_dataset) == len(evals):  # no pair was filtered out for length: rows still align
            gold = gold_accuracy(cfg, evals, margins)
            if gold is not None:
                metrics["eval/gold_accuracy"] = gold
            log_pair_samples(ctx, evals, margins)
        final = {
            k: v for k, v in metrics.items() if k in ("eval/accuracy", "eval/margin", "eval/gold_accuracy")
        }
        ctx.tracker.log(final, step=trainer.state.global_step)

    model = merge_lora(trainer.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(ctx.output_dir)
    tokenizer.save_pretrained(ctx.output_dir)
    shutil.rmtree(ctx.output_dir / "trainer", ignore_errors=True)
    return StageResult(artifact=ctx.output_dir, metrics=metrics)
