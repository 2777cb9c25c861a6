"""Run the selected stages in order, pass each one's artifact on, track each in W&B, write `summary.json`.

In this order, so that a mistake costs seconds and a run directory never lies:

1. validate  the whole config (`rlhf.validation`); nothing is written before it passes
2. lock      the run directory (`rlhf.run_lock`): a second process there fails at once
3. plan      with stage keys (`rlhf.stage_keys`): a stage finished in this directory is reused only when its key
             (its config, its upstream's keys, the package version) is unchanged; otherwise it reruns, and so does
             every stage after it. summary.json forgets what will be redone before anything runs, so a kill at any
             later moment leaves only valid entries. A PPO checkpoint is resumed only under the same key.
4. base      the tiny base model is (re)built when its key changed
5. stages    from the registry (`rlhf.stages.REGISTRY`): one W&B run each; summary.json after each

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.config import STAGES, RLHFConfig
from rlhf.stage_keys import StageKey, changes, stage_keys
from rlhf.stages import BASE, REGISTRY
from rlhf.stages.base import StageContext, StageResult, needs_message
from rlhf.tracking import plain_scalar
from rlhf.validation import validate

log = logging.getLogger("rlhf")

SUMMARY = "summary.json"


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


def hydra_run_info() -> tuple[Path, str, int | None]:
    """(run dir, W&B group, job number) from Hydra: the group is the sweep directory in a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        return run_dir, _group_name(Path(hc.sweep.dir)), hc.job.num
    return run_dir, _group_name(run_dir), None


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
    out = {"stages": ordered} if summary.get("base") is None else {"base": summary["base"], "stages": ordered}
    path = Path(run_dir) / SUMMARY
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return path


def summary_entry(result: StageResult, key: StageKey, wandb_run: str | None) -> dict[str, Any]:
    """A finished stage as summary.json records it: its output, time, metrics, W&B run and stage key."""
    return {
        "artifact": str(Path(result.artifact).resolve()),
        "seconds": round(float(result.seconds), 3),
        "metrics": {k: plain_scalar(v) for k, v in result.metrics.items()},
        "wandb_run": wandb_run,
        "key": key.key,
        "config": key.config,
    }


# ------------------------------------------------------------------------------------------------------ planning


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

    from rlhf.models import prepare_base_model, resolve_device
    from rlhf.run_lock import hold_run_dir
    from rlhf.tracking import null_tracker, start_stage

    job_num, under_hydra = None, run_dir is None
    if under_hydra:
        run_dir, hydra_group, job_num = hydra_run_info()
        group = group or hydra_group
    run_dir = Path(run_dir).resolve()
    group = group or _group_name(run_dir)
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
        for i, stage in enumerate(plan.run):
            spec = REGISTRY[stage]
            name = f"{group}-{job_num}-{stage}" if job_num is not None else f"{group}-{stage}"
            if main:
                tracker = start_stage(cfg, stage, run_dir, group, resume_id=resume_ids.get(stage), name=name)
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
            log.info("stage %d/%d: %s (seed %d) -> %s", i + 1, len(plan.run), stage, ctx.seed, ctx.output_dir)
            try:
                set_seed(ctx.seed)
                start = time.perf_counter()
                result = spec.run(cfg, ctx)
                result.seconds = time.perf_counter() - start
                tracker.set_summary({**result.metrics, "stage/seconds": result.seconds})
                tracker.log_artifact(
                    result.artifact, f"{stage}-{tracker.run_id or 'local'}", spec.artifact_type
                )
            except BaseException:
                tracker.finish(exit_code=1)  # the W&B run shows as failed
                raise
            tracker.finish()
            results[stage] = result
            if main:
                summary["stages"][stage] = summary_entry(result, plan.keys[stage], tracker.run_id)
                write_summary(run_dir, summary)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, int | float))
            log.info("stage %s done in %.1fs: %s", stage, result.seconds, shown)
        process.wait_for_everyone()
    path = run_dir / SUMMARY
    log.info("summary: %s", path)
    return json.loads(path.read_text())
