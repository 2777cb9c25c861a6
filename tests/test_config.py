"""Every primary config and every group option composes over the schemas; bad keys, types and values fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rlhf.cli import CONF_DIR, compose
from rlhf.common.stage_names import STAGES
from rlhf.config import RLHFConfig
from rlhf.run.pipeline import InputError, run
from rlhf.run.validation import select_stages, validate

GROUPS = sorted(
    p.name
    for p in Path(CONF_DIR).iterdir()
    if p.is_dir()
    and not p.name.startswith("_")
    and p.name not in ("experiment", "sweep")  # presets: experiment below, sweep in test_sweeps.py
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_primary_config_composes_to_the_schema():
    cfg = compose()
    assert OmegaConf.get_type(cfg) is RLHFConfig
    assert cfg.task.env_id == "rlhf/Review-v1" and cfg.model.name_or_path is None
    assert list(cfg.stages) == list(STAGES) and cfg.logger.mode == "offline"
    assert not OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "hf"):
        overrides.append("model.name_or_path=some/model")
    cfg = compose(overrides)
    assert OmegaConf.get_type(cfg[group]).__name__.endswith("Config")
    assert not OmegaConf.missing_keys(cfg)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_presets_set_task_and_ppo(name):
    cfg = compose([f"experiment={name}"])
    task = OmegaConf.load(Path(CONF_DIR) / "task" / f"{name}.yaml")
    assert cfg.task.env_id == task.env_id
    expected_source = "model" if name == "review" else "env"  # verifiable tasks train on the env's reward
    assert cfg.ppo.reward_source == expected_source


@pytest.mark.parametrize(
    "override,needle",
    [
        ("sft.learnin_rate=1e-3", "sft.learnin_rate"),  # unknown key
        ("sft.learning_rate=fast", "sft.learning_rate"),  # wrong type
        ("seed=zero", "seed"),
        ("model.lora.r=two", "model.lora.r"),
        ("task=nosuchtask", "task"),  # unknown option
    ],
)
def test_bad_overrides_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    message = str(err.value) + str(err.value.__cause__)
    assert needle in message


def test_missing_required_value_fails_before_work(tmp_path):
    cfg = compose(["task.env_id=???"])
    with pytest.raises(InputError, match="missing required value: task.env_id"):
        run(cfg, run_dir=tmp_path / "run")
    cfg = compose(["model=hf"])
    with pytest.raises(InputError, match="model=hf needs model.name_or_path"):
        run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "base").exists()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("stages=[sft,rl]", "stages: unknown rl"),
        ("stages=[]", "stages is empty"),
        ("device=tpu", "device='tpu'"),
        ("logger.backend=mlflow", "logger.backend='mlflow'"),
        ("logger.mode=sometimes", "logger.mode='sometimes'"),
        ("model.dtype=fp8", "model.dtype='fp8'"),
        ("model.dtype=float16", "float16 needs a GPU"),
        ("task.env_id=rlhf/Nope-v0", "task.env_id=rlhf/Nope-v0"),
    ],
)
def test_enum_like_values_are_checked(override, needle):
    if override == "model.dtype=float16":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("float16 is fine with a GPU")
    with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
        validate(compose([override]))


def test_stages_run_in_pipeline_order():
    assert select_stages(compose(["stages=[reward,sft]"])) == ["sft", "reward"]
