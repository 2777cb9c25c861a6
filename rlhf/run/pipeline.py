"""Run the selected stages in order, pass each one's artifact on, track each in W&B, write `summary.json`.

In this order, so that a mistake costs seconds and a run directory never lies:

1. validate  the whole config (`rlhf.run.validation`); nothing is written before it passes
2. lock      the run directory (`rlhf.run.lock`): a second process there fails at once
3. plan      what runs, what is reused and what resumes, by stage keys (`rlhf.run.plan`). summary.json
             (`rlhf.run.summary`) forgets what will be redone before anything runs, so a kill at any later moment
             leaves only valid entries
4. base      the tiny base model is (re)built when its key changed
5. stages    from the registry (`rlhf.stages.REGISTRY`): one W&B run each; summary.json after each. With a stage
             cache (`rlhf.run.stage_cache`; a multirun's jobs share one), a stage whose key has a published entry is
             reused from it instead ("cached": true), and every stage that runs is published there

Any user mistake found in steps 1-4 is an InputError: one line, before any training.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhf.config import RLHFConfig
from rlhf.run.hydra_job import HydraJob, hydra_job, job_outside_hydra, run_name, write_hydra_record
from rlhf.run.plan import Plan, plan_run, resume_ids, settle_precision, stage_inputs
from rlhf.run.stage_cache import StageCache, cache_root
from rlhf.run.summary import SUMMARY, cached_entry, read_summary, summary_entry, write_summary
from rlhf.run.sweep import swept_values
from rlhf.run.validation import validate
from rlhf.stages import BASE, REGISTRY
from rlhf.stages.base import StageContext, StageResult

log = logging.getLogger("rlhf")


class InputError(ValueError):
    """A user mistake found before any training (bad setting, path or data, a busy run directory): one line."""


@contextmanager
def _input_errors() -> Iterator[None]:
    try:
        yield
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from e


def derive_seed(root_seed: int, stage_name: str) -> int:
    """A stage's seed: stable across processes and Python versions (unlike `hash`), distinct per stage."""
    digest = hashlib.sha256(f"{root_seed}:{stage_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**31 - 1)


def set_threads(cfg: RLHFConfig) -> int:
    """Apply `num_threads` (auto: 1 for a tiny model, whose matmuls are too small to share across cores)."""
    import torch

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    elif not cfg.model.name_or_path:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def run(cfg: RLHFConfig, run_dir: Path | None = None, group: str | None = None) -> dict:
    """Run `cfg.stages` in order; returns the summary written to `run_dir/summary.json`.

    `run_dir` and `group` default to Hydra's output directory and the run's (or sweep's) name.
    """
    from accelerate import PartialState

    from rlhf.models.loading import resolve_device
    from rlhf.models.tiny import prepare_base_model
    from rlhf.run.lock import hold_run_dir

    under_hydra = run_dir is None
    job = hydra_job() if under_hydra else job_outside_hydra(Path(run_dir))
    job = replace(job, group=group or job.group)
    if under_hydra:
        from rlhf.tracking.console import set_job

        set_job(job.num)  # in a sweep, console lines and bars say which job they come from
    run_dir = job.run_dir.resolve()
    group = job.group
    with ExitStack() as held:
        with _input_errors():
            selected = validate(cfg, num_processes=int(os.environ.get("WORLD_SIZE", "1")))
            # one process, or one of several under torchrun / accelerate launch (gloo on CPU, NCCL on GPUs)
            process = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
            main = process.is_main_process
            if main:  # the processes of one run share the directory: the main one holds it for all
                held.enter_context(hold_run_dir(run_dir))
            with process.main_process_first():
                summary = read_summary(run_dir)
                summary["precision"] = settle_precision(cfg, summary, resolve_device(cfg.device).type, main)
                plan = plan_run(cfg, selected, run_dir, summary)
            process.wait_for_everyone()  # every process planned from the same summary.json before it changes
            resumes: dict[str, str | None] = {}
            if main:
                for note in plan.notes:
                    log.info(note)
                resumes = resume_ids(cfg, plan, run_dir)
                if under_hydra:
                    write_hydra_record(cfg, run_dir)
                # forget what will be redone before redoing it: a kill from here on leaves only valid entries
                summary = {
                    "precision": summary["precision"],
                    "base": None if plan.build_base else summary.get("base"),
                    "stages": dict(plan.reused),
                }
                write_summary(run_dir, summary)
                if plan.build_base:
                    shutil.rmtree(run_dir / BASE, ignore_errors=True)
            from transformers import set_seed  # heavy: only once the input is known to be good

            set_seed(derive_seed(cfg.seed, BASE))
            with process.main_process_first():  # one process builds the tiny base model, the others load it
                base = prepare_base_model(cfg, run_dir / BASE)
            if main:
                summary["base"] = {
                    "artifact": str(base),
                    "key": plan.keys[BASE].key,
                    "config": plan.keys[BASE].config,
                }
                write_summary(run_dir, summary)
        threads = set_threads(cfg)
        log.info(
            "run dir %s | stages %s | W&B group %s | %d CPU threads",
            run_dir,
            " -> ".join(plan.run) or f"none to run (all finished: {', '.join(plan.reused)})",
            cfg.logger.group or group,
            threads,
        )
        results: dict[str, StageResult] = {
            BASE: StageResult(artifact=Path(base) if Path(base).exists() else base),
            **{
                name: StageResult(Path(e["artifact"]), dict(e.get("metrics", {})), e.get("seconds", 0.0))
                for name, e in plan.reused.items()
            },
        }
        cache_dir = cache_root(cfg, job.sweep_dir)
        cache = StageCache(cache_dir) if cache_dir is not None else None
        if cache is not None:
            log.info("stage cache: %s", cache.root)
        for i, stage in enumerate(plan.run):
            with ExitStack() as entry_lock:
                cached = None
                if cache is not None:  # the main process decides, under the entry's lock, for all
                    if main:
                        entry_lock.enter_context(cache.hold(stage, plan.keys[stage].key))
                        cached = cache.lookup(stage, plan.keys[stage].key)
                    cached = _from_main(process, cached)
                if cached is not None:
                    results[stage] = StageResult(Path(cached["artifact"]), dict(cached["metrics"]), 0.0)
                    if main:
                        summary["stages"][stage] = cached_entry(cached, cache.entry_dir(stage, cached["key"]))
                        write_summary(run_dir, summary)
                    log.info(
                        "stage %d/%d: %s reused from the stage cache: %s (made in %s, %.1fs)",
                        i + 1, len(plan.run), stage, cached["artifact"], cached.get("made_in"), cached["seconds"],
                    )  # fmt: skip
                    continue
                results[stage] = _run_stage(
                    cfg, stage, i, plan, job, run_dir, results, summary, resumes, main
                )
                if cache is not None and main:
                    entry = cache.publish(
                        stage, plan.keys[stage].key, run_dir / stage, summary["stages"][stage]
                    )
                    summary["stages"][stage]["cache_entry"] = str(entry)
                    write_summary(run_dir, summary)
        process.wait_for_everyone()
    log.info("summary: %s", run_dir / SUMMARY)
    return read_summary(run_dir)


def _from_main(process: Any, value: Any) -> Any:
    """The main process's `value` on every process of a multi-process run."""
    if process.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _run_stage(
    cfg: RLHFConfig,
    stage: str,
    index: int,
    plan: Plan,
    job: HydraJob,
    run_dir: Path,
    results: dict[str, StageResult],
    summary: dict[str, Any],
    resumes: dict[str, str | None],
    main: bool,
) -> StageResult:
    """Run one stage in its own W&B run (main process) and record it in summary.json."""
    from transformers import set_seed

    from rlhf.tracking.wandb_run import null_tracker, start_stage

    spec = REGISTRY[stage]
    group = cfg.logger.group or job.group
    if main:
        tracker = start_stage(
            cfg,
            stage,
            run_dir,
            group,
            resume_id=resumes.get(stage),
            name=run_name(job, stage),
            swept=swept_values(job.overrides, job.swept) if job.num is not None else None,
            inputs=stage_inputs(cfg, stage, summary["stages"]),
        )
    else:  # only the main process tracks and writes the summary; the others train
        tracker = null_tracker(stage)
    ctx = StageContext(
        run_dir=run_dir,
        output_dir=run_dir / stage,
        seed=derive_seed(cfg.seed, stage),
        tracker=tracker,
        upstream=dict(results),
        key=plan.keys[stage].key,
    )
    ctx.output_dir.mkdir(parents=True, exist_ok=True)
    log.info("stage %d/%d: %s (seed %d) -> %s", index + 1, len(plan.run), stage, ctx.seed, ctx.output_dir)
    artifact_name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{stage}-{tracker.run_id or 'local'}")
    try:
        set_seed(ctx.seed)
        start = time.perf_counter()
        result = spec.run(cfg, ctx)
        result.seconds = time.perf_counter() - start
        tracker.set_summary({**result.metrics, "stage/seconds": result.seconds})
        tracker.log_artifact(result.artifact, artifact_name, spec.artifact_type)
    except BaseException:
        tracker.finish(exit_code=1)  # the W&B run shows as failed
        raise
    tracker.finish()
    if main:
        logged = artifact_name if tracker.run_id is not None and cfg.logger.log_artifacts else None
        summary["stages"][stage] = summary_entry(result, plan.keys[stage], tracker.run_id, logged)
        write_summary(run_dir, summary)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, int | float))
    log.info("stage %s done in %.1fs: %s", stage, result.seconds, shown)
    return result
