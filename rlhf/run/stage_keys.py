"""Stage keys: one hash per stage of everything its output depends on, so a finished output is reused only for the
config that made it.

key(stage) = sha256 of (the stage's name, this package's version and source, the training libraries' versions,
the stage's own config -- the sections and fields its registry entry declares, minus those that change only logging
or checkpoint cadence -- and the keys of the base model and of the upstream stages it reads). A change anywhere
upstream therefore changes every key downstream.

What a stage reads from outside this package enters its config under readable names (`key_inputs`), so that the
log line of a changed key names it (`task.env_id.source my_pkg sha256:ab12.. -> my_pkg sha256:cd34..`):

- local files and directories named in the config (datasets, model paths, any string of `task.env_kwargs` that is
  an existing path) by content: a file by its sha256, a directory by its files' names, sizes and modification times;
- a hub model id (`model.name_or_path`) with the commit of its snapshot in the local Hugging Face cache
  (`org/model rev:<commit>`; looked up on disk, never on the network; the id alone when it is not cached);
- `task.env_id.source`: the code of the environment -- the module the id names (`pkg.module:Name-v0`) and the one
  its entry point is in -- as the sha256 of every .py file of its top-level package (an installed third-party
  package by its version instead; this package's own environments are covered by its source already);
- `task.env_id.library`: the installed version of the library an adapter wraps (`envs.ADAPTER_IDS`:
  reasoning-gym, textarena, skyrl-gym), also for a user's subclass of an adapter;
- `task.rubric.<name>.function.source`: the code of a rubric's `pkg.module:function`, as the environment's. It is
  under `task.rubric`, which only PPO and evaluation depend on.

The pipeline records each finished stage's key in summary.json and the PPO stage stores its key in every
checkpoint; the stage cache (`rlhf.run.stage_cache`) files finished stages under the same keys, so the jobs of a sweep
reuse each other's.
"""

from __future__ import annotations

import hashlib
import importlib.util
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


PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The directory that holds `rlhf/`, `envs/` and `conf/` (the repository, or site-packages for a wheel install)."""
SOURCE_DIRS = ("rlhf", "envs", "conf")
"""This project's code and configs, under PROJECT_ROOT: a stage key changes with them."""
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft", "gymnasium")
"""Libraries whose version can change a stage's output."""


@cache
def package_version() -> str:
    """This package's version, a hash of its source and the training libraries' versions: an output made by other
    code is never reused, also in a development checkout whose version number does not change."""
    h = hashlib.sha256()
    for d in SOURCE_DIRS:
        for p in sorted((PROJECT_ROOT / d).rglob("*")):
            if p.suffix in (".py", ".yaml", ".jinja") and "__pycache__" not in p.parts:
                h.update(p.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    libraries = ",".join(f"{name}=={_installed(name)}" for name in LIBRARIES)
    return f"{_installed('rlhf')}+src.{h.hexdigest()[:12]} {libraries}"


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


def select(inputs: dict[str, Any], sections: tuple[str, ...], ignored: tuple[str, ...]) -> dict[str, Any]:
    """The entries of `inputs` (see `key_inputs`) under `sections`, without those under `ignored`. (No stage lists
    `logger`, `stages` or `num_threads`: they never change what a stage writes.)"""
    return {name: v for name, v in inputs.items() if _under(name, sections) and not _under(name, ignored)}


def key_inputs(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat config as stage keys see it: local paths replaced by their fingerprints, a hub model id by its cached
    revision, plus what the config names outside this package (the environment's and rubric functions' code, an
    adapter's library) under `<field>.source` / `<field>.library` (module docstring)."""
    out = {}
    for name, value in flat.items():
        if name in PATH_FIELDS and value:
            value = fingerprint(value)
            if name == "model.name_or_path" and value == str(flat[name]):
                value = hub_revision(value)
        elif _under(name, ("task.env_kwargs",)):
            value = _local_paths(value)
        out[name] = value
    env_id = flat.get("task.env_id")
    if isinstance(env_id, str) and env_id:
        out.update({f"task.env_id.{k}": v for k, v in env_code(env_id).items()})
    for name, value in flat.items():
        rubric = name.removesuffix(".function")
        if (
            _under(name, ("task.rubric",))
            and rubric != name
            and value
            and flat.get(f"{rubric}.kind") == "function"
        ):
            source = code_source([str(value).partition(":")[0]])
            if source:
                out[f"{name}.source"] = source
    return out


def _local_paths(value: Any) -> Any:
    """A string naming an existing local file or directory as its fingerprint (in lists too); anything else as is."""
    if isinstance(value, list):
        return [_local_paths(v) for v in value]
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return fingerprint(value)
    return value


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


def hub_revision(model_id: str) -> str:
    """`org/model rev:<commit>`: the commit that the local Hugging Face cache's `refs/main` of a hub model points to
    (what loading the id offline gives); the id alone when it is not cached. Never touches the network."""
    from huggingface_hub import constants

    if model_id.count("/") > 1 or ".." in model_id:
        return model_id
    ref = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return model_id
    return f"{model_id} rev:{commit}" if commit else model_id


def env_code(env_id: str) -> dict[str, str]:
    """{"source": ..., "library": ...} of the environment behind `env_id`, each only when it has one (see the module
    docstring). The environment's module is imported (once per process: Gymnasium and validation import it anyway);
    an id that does not resolve is keyed by the module it names alone (validation reports the error)."""
    import envs

    module, _, _ = env_id.rpartition(":")
    modules = [module] if module else []
    library = None
    try:
        creator = envs.env_class(env_id)
    except Exception:  # validation says what is wrong with the id; a key needs only what resolves
        creator = None
    if creator is not None:
        modules.append(getattr(creator, "__module__", None) or "")
        for adapter_id, distribution in envs.ADAPTER_IDS.items():
            adapter = envs.env_class(adapter_id)
            if isinstance(creator, type) and issubclass(creator, adapter):
                library = f"{distribution}=={_installed(distribution)}"
    found = {"source": code_source(modules), "library": library}
    return {k: v for k, v in found.items() if v}


def code_source(modules: list[str]) -> str | None:
    """The code of `modules`' top-level packages: `pkg sha256:<16 hex>` (every .py file of the package), or
    `dist==version` for a package installed in site-packages; several joined by ", ". None when all of them are part
    of this project (already in `package_version`) or cannot be found."""
    parts = {_package_source(m.split(".")[0]) for m in modules if m}
    return ", ".join(sorted(p for p in parts if p)) or None


def _package_source(top: str) -> str | None:
    try:
        spec = importlib.util.find_spec(top)  # imports nothing for a top-level name
    except (ImportError, ValueError):
        spec = None
    if spec is None or (not spec.has_location and not spec.submodule_search_locations):
        return None  # not found, built-in or frozen
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] or [Path(str(spec.origin))]
    roots = [r.resolve() for r in roots]
    if all(any(r.is_relative_to(PROJECT_ROOT / d) for d in SOURCE_DIRS) for r in roots):
        return None  # this project's own code: in package_version
    if any(part in ("site-packages", "dist-packages") for r in roots for part in r.parts):
        distributions = _distributions().get(top)
        if distributions:
            return ",".join(f"{d}=={_installed(d)}" for d in sorted(set(distributions)))
    h = hashlib.sha256()
    for root in roots:
        if root.is_dir():
            files = {p.relative_to(root).as_posix(): p for p in root.rglob("*.py")}
            files = {
                rel: p
                for rel, p in files.items()
                if not any(q.startswith((".", "__pycache__")) for q in rel.split("/"))
            }
        else:
            files = {root.name: root}
        for rel, p in sorted(files.items()):
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return f"{top} sha256:{h.hexdigest()[:16]}"


@cache
def _distributions() -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    return packages_distributions()


def _installed(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def make_key(name: str, config: dict[str, Any], upstream: dict[str, str]) -> str:
    """The hash of a stage's name, the package version, its config and its upstream keys."""
    payload = {"stage": name, "version": package_version(), "config": config, "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_keys(cfg: Any) -> dict[str, StageKey]:
    """The key of the base model and of every stage under `cfg` (whether or not it runs), chained upstream."""
    inputs = key_inputs(flatten(plain_config(cfg)))
    base_config = select(inputs, BASE_CONFIG, BASE_IGNORED)
    keys = {BASE: StageKey(make_key(BASE, base_config, {}), base_config)}
    for name, stage in REGISTRY.items():
        config = select(inputs, stage.config, stage.ignored)
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
