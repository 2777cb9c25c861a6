"""The console: a progress bar per training stage and a compact line every few steps with the metrics a person
watches. Every metric still goes to history.jsonl and W&B (`rlhf.tracking.wandb_run`); the console shows a handful.

- `ppo_line` / `trl_line`: `[ppo] update 10/64 | env/gold=0.51 | ...` with only the watched metrics.
- `progress(desc, ...)`: a tqdm bar, named `job 3 ppo` in a sweep. Creating one routes the console log handlers
  through tqdm (`route_console_logs`), so a log line prints above the bar instead of tearing it: Hydra's console
  handler writes to stdout and tqdm to stderr, and both land on the same terminal line.
- `set_job(num)`: in a sweep (Hydra multirun, joblib or submitit launchers) every console line starts with
  `[job N] `, so the interleaved output of parallel jobs says which job each line comes from.
- `progress_callback(stage)`: the same for the SFT and reward stages' transformers Trainer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

log = logging.getLogger("rlhf")

PPO_WATCHED = ("env/gold", "objective/scores", "objective/kl", "rollout/response_length")
"""PPO's console metrics, in this order: the gold (environment) reward, the score PPO maximises, the KL to the
reference it pays for it, the reply length; then every rubric component `reward/<name>` and `eps` (episodes per
second). Gold flat while the score climbs is reward over-optimisation, visible at a glance."""

TRL_WATCHED = ("loss", "accuracy", "margin", "mean_token_accuracy", "train_loss")
"""The SFT and reward stages' console metrics (train/ and eval/ keys ending in one of these): loss, and token
accuracy (SFT) or pair accuracy and reward margin (reward model)."""

_job: int | None = None
"""This process's job number in a sweep; None in a single run."""


def set_job(num: int | None) -> None:
    """This process runs sweep job `num` (None: a single run): console lines start with `[job N] ` and bars are
    named `job N <stage>` from now on. Call it once Hydra has configured logging (the pipeline's start)."""
    global _job
    _job = num
    route_console_logs()


def job_prefix() -> str:
    """`job 3 ` in sweep job 3, `` in a single run."""
    return "" if _job is None else f"job {_job} "


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _line(head: str, metrics: dict[str, Any]) -> str:
    return " | ".join([head, *(f"{k}={_format(v)}" for k, v in metrics.items())])


def ppo_line(metrics: dict[str, Any], update: int, total: int) -> str:
    """`[ppo] update 10/64 | env/gold=0.51 | objective/scores=0.8 | ... | reward/<name>=... | eps=40.1`."""
    # reward/model_score is the reward model's raw score, already shown as its rubric component (reward/model)
    components = [k for k in metrics if k.startswith("reward/") and k != "reward/model_score"]
    keys = [*PPO_WATCHED, *components, "eps"]
    return _line(f"[ppo] update {update}/{total}", {k: metrics[k] for k in keys if k in metrics})


def trl_line(stage: str, metrics: dict[str, Any], step: int) -> str | None:
    """`[sft] step 20 | train/loss=3.48 | train/mean_token_accuracy=0.36` from namespaced Trainer logs (see
    `rlhf.tracking.wandb_run.rewrite_trainer_logs`); None when the log holds none of the watched metrics."""
    shown = {k: v for k, v in metrics.items() if k.split("/")[-1] in TRL_WATCHED and not isinstance(v, str)}
    return _line(f"[{stage}] step {step}", shown) if shown else None


class _ConsoleStream:
    """A console log handler's stream: each write clears the progress bars, writes the line and redraws the bars
    below it (tqdm's `external_write_mode`, what `tqdm.write` does); in a sweep every line gets `[job N] `."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if _job is not None:
            text = "".join(f"[job {_job}] {line}" for line in text.splitlines(keepends=True))
        with tqdm.external_write_mode(file=self.stream):
            return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _is_console(stream: Any) -> bool:
    return any(stream is s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None)


def route_console_logs(loggers: tuple[str, ...] = ("", "rlhf", "transformers")) -> None:
    """Route the console handlers (stdout / stderr) of these loggers (root: Hydra's `hydra/job_logging`) through
    `_ConsoleStream`. Idempotent; handlers keep their level and format; file handlers (Hydra's `rlhf.log`) are left
    alone, so the job's own log file has no `[job N]` prefix and no bar escapes."""
    for name in loggers:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and _is_console(handler.stream):
                handler.setStream(_ConsoleStream(handler.stream))


def progress(desc: str, **kwargs: Any) -> tqdm:
    """A tqdm bar named `desc` (`job 3 <desc>` in a sweep); log lines print above it from now on."""
    route_console_logs()
    return tqdm(desc=job_prefix() + desc, **kwargs)


def progress_callback(stage: str):
    """transformers' ProgressCallback with bars named after the stage (and job), and a compact `trl_line` per
    logged step instead of the dict it prints (W&B still gets every metric through its own callback)."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import has_length

    from rlhf.tracking.wandb_run import rewrite_trainer_logs

    class ConsoleProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.training_bar = progress(stage, total=state.max_steps, dynamic_ncols=True)
            self.current_step = 0

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            if state.is_world_process_zero and self.prediction_bar is None and has_length(eval_dataloader):
                self.prediction_bar = progress(
                    f"{stage} eval",
                    total=len(eval_dataloader),
                    leave=self.training_bar is None,
                    dynamic_ncols=True,
                )
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                line = trl_line(stage, rewrite_trainer_logs(logs), state.global_step)
                if line is not None:
                    log.info(line)

    return ConsoleProgress()
