"""The `rlhf` command: Hydra composes `conf/` over the dataclass schemas and hands the config to the pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from rlhf.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""`conf/` beside the `rlhf` package (the repository, or site-packages for a wheel install)."""

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from rlhf import pipeline

    try:
        pipeline.run(cfg)
    except pipeline.InputError as e:  # a user mistake found before training: one line, no traceback
        raise SystemExit(f"rlhf: error: {e}") from None


def main() -> None:
    """`rlhf <overrides>`: every user error is one line, `rlhf: error: ...`, Hydra's (unknown key, wrong type,
    unknown option, malformed override) included; any other failure keeps its full traceback."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing a multi-line report
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as e:
        raise SystemExit(f"rlhf: error: {one_line(e)}") from None


def one_line(error: BaseException) -> str:
    """Hydra's message and its cause's, on one line: `Error merging override ppo.batch_size=abc: Value 'abc' of
    type 'str' could not be converted to Integer (full_key: ppo.batch_size)`."""
    parts = [str(error)]
    if error.__cause__ is not None and str(error.__cause__) not in parts[0]:
        parts.append(str(error.__cause__))
    text = ": ".join(p.strip() for p in parts if p.strip()).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keys = [line for line in lines if line.startswith("full_key:") and line != "full_key:"]
    head = [line for line in lines if "=" not in line.split(" ")[0] and not line.startswith("full_key:")]
    return " ".join(head) + (f" ({keys[0]})" if keys else "")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The config `rlhf <overrides>` would run, without Hydra's app machinery (tests, notebooks, benchmarks).

    Pass it to `rlhf.pipeline.run(cfg, run_dir=...)`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="rlhf"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


if __name__ == "__main__":
    main()
