"""SFT stage: TRL's SFTTrainer on the task's demonstrations (or the user's dataset) from the base model.

Writes a `save_pretrained` directory (model + tokenizer, LoRA merged) at `ctx.output_dir`, logs train and eval
loss per logged step, and a table of a few sampled completions with their gold reward.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from datasets import Dataset

from rlhf.config import RLHFConfig
from rlhf.models.chat_format import ChatFormat, single_text
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.lora import merge_lora
from rlhf.stages.base import StageContext, StageResult
from rlhf.stages.trl_common import final_eval, replace_progress, trainer_arguments

log = logging.getLogger("rlhf")

NUM_SAMPLES = 8
"""Rows in the samples table."""
SAMPLE_TOKENS = 32
"""Most new tokens per sampled completion."""


def base_model_path(ctx: StageContext) -> Path | str:
    """The base model the pipeline prepared (tiny model dir or `model.name_or_path`)."""
    if "base" not in ctx.upstream:
        raise ValueError("the sft stage needs the base model; run it through rlhf.run.pipeline.run")
    return ctx.upstream["base"].artifact


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int = SAMPLE_TOKENS, seed: int = 0
) -> list[str]:
    """Sample one completion per prompt (temperature 1, as PPO samples), prompted exactly as rollouts prompt."""
    fmt = ChatFormat(tokenizer)
    was_training = model.training
    model.eval()
    batch = tokenizer.pad(
        [{"input_ids": fmt.prompt_ids(p)} for p in prompts], padding_side="left", return_tensors="pt"
    ).to(model.device)
    torch.manual_seed(seed)
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    new = out[:, batch["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def sample_rows(
    cfg: RLHFConfig, model, tokenizer, data: Dataset, seed: int
) -> tuple[list[list], float | None]:
    """(prompt, completion, gold reward) rows for the samples table, and the mean gold reward (None without one)."""
    if "prompt" in data.column_names:
        prompts = [single_text(p) for p in data["prompt"][:NUM_SAMPLES]]
    elif "messages" in data.column_names:
        prompts = [str(m[0]["content"]) for m in data["messages"][:NUM_SAMPLES]]
    else:
        return [], None
    if any(p is None for p in prompts):
        return [], None
    completions = generate(model, tokenizer, prompts, seed=seed)
    gold_cls = None
    if not cfg.sft.dataset:
        from envs import env_class

        gold_cls = env_class(cfg.task.env_id)
    rows = []
    single_turn = "messages" not in data.column_names
    for prompt, completion in zip(prompts, completions):
        rows.append([prompt, completion, _gold(gold_cls, prompt, completion) if single_turn else None])
    golds = [r[2] for r in rows if r[2] is not None]
    return rows, (sum(golds) / len(golds) if golds else None)


def run(cfg: RLHFConfig, ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import has_generation_markers

    from rlhf.task.data import sft_splits

    base = base_model_path(ctx)
    tokenizer = load_tokenizer(base)
    train, evals = sft_splits(cfg, ctx.seed, chat=ChatFormat(tokenizer).is_chat)
    model = load_causal_lm(base, "float32", cfg.model.lora)
    conversational = "messages" in train.column_names
    args = SFTConfig(
        **trainer_arguments(cfg, ctx, cfg.sft, has_eval=evals is not None),
        packing=False,
        assistant_only_loss=conversational and has_generation_markers(tokenizer.chat_template or ""),
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    replace_progress(trainer, "sft")
    log.info(
        "[sft] %d train / %d eval examples, %d optimizer steps", len(train), len(evals or []), _steps(trainer)
    )

    metrics: dict[str, float] = {}
    if evals is not None:
        metrics["eval/loss_before"] = trainer.evaluate()["eval_loss"]
    out = trainer.train()
    metrics["train/loss"] = out.training_loss
    if evals is not None:
        metrics["eval/loss"] = final_eval(trainer)["eval_loss"]

    model = merge_lora(trainer.model)
    rows, gold = sample_rows(cfg, model, tokenizer, evals if evals is not None else train, ctx.seed)
    if rows:
        ctx.tracker.log_table("samples", ["prompt", "completion", "gold_reward"], rows)
    if gold is not None:
        metrics["samples/gold_reward"] = gold

    model.save_pretrained(ctx.output_dir)
    tokenizer.save_pretrained(ctx.output_dir)
    shutil.rmtree(ctx.output_dir / "trainer", ignore_errors=True)
    return StageResult(artifact=ctx.output_dir, metrics=metrics)


def _gold(env_cls, prompt: str, completion: str) -> float | None:
    """The task's gold reward of a single-turn sample; None for environments without one."""
    if env_cls is None:
        return None
    try:
        return env_cls.gold_reward(prompt, completion)
    except NotImplementedError:  # a user's environment need not define an offline gold reward
        return None


def _steps(trainer) -> int:
    """Optimizer steps the trainer will take (for the console)."""
    import math

    per_epoch = math.ceil(len(trainer.train_dataset) / trainer.args.per_device_train_batch_size)
    return math.ceil(per_epoch * trainer.args.num_train_epochs)
