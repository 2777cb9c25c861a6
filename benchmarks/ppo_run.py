"""Our PPOTrainer as the throughput and memory benchmarks run it: the settings of a timed run, the tiny setup's four
models, the updates timed one by one, and their phase timings."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import measure


def ppo_config(batch_size: int, updates: int, **fields: Any):
    """Our PPOConfig for a run of `updates` timed updates of `batch_size` episodes: no checkpoints, sample tables or
    resume; room for one update more than run, because the trainer checkpoints after its last update, which would
    otherwise land in the last timed one. `fields` sets the rest."""
    from rlhf.ppo.config import PPOConfig

    return PPOConfig(
        batch_size=batch_size,
        total_episodes=(updates + 1) * batch_size,
        save_every=0,
        samples_every=0,
        resume=False,
        **fields,
    )


def tiny_models(config) -> tuple[Any, Any, Any, Any]:
    """Policy, reference, critic and reward model of the tiny setup, fresh weights from torch's RNG in that order,
    from one LlamaConfig (the critic and reward model with a scalar head)."""
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

    policy, ref = LlamaForCausalLM(config), LlamaForCausalLM(config)
    config.num_labels = 1
    critic, reward = (AutoModelForSequenceClassification.from_config(config) for _ in range(2))
    return policy, ref, critic, reward


def timed_updates(trainer, updates: int) -> list[measure.Lap]:
    """`updates` calls of `trainer.train(max_updates=1)`, one Lap each (its value: that update's metrics)."""
    return [measure.timed(lambda: trainer.train(max_updates=1))[0] for _ in range(updates)]


def timed_run(cfg, policy, tokenizer, env_id: str, updates: int, **trainer_args: Any) -> list[measure.Lap]:
    """A PPOTrainer of `cfg` on `env_id`'s environment, its output in a temporary directory, `updates` timed
    updates (`timed_updates`), then closed (its critic process, if any, stopped). `trainer_args`: the trainer's
    keyword arguments (ref_policy, reward_model, critic, accelerator, seed)."""
    import envs
    from rlhf.ppo.trainer import PPOTrainer

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as out:
        trainer = PPOTrainer(
            cfg, policy, tokenizer, lambda: envs.make(env_id), output_dir=out, **trainer_args
        )
        try:
            return timed_updates(trainer, updates)
        finally:
            trainer.close()


def phases(laps: Iterable[measure.Lap], average: Callable = statistics.mean) -> dict[str, float]:
    """The trainer's phase timings (`time/rollout`, `time/score`, `time/update`, ...) averaged over the updates of
    `laps`."""
    rows = [{k: v for k, v in lap.value.items() if k.startswith("time/")} for lap in laps]
    return {k: average(row[k] for row in rows) for k in rows[0]}
