"""A stage cache shared by the jobs of a sweep: a stage's output is trained once per stage key and reused by every
job (and every later run) whose key is the same.

Layout under the cache directory (`cache_dir`; by default `<sweep dir>/.stage_cache` in a multirun)::

    sft-<key>/                 one published entry
      artifact/                a copy of the stage's output directory (without PPO's resumable checkpoints)
      entry.json               the stage's summary.json entry, where it was made, and the manifest of artifact/;
                               written last
    sft-<key>.lock             held (flock) by the job that checks for, trains or publishes that entry
    .tmp-sft-<key>-<pid>/      an entry being written (ignored; removed by the next publisher)

A key is `rlhf.run.stage_keys`' hash of the stage's config, its upstream keys and the package's version and source, so
an entry is reused only for the config that made it. Parallel jobs that need the same stage take its lock in turn:
the first trains and publishes, the others wait and then reuse. An entry becomes visible only by an atomic rename
after every file was fsynced, and it is verified against its manifest (sizes and sha256) before each use: a corrupt
or partial entry is removed and the stage runs again, never loaded.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.common.manifest import build_manifest, fsync_dir, fsync_tree, manifest_problem

if TYPE_CHECKING:
    from rlhf.config import RLHFConfig

log = logging.getLogger("rlhf")

CACHE_IN_SWEEP = ".stage_cache"
"""The default stage cache of a multirun, under its sweep directory."""
ENTRY = "entry.json"
ARTIFACT = "artifact"
TMP_PREFIX = ".tmp-"
NOT_CACHED = ("checkpoints",)
"""Parts of a stage's output directory that only a resumed run of the same directory needs."""


def cache_root(cfg: RLHFConfig, sweep_dir: Path | None) -> Path | None:
    """The stage cache's directory: `cache_dir`, else the sweep's `.stage_cache` in a multirun; None when off."""
    if not cfg.cache:
        return None
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return sweep_dir / CACHE_IN_SWEEP if sweep_dir is not None else None


class StageCache:
    """The cache under `root`; every method is safe against other processes using the same root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def entry_dir(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}"

    @contextmanager
    def hold(self, stage: str, key: str) -> Iterator[None]:
        """Hold the entry's lock for the body (waiting, with a log line, while another job holds it). The lock is
        released however the holder exits, kill -9 included."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f"{stage}-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another job"
                log.info(
                    "%s: waiting for %s, which is making the cached entry %s-%s", stage, holder, stage, key
                )
                start = time.perf_counter()
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("%s: waited %.0fs for the cache entry", stage, time.perf_counter() - start)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The published entry's record (with "artifact" pointing into the cache), or None. A corrupt or partial
        entry is removed (call this while holding the entry's lock)."""
        entry_dir = self.entry_dir(stage, key)
        if not entry_dir.exists():
            return None
        try:
            record = json.loads((entry_dir / ENTRY).read_text())
            problem = (
                f"its key is {record.get('key')}"
                if record.get("key") != key
                else manifest_problem(entry_dir / ARTIFACT, record["manifest"])
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"no readable {ENTRY} ({type(e).__name__})"
        if problem is not None:
            log.warning(
                "%s: cache entry %s is corrupt or partial (%s): removing it", stage, entry_dir, problem
            )
            shutil.rmtree(entry_dir, ignore_errors=True)
            return None
        record.pop("manifest")
        return {**record, "artifact": str(entry_dir / ARTIFACT)}

    def publish(self, stage: str, key: str, output_dir: Path, record: dict[str, Any]) -> Path:
        """Copy a finished stage's output into the cache with `record` (its summary.json entry) and return the
        entry's directory. Call this while holding the entry's lock."""
        final = self.entry_dir(stage, key)
        tmp = self.root / f"{TMP_PREFIX}{stage}-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for old in self.root.glob(f"{TMP_PREFIX}{stage}-{key}-*"):  # left by a killed publisher
            shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(output_dir, tmp / ARTIFACT, ignore=shutil.ignore_patterns(*NOT_CACHED))
        manifest = build_manifest(tmp / ARTIFACT, exclude="")
        entry = {**record, "key": key, "stage": stage, "made_in": str(output_dir), "manifest": manifest}
        (tmp / ENTRY).write_text(json.dumps(entry, indent=1))  # last: it vouches for the rest
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(self.root)
        return final
