"""Run the selected stages in order, pass each one's artifact on, track each in W&B, write `summary.json`.

Stage modules are imported by name (`rlhf.stages.<name>`), so a stage is one module with `run(cfg, ctx)` and the
pipeline knows nothing else about it. Everything that can be wrong with the input is checked before the first
stage starts, so a typo costs seconds, not a training run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import time
from pathlib import Path

from rlhf.config import STAGES, RLHFConfig
from rlhf.stages.base import StageContext, StageResult
from rlhf.tracking import plain_scalar

log = logging.getLogger("rlhf")

ARTIFACT_TYPES = {"sft": "model", "reward": "reward_model", "ppo": "model", "evaluate": "evaluation"}
BASE = "base"
"""Key of the base model (tiny model built from config, or `model.name_or_path`) in `StageContext.upstream`."""


class InputError(ValueError):
    """A user mistake found before any training (bad path, unknown name, unwritable directory): one line."""


def derive_seed(root_seed: int, stage_name: str) -> int:
    """A stage's seed: stable across processes and Python versions (unlike `hash`), distinct per stage."""
    digest = hashlib.sha256(f"{root_seed}:{stage_name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**31 - 1)


def select_stages(cfg: RLHFConfig) -> list[str]:
    """`cfg.stages` validated and put in pipeline order."""
    stages = list(cfg.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {', '.join(map(str, unknown))}; choose from {', '.join(STAGES)}")
    if not stages:
        raise ValueError(f"stages is empty; choose from {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def validate(cfg: RLHFConfig) -> list[str]:
    """Every check that needs no training, cheapest first: missing values, enum-like strings, paths, the model
    location, the environment id, the user's dataset columns. Returns the stages to run, in order."""
    from omegaconf import OmegaConf

    from rlhf.data import check_dataset_spec
    from rlhf.models import DEVICES, DTYPES, check_model_location, resolve_device
    from rlhf.tracking import check_logger_config

    if OmegaConf.is_config(cfg):
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ValueError(
                f"missing required value: {', '.join(missing)}; set it on the command line ({missing[0]}=...)"
            )
    stages = select_stages(cfg)
    if cfg.model.kind not in ("tiny", "hf"):
        raise ValueError(f"model.kind={cfg.model.kind!r} is not one of tiny, hf")
    if cfg.model.kind == "hf" and not cfg.model.name_or_path:
        raise ValueError("model=hf needs model.name_or_path=<hub id or save_pretrained directory>")
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is not one of {', '.join(DEVICES)}")
    if cfg.model.dtype not in DTYPES:
        raise ValueError(f"model.dtype={cfg.model.dtype!r} is not one of {', '.join(DTYPES)}")
    check_logger_config(cfg)
    if cfg.model.lora.r < 0:
        raise ValueError(f"model.lora.r={cfg.model.lora.r} must be >= 0 (0 trains all weights)")
    if not 0.0 <= cfg.task.eval_fraction < 1.0:
        raise ValueError(f"task.eval_fraction={cfg.task.eval_fraction} must be in [0, 1)")
    if cfg.num_threads < 0:
        raise ValueError(f"num_threads={cfg.num_threads} must be >= 0 (0 = automatic)")
    if "sft" in stages:
        check_dataset_spec(cfg.sft.dataset, "sft.dataset")
    if "reward" in stages:
        check_dataset_spec(cfg.reward.dataset, "reward.dataset")
    if cfg.device == "cuda" or cfg.model.dtype == "float16":  # these two need torch to check
        device = resolve_device(cfg.device)
        if cfg.model.dtype == "float16" and device.type == "cpu":
            raise ValueError(
                "model.dtype=float16 needs a GPU (mixed precision with loss scaling); use bfloat16 on CPU"
            )
    needs_env = (not cfg.model.name_or_path) or ("sft" in stages and not cfg.sft.dataset)
    needs_env = (
        needs_env
        or ("reward" in stages and not cfg.reward.dataset)
        or bool({"ppo", "evaluate"} & set(stages))
    )
    if needs_env:
        from envs import env_class

        try:
            env_class(cfg.task.env_id)
        except Exception as e:  # gymnasium's NameNotFound, ImportError of a user's module, ...
            raise ValueError(f"task.env_id={cfg.task.env_id}: {e}") from e
    if cfg.model.name_or_path:
        check_model_location(cfg.model.name_or_path)
    if "reward" in stages and cfg.reward.init_from:
        check_model_location(cfg.reward.init_from, "reward.init_from")
    check_user_data(cfg, stages)
    return stages


def check_user_data(cfg: RLHFConfig, stages: list[str]) -> None:
    """Load the user's datasets once up front, so a missing column fails before the base model is even built."""
    from rlhf.data import check_preference_columns, check_sft_columns, load_user_dataset

    if "sft" in stages and cfg.sft.dataset:
        check_sft_columns(load_user_dataset(cfg.sft.dataset, "sft.dataset")[0], "sft.dataset")
    if "reward" in stages and cfg.reward.dataset:
        check_preference_columns(load_user_dataset(cfg.reward.dataset, "reward.dataset")[0], "reward.dataset")


def check_writable(run_dir: Path) -> None:
    """The run directory must be creatable and writable before anything expensive starts."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write to run directory {run_dir} ({e.strerror}); set hydra.run.dir=<writable dir>"
        ) from e


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


def _group_name(path: Path) -> str:
    """A readable group name: the directory's name, with its parent's when that is only a time (Hydra's default)."""
    path = path.resolve()
    name = path.name
    if re.fullmatch(r"[\d_:.-]+", name) and path.parent.name:
        name = f"{path.parent.name}_{name}"
    return name


def read_summary(run_dir: Path) -> dict[str, dict]:
    """The stages recorded in `run_dir/summary.json` by an earlier invocation ({} when there is none)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("stages", {})


def previous_results(run_dir: Path, stages: list[str]) -> dict[str, StageResult]:
    """Finished stages of an earlier invocation in the same run directory that this one does not rerun.

    They become upstream results: `rlhf stages=[reward] hydra.run.dir=<dir of a finished sft>` trains the reward
    model on that SFT output instead of starting over.
    """
    out = {}
    for name, entry in read_summary(run_dir).items():
        if name not in stages and Path(entry["artifact"]).exists():
            out[name] = StageResult(
                Path(entry["artifact"]), dict(entry.get("metrics", {})), entry.get("seconds", 0.0)
            )
            log.info("reusing %s from this run directory: %s", name, entry["artifact"])
    return out


def write_summary(run_dir: Path, results: dict[str, StageResult], wandb_runs: dict[str, str | None]) -> Path:
    """`summary.json`: {"stages": {name: {"artifact", "seconds", "metrics", "wandb_run"}}}, in pipeline order.

    Entries of earlier invocations in the same run directory are kept unless this one reran the stage.
    """
    stages = read_summary(run_dir)
    for name, r in results.items():
        if name == BASE:
            continue
        stages[name] = {
            "artifact": str(Path(r.artifact).resolve()),
            "seconds": round(float(r.seconds), 3),
            "metrics": {k: plain_scalar(v) for k, v in r.metrics.items()},
            "wandb_run": wandb_runs.get(name, stages.get(name, {}).get("wandb_run")),
        }
    ordered = {name: stages[name] for name in [*STAGES, *sorted(stages)] if name in stages}
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"stages": ordered}, indent=2) + "\n")
    tmp.replace(path)
    return path


def run(cfg: RLHFConfig, run_dir: Path | None = None, group: str | None = None) -> dict:
    """Run `cfg.stages` in order; returns the summary written to `run_dir/summary.json`.

    `run_dir` and `group` default to Hydra's output directory and the run's (or sweep's) name.
    """
    from accelerate import PartialState

    from rlhf.models import prepare_base_model, resolve_device
    from rlhf.ppo.checkpoint import read_resume_run_id
    from rlhf.tracking import null_tracker, start_stage

    job_num = None
    if run_dir is None:
        run_dir, hydra_group, job_num = hydra_run_info()
        group = group or hydra_group
    run_dir = Path(run_dir).resolve()
    group = group or _group_name(run_dir)
    try:
        stages = validate(cfg)
        # one process, or one of several under torchrun / accelerate launch (gloo on CPU, NCCL on GPUs)
        process = PartialState(cpu=resolve_device(cfg.device).type == "cpu")
        check_writable(run_dir)
        from transformers import set_seed  # heavy: only once the input is known to be good

        set_seed(derive_seed(cfg.seed, BASE))
        with process.main_process_first():  # one process builds the tiny base model, the others load it
            base = prepare_base_model(cfg, run_dir / BASE)
    except ValueError as e:
        raise InputError(str(e)) from e
    threads = set_threads(cfg)
    log.info(
        "run dir %s | stages %s | W&B group %s | %d CPU threads",
        run_dir,
        " -> ".join(stages),
        cfg.logger.group or group,
        threads,
    )
    results: dict[str, StageResult] = {
        BASE: StageResult(artifact=Path(base) if Path(base).exists() else base),
        **previous_results(run_dir, stages),
    }
    wandb_runs: dict[str, str | None] = {}
    for i, stage in enumerate(stages):
        module = importlib.import_module(f"rlhf.stages.{stage}")
        name = f"{group}-{job_num}-{stage}" if job_num is not None else f"{group}-{stage}"
        if process.is_main_process:
            resume_id = read_resume_run_id(run_dir / stage) if stage == "ppo" and cfg.ppo.resume else None
            tracker = start_stage(cfg, stage, run_dir, group, resume_id=resume_id, name=name)
        else:  # only the main process tracks and writes the summary; the others train
            tracker = null_tracker(stage)
        ctx = StageContext(
            run_dir=run_dir,
            output_dir=run_dir / stage,
            seed=derive_seed(cfg.seed, stage),
            tracker=tracker,
            upstream=dict(results),
        )
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        log.info("stage %d/%d: %s (seed %d) -> %s", i + 1, len(stages), stage, ctx.seed, ctx.output_dir)
        try:
            set_seed(ctx.seed)
            start = time.perf_counter()
            result = module.run(cfg, ctx)
            result.seconds = time.perf_counter() - start
            tracker.set_summary({**result.metrics, "stage/seconds": result.seconds})
            tracker.log_artifact(
                result.artifact, f"{stage}-{tracker.run_id or 'local'}", ARTIFACT_TYPES[stage]
            )
        except BaseException:
            tracker.finish(exit_code=1)  # the W&B run shows as failed
            raise
        tracker.finish()
        results[stage] = result
        wandb_runs[stage] = tracker.run_id
        if process.is_main_process:
            write_summary(run_dir, results, wandb_runs)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, int | float))
        log.info("stage %s done in %.1fs: %s", stage, result.seconds, shown)
    process.wait_for_everyone()
    path = run_dir / "summary.json"
    log.info("summary: %s", path)
    return json.loads(path.read_text())
