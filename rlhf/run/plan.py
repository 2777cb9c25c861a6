"""What a run does in its run directory: which stages run, which finished ones are reused, which resume, and what
each reads.

A stage finished in this directory is reused only when its key (`rlhf.run.stage_keys`: its config, its upstream's
keys, the package version) is unchanged and its output is still there; otherwise it reruns, and so does every stage
after it. A PPO checkpoint is resumed only under the same key. The model's precision is settled first, since every
key depends on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.common.stage_names import STAGES
from rlhf.config import RLHFConfig
from rlhf.run.stage_keys import StageKey, changes, stage_keys
from rlhf.run.summary import SUMMARY
from rlhf.stages import BASE, REGISTRY
from rlhf.stages.base import needs_message

log = logging.getLogger("rlhf")


def settle_precision(
    cfg: RLHFConfig, summary: dict[str, Any], device_type: str, main: bool
) -> dict[str, str]:
    """Make `cfg.model.dtype` concrete before any key is computed, and return summary.json's record of it.

    `auto` resolves from the hardware (`rlhf.models.precision`), except in a run directory that already resolved
    it: there the recorded dtype is kept, so a resume (also on another kind of machine) continues in the precision
    its finished stages and checkpoints were made in. An explicit dtype is obeyed, with a warning where bf16 is slow.
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


def resume_ids(cfg: RLHFConfig, plan: Plan, run_dir: Path) -> dict[str, str | None]:
    """The W&B run id each stage to run continues (a killed run resumed under the same key; None: a fresh run)."""
    return {
        name: REGISTRY[name].resume(cfg, run_dir / name, plan.keys[name].key)
        for name in plan.run
        if REGISTRY[name].resume is not None
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
