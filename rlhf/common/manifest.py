"""Directories that vouch for themselves: a manifest of every file's size and sha256, written last, and an atomic,
durable publication (fsync every file, then rename the directory into place).

PPO checkpoints (`rlhf.ppo.checkpoint`) and stage-cache entries (`rlhf.run.stage_cache`) are both published this way,
so a kill at any moment leaves either the old directory or the complete new one, and a file truncated or changed
later is found before anything loads it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_manifest(root: Path, exclude: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `root` but `exclude` (the manifest's own name)."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != exclude)
    return {
        p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files
    }


def manifest_problem(root: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    """What is wrong with `root` against its manifest (the first missing or differing file), or None."""
    for rel, expected in manifest.items():
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{rel} has {size} bytes, the manifest {expected['size']}"
        if file_sha256(path) != expected["sha256"]:
            return f"{rel} differs from its sha256 in the manifest"
    return None


def fsync_tree(path: Path) -> None:
    """fsync every file, then every directory bottom-up, so a rename publishes durable contents."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync directories
        pass
    finally:
        os.close(fd)
