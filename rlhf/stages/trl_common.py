"""What the SFT and reward stages share: both train with a TRL trainer on `accelerate`, set up the same way."""

from __future__ import annotations

from typing import Any

from rlhf.config import RLHFConfig
from rlhf.models.loading import resolve_device
from rlhf.stages.base import StageContext
from rlhf.tracking.console import progress_callback


def trainer_arguments(cfg: RLHFConfig, ctx: StageContext, stage_cfg: Any, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments shared by the SFT and reward stages, every CPU-relevant default set deliberately.

    TRL defaults that hurt here: bf16 on (set from `model.dtype` instead), gradient checkpointing on (slower for
    small models), checkpoint saving every 500 steps (the stage saves its final model itself).
    """
    device = resolve_device(cfg.device)
    return dict(
        output_dir=str(ctx.output_dir / "trainer"),
        learning_rate=stage_cfg.learning_rate,
        num_train_epochs=stage_cfg.num_train_epochs,
        per_device_train_batch_size=stage_cfg.per_device_train_batch_size,
        per_device_eval_batch_size=max(stage_cfg.per_device_train_batch_size, 64),
        max_length=stage_cfg.max_length,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=stage_cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
        report_to=ctx.tracker.report_to,
        run_name=ctx.output_dir.name,
        use_cpu=device.type == "cpu",
        bf16=cfg.model.dtype == "bfloat16",
        fp16=cfg.model.dtype == "float16",
        activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing (TRL defaults it on)
        seed=ctx.seed,
        data_seed=ctx.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=False,
    )


def replace_progress(trainer, stage: str) -> None:
    """Swap transformers' dict-printing progress callback for a named bar plus one compact `logging` line per logged
    step (`rlhf.tracking.console.progress_callback`); W&B still gets every metric through transformers' WandbCallback."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_callback(stage))


def final_eval(trainer) -> dict[str, float]:
    """The evaluation at the last step: reused from the trainer's log when the schedule ended on one."""
    for entry in reversed(trainer.state.log_history):
        if "eval_loss" in entry:
            if entry.get("step") == trainer.state.global_step:
                return entry
            break
    return trainer.evaluate()
