"""Stage keys: one hash per stage of everything its output depends on, so a finished output is reused only for the
config that made it.

key(stage) = sha256 of (the stage's name, this package's version and source, the training libraries' versions,
the stage's own config -- the sections and fields its registry entry declares, minus those that change only logging
or checkpoint cadence -- and the keys of the base model and of the upstream stages it reads). A change anywhere upstream therefore changes every key
downstream. Local files and directories named in the config (datasets, model paths) enter by content: a file by
its sha256, a directory by its files' names, sizes and modification times.

The pipeline records each finished stage's key in summary.json and the PPO stage stores its key in every
checkpoint; the stage cache (`rlhf.stage_cache`) files finished stages under the same keys, so the jobs of a sweep
reuse each other's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rlhf.stages import BASE, BASE_CONFIG, BASE_IGNORED, REGISTRY

PATH_FIELDS = (
    "model.name_or_path",
    "sft.dataset",
    "reward.dataset",
    "reward.init_from",
    "ppo.policy_path",
    "ppo.reward_model_path",
)
"""Settings that name a local file or directory: hashed by content (see `fingerprint`)."""


@dataclass(frozen=True)
class StageKey:
    key: str
    """16 hex digits."""
    config: dict[str, Any]
    """The stage's own config that went into the key: flat, dotted names (shown when a key changes)."""


SOURCE_DIRS = ("rlhf", "envs", "conf")
"""This project's code and configs: a stage key changes with them."""
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft")
"""Libraries whose version can change a stage's output."""


@cache
def package_version() -> str:
    """This package's version, a hash of its source and the training libraries' versions: an output made by other
    code is never reused, also in a development checkout whose version number does not change."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((root / d).rglob("*")):
            if p.suffix in (".py", ".yaml", ".jinja") and "__pycache__" not in p.parts:
                h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    libraries = ",".join(f"{name}=={installed(name)}" for name in LIBRARIES)
    return f"{installed('rlhf')}+src.{h.hexdigest()[:12]} {libraries}"


def plain_config(cfg: Any) -> dict[str, Any]:
    """A config (OmegaConf or dataclass) as plain nested containers."""
    import dataclasses

    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def select(flat: dict[str, Any], sections: tuple[str, ...], ignored: tuple[str, ...]) -> dict[str, Any]:
    """The flat config entries under `sections`, without those under `ignored`, local paths replaced by their
    fingerprints. (No stage lists `logger`, `stages` or `num_threads`: they never change what a stage writes.)"""
    out = {}
    for name, value in flat.items():
        if _under(name, sections) and not _under(name, ignored):
            out[name] = fingerprint(value) if name in PATH_FIELDS and value else value
    return out


def fingerprint(location: str) -> str:
    """A local file as `path sha256:<16 hex>`, a local directory as `path files:<16 hex>` (names, sizes and
    modification times of its files); anything else (a hub id) unchanged."""
    path = Path(str(location)).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            return f"{location} sha256:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            st = p.stat()
            h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return f"{location} files:{h.hexdigest()[:16]}"
    return str(location)


def make_key(name: str, config: dict[str, Any], upstream: dict[str, str]) -> str:
    """The hash of a stage's name, the package version, its config and its upstream keys."""
    payload = {"stage": name, "version": package_version(), "config": config, "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Any) -> dict[str, StageKey]:
    """The key of the base model and of every stage under `cfg` (whether or not it runs), chained upstream."""
    flat = flatten(plain_config(cfg))
    base_config = select(flat, BASE_CONFIG, BASE_IGNORED)
    keys = {BASE: StageKey(make_key(BASE, base_config, {}), base_config)}
    for name, stage in REGISTRY.items():
        config = select(flat, stage.config, stage.ignored)
        upstream = {BASE: keys[BASE].key, **{u: keys[u].key for u in stage.reads(cfg)}}
        keys[name] = StageKey(make_key(name, config, upstream), config)
    return keys


def changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """`seed 0 -> 1, model.hidden_size 64 -> 128`: what differs between two recorded stage configs."""
    names = sorted(set(old) | set(new))
    diffs = [
        f"{n} {old.get(n, '(unset)')} -> {new.get(n, '(unset)')}" for n in names if old.get(n) != new.get(n)
    ]
    if len(diffs) > limit:
        diffs = [*diffs[:limit], f"{len(diffs) - limit} more"]
    return ", ".join(diffs)
