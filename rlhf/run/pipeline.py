"""Run the selected stages in order, pass each one's artifact on, track each in W&B, write `summary.json`.

In this order, so that a mistake costs seconds and a run directory never lies:

1. validate  the whole config (`rlhf.run.validation`); nothing is written before it passes
2. lock      the run directory (`rlhf.run.lock`): a second process there fails at once
3. plan      with stage keys (`rlhf.run.stage_keys`): a stage finished in this directory is reused only when its key
             (its config, its upstream's keys, the package version) is unchanged; otherwise it reruns, and so does
             every stage after it. summary.json forgets what will be redone before anything runs, so a kill at any
             later moment leaves only valid entries. A PPO checkpoint is resumed only under the same key.
4. base      the tiny base model is (re)built when its key changed
5. stages    from the registry (`rlhf.stages.REGISTRY`): one W&B run each; summary.json after each. With a stage
             cache (`rlhf.run.stage_cache`; a multirun's jobs share one), a stage whose key has a published entry is
             reused from it instead ("cached": true), and every stage that runs is published there

Any user mistake found in steps 1-4 is an InputError: one line, before any training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlhf.config import STAGES, RLHFConfig
from rlhf.run.stage_cache import StageCache
from rlhf.run.stage_keys import StageKey, changes, stage_keys
from rlhf.run.sweep import declared_keys, swept_values
from rlhf.run.validation import validate
from rlhf.stages import BASE, REGISTRY
from rlhf.stages.base import StageContext, StageResult, needs_message
from rlhf.tracking.wandb_run import plain_scalar

log = logging.getLogger("rlhf")

SUMMARY = "summary.json"
CACHE_IN_SWEEP = ".stage_cache"
"""The default stage cache of a multirun, under its sweep directory."""


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


@dataclass(frozen=True)
class HydraJob:
    """Where Hydra runs this invocation and, in a multirun, which job of which sweep it is."""

    run_dir: Path
    group: str
    """The W&B group: the sweep directory's name in a multirun, else the run directory's."""
    num: int | None = None
    """The job's number in a multirun, else None."""
    sweep_dir: Path | None = None
    """The sweep directory in a multirun, else None."""
    overrides: tuple[str, ...] = ()
    """The job's own command-line overrides (`ppo.kl_coef=0.02`, the swept values among them)."""
    swept: frozenset[str] | None = None
    """The keys the sweep varies (None: unknown, every override counts)."""


def hydra_job() -> HydraJob:
    """This invocation's place, from Hydra's runtime config."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = tuple(hc.overrides.task)
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir).resolve()
        swept = declared_keys(sweep_dir, hc.sweeper.get("params")) or None
        return HydraJob(run_dir, _group_name(sweep_dir), hc.job.num, sweep_dir, overrides, swept)
    return HydraJob(run_dir, _group_name(run_dir), overrides=overrides)


def run_name(job: HydraJob, stage: str) -> str:
    """A W&B run's name: in a sweep, the job's swept values (`kl_coef=0.02,seed=1-ppo`), else `<group>-<stage>`."""
    if job.num is None:
        return f"{job.group}-{stage}"
    values = swept_values(job.overrides, job.swept)
    swept = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
    return f"{swept or job.num}-{stage}"


def cache_root(cfg: RLHFConfig, sweep_dir: Path | None) -> Path | None:
    """The stage cache's directory: `cache_dir`, else the sweep's `.stage_cache` in a multirun; None when off."""
    if not cfg.cache:
        return None
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return sweep_dir / CACHE_IN_SWEEP if sweep_dir is not None else None


def write_hydra_record(cfg: RLHFConfig, run_dir: Path) -> None:
    """Hydra's record of the invocation (`.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`), written only once
    the config passed validation and the directory is locked: conf/config.yaml turns off Hydra's own early write
    (`hydra.output_subdir: null`), which would overwrite a finished run's record with a refused config."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}), out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), out / "overrides.yaml")


def _group_name(path: Path) -> str:
    """A readable group name: the directory's name, with its parent's when that is only a time (Hydra's default)."""
    path = path.resolve()
    name = path.name
    if re.fullmatch(r"[\d_:.-]+", name) and path.parent.name:
        name = f"{path.parent.name}_{name}"
    return name


# ------------------------------------------------------------------------------------------------- summary.json


def read_summary(run_dir: Path) -> dict[str, Any]:
    """`run_dir/summary.json`: {"base": {"artifact", "key", "config"}, "stages": {name: entry}} ({"stages": {}}
    when there is none)."""
    path = Path(run_dir) / SUMMARY
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.setdefault("stages", {})
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically, stages in pipeline order."""
    stages = summary["stages"]
    ordered = {name: stages[name] for name in [*STAGES, *sorted(stages)] if name in stages}
    out = {k: summary[k] for k in ("precision", "base") if summary.get(k) is not None}
    out["stages"] = ordered
    path = Path(run_dir) / SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path


def summary_entry(
    result: StageResult, key: StageKey, wandb_run: str | None, wandb_artifact: str | None
) -> dict[str, Any]:
    """A finished stage as summary.json records it: its output, time, metrics, W&B run and artifact, stage key,
    and whether it came from the stage cache."""
    return {
        "artifact": str(Path(result.artifact).resolve()),
        "seconds": round(float(result.seconds), 3),
        "metrics": {k: plain_scalar(v) for k, v in result.metrics.items()},
        "wandb_run": wandb_run,
        "wandb_artifact": wandb_artifact,
        "key": key.key,
        "config": key.config,
        "cached": False,
    }


def stage_inputs(
    cfg: RLHFConfig, stage: str, entries: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The upstream outputs a stage reads, for its W&B run's lineage: {upstream: {W&B artifact and run, key,
    path, cached}}."""
    return {
        name: {
            "artifact": entries[name].get("wandb_artifact"),
            "run": entries[name].get("wandb_run"),
            "key": entries[name].get("key"),
            "path": entries[name].get("artifact"),
            "cached": bool(entries[name].get("cached")),
        }
        for name in REGISTRY[stage].reads(cfg)
        if name in entries
    }


# ------------------------------------------------------------------------------------------------------ planning


def settle_precision(
    cfg: RLHFConfig, summary: dict[str, Any], device_type: str, main: bool
) -> dict[str, str]:
    """Make `cfg.model.dtype` concrete before any key is computed, and return summary.json's record of it.

    `auto` resolves from the hardware (`rlhf.models.precision`), except in a run directory that already resolved it: there
    the recorded dtype is kept, so a resume (also on another kind of machine) continues in the precision its
    finished stages and checkpoints were made in. An explicit dtype is obeyed, with a warning where bf16 is slow.
    """
    from rlhf.models.precision import AUTO, resolve_dtype, slow_bf16_warning

    requested = cfg.model.dtype
    recorded = summary.get("precision") or {}
    # kept also when no stage finished yet: a killed first stage's checkpoint resumes in its precision
    if requested == AUTO and recorded.get("requested") == AUTO:
        dtype, reason = recorded["dtype"], recorded.get("reason", "")
        shown = f"kept from this run directory's first run ({reason})"
    else:
        dtype, reason = resolve_dtype(requested, device_type)
        shown = reason
    if main:
        if requested == AUTO:
            log.info("model.dtype=auto -> %s: %s", dtype, shown)
        elif warning := slow_bf16_warning(dtype, device_type):
            log.warning(warning)
    cfg.model.dtype = dtype
    return {"requested": requested, "dtype": dtype, "reason": reason}


@dataclass
class Plan:
    keys: dict[str, StageKey]
    """The base model's and every stage's key under this config."""
    build_base: bool
    """(Re)build the tiny base model: none yet, or one built for another config."""
    run: list[str]
    """Stages to run, in pipeline order."""
    reused: dict[str, dict[str, Any]]
    """summary.json entries of finished stages that stay valid: upstream of the stages that run."""
    notes: list[str]
    """One line per decision that is not a plain first run, for the log."""


def plan_run(cfg: RLHFConfig, selected: list[str], run_dir: Path, summary: dict[str, Any]) -> Plan:
    """Decide what runs and what is reused; ValueError when a stage to run reads an output it cannot have."""
    keys = stage_keys(cfg)
    notes: list[str] = []
    build_base = False
    if not cfg.model.name_or_path:
        base_dir, recorded_base = run_dir / BASE, summary.get("base") or {}
        built = (base_dir / "config.json").exists() and (base_dir / "tokenizer.json").exists()
        build_base = not (built and recorded_base.get("key") == keys[BASE].key)
        if build_base and built:
            why = changes(recorded_base.get("config", {}), keys[BASE].config) or "not recorded"
            notes.append(
                f"base: {base_dir} was built for another config ({why}): rebuilding it and every stage"
            )
    earlier_reruns = build_base  # from here on every recorded output is stale
    run: list[str] = []
    reused: dict[str, dict[str, Any]] = {}
    stale: dict[str, str] = {}
    for name in STAGES:
        entry = summary["stages"].get(name)
        if entry is None:
            if name in selected:
                run.append(name)
                earlier_reruns = True
            continue
        if entry.get("key") != keys[name].key:
            why = changes(entry.get("config", {}), keys[name].config) or "its upstream changed"
        elif not Path(entry["artifact"]).exists():
            why = f"{entry['artifact']} is gone"
        elif earlier_reruns:
            why = "an earlier stage reruns"
        else:
            reused[name] = entry
            if name in selected:
                notes.append(f"{name}: finished in this run directory with the same config: reusing it")
            continue
        stale[name] = why
        if name in selected:
            run.append(name)
            earlier_reruns = True
            notes.append(
                f"{name}: its finished output no longer matches ({why}): rerunning it and every stage after it"
            )
        else:
            notes.append(f"{name}: its finished output no longer matches ({why}): dropped from {SUMMARY}")
    for name in run:
        for upstream, instead in REGISTRY[name].reads(cfg).items():
            if upstream in reused or upstream in run:
                continue
            if upstream in stale:
                raise ValueError(
                    f"{name} reads the {upstream} stage's output in {run_dir}, which no longer matches "
                    f"({stale[upstream]}); add {upstream} to stages to rerun it, or use a new hydra.run.dir"
                )
            if instead:
                raise ValueError(needs_message(name, upstream, instead))
    return Plan(keys, build_base, run, reused, notes)


# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: RLHFConfig, run_dir: Path | None = None, group: str | None = None) -> dict:
    """Run `cfg.stages` in order; returns the summary written to `run_dir/summary.json`.

    `run_dir` and `group` default to Hydra's output directory and the run's (or sweep's) name.
    """
    from accelerate import PartialState

    from rlhf.models.loading import resolve_device
    from rlhf.models.tiny import prepare_base_model
    from rlhf.run.lock import hold_run_dir

    under_hydra = run_dir is None
    job = hydra_job() if under_hydra else HydraJob(Path(run_dir), _group_name(Path(run_dir)))
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
            resume_ids: dict[str, str | None] = {}
            if main:
                for note in plan.notes:
                    log.info(note)
                resume_ids = {
                    name: REGISTRY[name].resume(cfg, run_dir / name, plan.keys[name].key)
                    for name in plan.run
                    if REGISTRY[name].resume is not None
                }
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
                    cfg, stage, i, plan, job, run_dir, results, summary, resume_ids, main
                )
                if cache is not None and main:
                    entry = cache.publish(
                        stage, plan.keys[stage].key, run_dir / stage, summary["stages"][stage]
                    )
                    summary["stages"][stage]["cache_entry"] = str(entry)
                    write_summary(run_dir, summary)
        process.wait_for_everyone()
    path = run_dir / SUMMARY
    log.info("summary: %s", path)
    return json.loads(path.read_text())


def _from_main(process: Any, value: Any) -> Any:
    """The main process's `value` on every process of a multi-process run."""
    if process.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def cached_entry(record: dict[str, Any], entry_dir: Path) -> dict[str, Any]:
    """summary.json's entry of a stage reused from the cache: the entry's record (its W&B run and artifact are the
    ones that made it), marked cached and naming the cache entry."""
    keep = ("artifact", "seconds", "metrics", "wandb_run", "wandb_artifact", "key", "config")
    return {**{k: record.get(k) for k in keep}, "cached": True, "cache_entry": str(entry_dir)}


def _run_stage(
    cfg: RLHFConfig,
    stage: str,
    index: int,
    plan: Plan,
    job: HydraJob,
    run_dir: Path,
    results: dict[str, StageResult],
    summary: dict[str, Any],
    resume_ids: dict[str, str | None],
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
            resume_id=resume_ids.get(stage),
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
