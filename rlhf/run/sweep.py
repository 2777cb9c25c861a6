"""What a Hydra multirun varies: its swept keys and each job's values of them. The pipeline names W&B runs and
fills their `swept` config columns with them; the sweep report makes one column of each."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf")

MULTIRUN_RECORD = "multirun.yaml"
"""The sweep's composed config, with the command line's overrides (Hydra's basic sweeper writes it; the report's
callback writes it for sweepers that do not, such as Optuna)."""


def override_values(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["ppo.kl_coef=0.02", "+task.x=1"]` -> `{"ppo.kl_coef": "0.02", "task.x": "1"}`: key -> value as typed."""
    values = {}
    for override in overrides:
        key, sep, value = str(override).partition("=")
        if sep:
            values[key.lstrip("+~")] = value
    return values


def declared_keys(sweep_dir: Path, sweeper_params: Any = None) -> frozenset[str]:
    """The keys the sweep was asked to vary: its sweep overrides (`ppo.kl_coef=0.02,0.1`, `seed=range(3)`,
    `interval(...)`) as recorded in multirun.yaml, and the sweeper's `params` (a sweep preset's)."""
    keys = {str(k) for k in (sweeper_params or {})}
    path = Path(sweep_dir) / MULTIRUN_RECORD
    if path.exists():
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser
            from omegaconf import OmegaConf

            task = [str(o) for o in OmegaConf.load(path).hydra.overrides.task]
            keys |= {
                o.key_or_group
                for o in OverridesParser.create().parse_overrides(task)
                if o.is_sweep_override()
            }
        except Exception as e:  # a hand-edited or foreign multirun.yaml: callers fall back to the overrides
            log.debug("%s not read: %s", path, e)
    return frozenset(k.lstrip("+~") for k in keys)


def swept_values(
    overrides: list[str] | tuple[str, ...], keys: frozenset[str] | None = None
) -> dict[str, str]:
    """A job's values of the swept `keys` (every override when the keys are unknown)."""
    values = override_values(overrides)
    return values if keys is None else {k: v for k, v in values.items() if k in keys}
