"""The `rlhf` command: Hydra composes `conf/` over the dataclass schemas and hands the config to the pipeline."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlhf.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""`conf/` beside the `rlhf` package (the repository, or site-packages for a wheel install)."""

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rlhf import pipeline

    try:
        pipeline.run(cfg)
    except pipeline.InputError as e:  # a user mistake found before training: one line, no traceback
        raise SystemExit(f"rlhf: error: {e}") from None


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
