"""Atomic PPO checkpoints: written aside, fsynced, then renamed into place; only the newest is kept.

Layout under a stage directory::

    checkpoints/
      checkpoint-000012/          the newest complete checkpoint (update 12 done)
        meta.json                 update, episodes, W&B run id, batch settings, the stage key it belongs to
        manifest.json             relative path, size and sha256 of every other file; written last
        policy/                   save_pretrained policy + tokenizer (plain `transformers` loads it)
        critic/                   save_pretrained critic (when there is one)
        accelerate/               `Accelerator.save_state`: prepared models, optimizers, schedulers, KL controller,
                                  score normaliser, RNG states of every process (torch, numpy, python, cuda)
      .tmp-checkpoint-000016/     a checkpoint being written (ignored, removed by the next save)

A kill at any moment leaves the previous `checkpoint-*` intact: the new one only becomes visible by an atomic
directory rename after every file in it was fsynced. Loading verifies the manifest first, so a file truncated or
changed later (a full disk, a copy cut short) refuses the checkpoint instead of resuming inexactly.
`Accelerator.save_state` handles DDP, FSDP and DeepSpeed (under FSDP, with the plugin's state_dict_type: sharded
`pytorch_model_fsdp_<i>/` and `optimizer_<i>/` directories, or whole files); `policy/` and `critic/` are always whole
weights (under FSDP gathered onto the main process first, `rlhf.ppo.sharding.full_state_dict`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf.common.manifest import build_manifest, fsync_dir, fsync_tree, manifest_problem
from rlhf.models.lora import merge_lora, merged_state_dict

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
META = "meta.json"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message is one line that says what to do."""


def checkpoint_root(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / CHECKPOINTS


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = checkpoint_root(stage_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    return done[-1] if done else None


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """meta.json of a checkpoint; CheckpointError when missing or unreadable."""
    try:
        meta = json.loads((checkpoint / META).read_text())
        int(meta["update"])
    except Exception as e:
        raise CheckpointError(_corrupt(checkpoint, e)) from None
    return meta


def read_resume_run_id(stage_dir: str | Path) -> str | None:
    """The W&B run id stored in the stage's newest checkpoint (None when there is none)."""
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is None:
        return None
    return read_meta(checkpoint).get("wandb_run_id")


def resumable_checkpoint(stage_dir: str | Path, key: str | None, quiet: bool = False) -> Path | None:
    """The newest checkpoint to resume from: verified whole (CheckpointError otherwise) and written for the stage
    key `key` (any key when None). A checkpoint of another key is not resumed: one log line says so (unless
    `quiet`: the pipeline asks before the stage, which says it once)."""
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is None:
        return None
    verify_checkpoint(checkpoint)
    written_for = read_meta(checkpoint).get("stage_key")
    if key is not None and written_for != key:
        if quiet:
            return None
        log.info(
            "%s was written for another config or upstream (key %s, now %s): starting over",
            checkpoint,
            written_for,
            key,
        )
        return None
    return checkpoint


def _corrupt(checkpoint: Path, error: BaseException | str) -> str:
    what = (
        error
        if isinstance(error, str)
        else f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0][:200]
    )
    return (
        f"checkpoint {checkpoint} is corrupt or incomplete ({what}); "
        "delete that directory to start over, or set ppo.resume=false"
    )


def verify_checkpoint(checkpoint: Path) -> None:
    """CheckpointError naming the first file that is missing or differs from the checkpoint's manifest."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(_corrupt(checkpoint, f"no readable {MANIFEST}: {type(e).__name__}")) from None
    problem = manifest_problem(checkpoint, manifest)
    if problem is not None:
        raise CheckpointError(_corrupt(checkpoint, problem))


@contextmanager
def _quiet():
    """Silence accelerate's per-file INFO lines and transformers' shard progress bars while saving or loading."""
    from transformers.utils import logging as hf_logging

    acc_logger = logging.getLogger("accelerate")
    level, bars = acc_logger.level, hf_logging.is_progress_bar_enabled()
    acc_logger.setLevel(logging.ERROR)  # incl. "removed shared tensor" for tied embeddings: expected
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        acc_logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    accelerator,
    stage_dir: str | Path,
    update: int,
    meta: dict[str, Any],
    pretrained: dict[str, tuple[Any, ...]],
) -> Path:
    """Write checkpoint-<update> atomically; every process must call this (each saves its RNG state).

    pretrained: name -> (model, tokenizer or None[, state_dict or None]), written with `save_pretrained` (main
    process only); a state_dict given is saved instead of the model's own (FSDP: the gathered whole weights).
    Returns the final directory. Older checkpoints and leftovers of killed saves are removed afterwards.
    """
    root = checkpoint_root(stage_dir)
    tmp = root / f"{TMP_PREFIX}{update:06d}"
    final = root / f"{PREFIX}{update:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet():
        accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _quiet():
            for name, (model, tokenizer, *state) in pretrained.items():
                model.save_pretrained(tmp / name, state_dict=state[0] if state else None)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / name)
        (tmp / META).write_text(json.dumps({**meta, "update": update}, indent=1))
        (tmp / MANIFEST).write_text(
            json.dumps(build_manifest(tmp, exclude=MANIFEST), indent=1)
        )  # last: it vouches for the rest
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in root.iterdir():
            if old != final and (old.name.startswith(PREFIX) or old.name.startswith(TMP_PREFIX)):
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path) -> dict[str, Any]:
    """Verify the manifest, then restore the prepared models, optimizers, registered objects and RNG states;
    return meta.json."""
    verify_checkpoint(checkpoint)
    meta = read_meta(checkpoint)
    try:
        with _quiet():
            accelerator.load_state(str(checkpoint / "accelerate"))
    except Exception as e:
        raise CheckpointError(_corrupt(checkpoint, e)) from None
    return meta


def check_settings(checkpoint: Path, meta: dict[str, Any], **settings: Any) -> None:
    """ValueError when the checkpoint was written with other batch settings than `settings` (name=value) of this run.
    A name missing from meta.json (a checkpoint from before it was recorded) makes no claim."""
    for key, mine in settings.items():
        if meta.get(key, mine) != mine:
            raise ValueError(
                f"checkpoint {checkpoint} was written with {key}={meta.get(key)}, this run has {mine}; "
                "use the same settings or set ppo.resume=false"
            )


def export_models(
    accelerator, directory: Path, models: dict[str, tuple[Any, dict | None]], tokenizer: Any
) -> None:
    """The trained models as plain `save_pretrained` directories a user loads with `transformers` alone: "policy"
    (LoRA merged) with the tokenizer at `directory`, every other name at `directory/<name>` (with it too).

    models: name -> (model, whole state dict or None). Every process calls it: under FSDP the state dict was gathered
    onto the main process (the module's own parameters are shards) and is merged from there; otherwise (None) peft
    merges the module in place, so call it once training is over.
    """
    if accelerator.is_main_process:
        for name, (model, state) in models.items():
            path = directory if name == "policy" else directory / name
            if state is None:
                merge_lora(model).save_pretrained(path)
            else:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                base.save_pretrained(path, state_dict=merged_state_dict(model, state))
            tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()
