"""Reading W&B runs back from their local `.wandb` files: what `wandb sync` would upload, without a network.

wandb ships no Python reader for `.wandb` files; the format is LevelDB's log format: a 7-byte file header (":W&B",
magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each chunk a 7-byte header (crc32, length, type:
FULL/FIRST/MIDDLE/LAST) and its data; a record is one protobuf `Record`. Online runs keep the same file locally
(`wandb/run-*/run-<id>.wandb`), so everything here works for both modes.

Used by tests (what did a stage log?) and by a resumed stage (which steps did the killed process already write?).
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from pathlib import Path
from typing import Any

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: Path, strict: bool = True):
    """Yield `wandb_internal_pb2.Record` messages from a `.wandb` file, checking each chunk's crc32.

    strict=False reads the file of a killed process: it stops quietly at a torn or corrupt tail.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size and not strict:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        if (
            not strict
        ):  # a killed process may leave a file whose header was never written (preallocated zeros)
            return
        raise ValueError(f"{path} is not a W&B transaction log (header {ident!r} {magic:#x})")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # trailer padding: the next chunk starts on the next block
            pos += left_in_block
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:  # zero padding (block tail or preallocated end of file)
            pos += left_in_block
            continue
        start = pos + _CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:
            break  # truncated tail of a run still being written
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            if not strict:
                return
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos = start + length
        if kind == _FULL:
            pending = b""
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        elif kind == _LAST:
            payload, pending = pending + chunk, b""
        else:
            if not strict:
                return
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # protobuf's DecodeError: a record torn by a kill, although its chunk checksum held
            if not strict:
                return
            raise
        yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _item_value(item) -> Any:
    try:
        return json.loads(item.value_json)
    except (json.JSONDecodeError, AttributeError):
        return item.value_json


def find_wandb_file(path: str | Path) -> Path:
    """The `.wandb` file of an offline run directory (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("*.wandb")) or sorted(path.glob("run-*/*.wandb"))
    if len(files) != 1:
        raise ValueError(
            f"expected one .wandb file in {path}, found {len(files)}; pass one offline-run-* directory"
        )
    return files[0]


def find_offline_runs(run_dir: str | Path) -> list[Path]:
    """Every W&B run directory (offline-run-* / run-*) under a pipeline's run directory, oldest first."""
    return sorted({p.parent for p in Path(run_dir).rglob("*.wandb")}, key=lambda p: p.name)


def _finished_records(path: Path, wait_seconds: float) -> list:
    """The file's records, waiting up to `wait_seconds` for its final `exit` record: wandb-core may still be
    flushing the log for a moment after `run.finish()` returns, especially on a busy machine."""
    deadline = time.monotonic() + wait_seconds
    while True:
        records = list(iter_records(path))
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() >= deadline:
            return records
        time.sleep(0.1)


def read_offline_run(run_dir_of_wandb: str | Path, wait_seconds: float = 30.0) -> dict[str, Any]:
    """Parse an offline W&B run: what a `wandb sync` would upload.

    Returns `{"run": {id, project, group, job_type, name}, "config": {...}, "history": [row, ...],
    "summary": {...}, "artifacts": [{name, type}, ...]}`; each history row maps metric keys (and `_step`) to values.
    A run that is still being written is read as far as it goes once `wait_seconds` have passed.
    """
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "artifacts": []}
    for record in _finished_records(find_wandb_file(run_dir_of_wandb), wait_seconds):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out["run"] = {
                "id": r.run_id,
                "project": r.project,
                "group": r.run_group,
                "job_type": r.job_type,
                "name": r.display_name,
                "tags": list(r.tags),
            }
            for item in r.config.update:
                out["config"][_item_key(item)] = _item_value(item)
        elif kind == "config":
            for item in record.config.update:
                out["config"][_item_key(item)] = _item_value(item)
        elif kind == "history":
            row = {_item_key(item): _item_value(item) for item in record.history.item}
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_item_key(item)] = _item_value(item)
        elif kind == "artifact":
            out["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type})
    # Config values come as {"value": v, "desc": ...}: unwrap them.
    out["config"] = {
        k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in out["config"].items()
    }
    out["history"] = [row for row in out["history"] if any(not k.startswith("_") for k in row)]
    return out


def history_values(run: dict[str, Any], key: str) -> list[float]:
    """Every logged value of `key` in a run read by `read_offline_run` (finite numbers only)."""
    values = [row[key] for row in run["history"] if key in row]
    return [v for v in values if isinstance(v, int | float) and math.isfinite(v)]


def logged_steps(run_dir: str | Path, run_id: str, exclude: str | Path | None = None) -> set[int]:
    """Steps with metrics that earlier processes of the W&B run `run_id` wrote under `run_dir` (its `.wandb` files,
    read as far as they go: a killed process leaves a torn tail), except the files under `exclude`."""
    steps: set[int] = set()
    skip = Path(exclude).resolve() if exclude is not None else None
    for path in Path(run_dir).rglob(f"run-{run_id}.wandb"):
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        for record in iter_records(path, strict=False):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {_item_key(item): _item_value(item) for item in record.history.item}
            if "_step" in row and any(not k.startswith("_") for k in row):
                steps.add(int(row["_step"]))
    return steps
