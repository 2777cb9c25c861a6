"""Stage keys: which settings change which stage's key, chained through the stages each one reads."""

from __future__ import annotations

import pytest

from rlhf.cli import compose
from rlhf.stage_keys import changes, fingerprint, stage_keys

ALL = ("base", "sft", "reward", "ppo", "evaluate")


def changed(overrides: list[str], base: list[str] | None = None) -> set[str]:
    """The stages whose key differs between `base` and `base + overrides`."""
    before = stage_keys(compose(base or []))
    after = stage_keys(compose([*(base or []), *overrides]))
    return {name for name in ALL if before[name].key != after[name].key}


def test_the_same_config_gives_the_same_keys():
    a, b = stage_keys(compose(["seed=3"])), stage_keys(compose(["seed=3"]))
    assert {n: k.key for n, k in a.items()} == {n: k.key for n, k in b.items()}
    assert all(len(k.key) == 16 for k in a.values()) and len({k.key for k in a.values()}) == 5


@pytest.mark.parametrize(
    "override",
    [
        "logger=none",
        "logger.project=other",
        "num_threads=2",
        "stages=[sft]",
        "sft.logging_steps=1",
        "reward.logging_steps=1",
        "ppo.log_every=5",
        "ppo.samples_every=1",
        "ppo.save_every=1",
        "ppo.resume=false",
        "ppo.critic_process=true",  # a checkpoint of either resumes in the other (tests/ppo/test_critic_process.py)
    ],
)
def test_logging_and_cadence_settings_change_no_key(override):
    assert changed([override]) == set()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=1", set(ALL)),
        ("model.hidden_size=32", set(ALL)),
        ("task=arithmetic", set(ALL)),
        ("model.dtype=bfloat16", {"sft", "reward", "ppo", "evaluate"}),  # not the base model's weights
        ("sft.learning_rate=0.01", {"sft", "reward", "ppo", "evaluate"}),
        ("task.num_demonstrations=10", {"sft", "reward", "ppo", "evaluate"}),
        ("task.num_preferences=10", {"reward", "ppo", "evaluate"}),
        ("reward.learning_rate=0.01", {"reward", "ppo", "evaluate"}),
        ("ppo.kl_coef=0.1", {"ppo", "evaluate"}),
        ("ppo.total_episodes=128", {"ppo", "evaluate"}),  # another learning-rate schedule
        ("evaluate.num_prompts=8", {"evaluate"}),
    ],
)
def test_a_setting_changes_its_stage_and_every_stage_that_reads_it(override, expected):
    assert changed([override]) == expected


def test_a_stage_given_a_path_no_longer_depends_on_the_stage_it_replaces(tmp_path):
    paths = [f"ppo.policy_path={tmp_path / 'policy'}", f"ppo.reward_model_path={tmp_path / 'rm'}"]
    assert changed(["sft.learning_rate=0.01"], base=paths) == {"sft", "reward"}
    assert changed(["reward.init_from=/some/model"]) == {"reward", "ppo", "evaluate"}


def test_local_files_enter_by_content(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"text": "a"}\n')
    before = stage_keys(compose([f"sft.dataset={data}"]))
    data.write_text('{"text": "b"}\n')
    after = stage_keys(compose([f"sft.dataset={data}"]))
    assert before["sft"].key != after["sft"].key and before["base"].key == after["base"].key
    assert fingerprint(str(data)).startswith(f"{data} sha256:")
    assert fingerprint("org/hub-model") == "org/hub-model"


def test_changes_name_what_differs():
    assert changes({"seed": 0, "a": 1}, {"seed": 1, "a": 1}) == "seed 0 -> 1"
    assert changes({}, {"b": 2}) == "b (unset) -> 2"
    assert changes({f"k{i}": 0 for i in range(5)}, {f"k{i}": 1 for i in range(5)}).endswith("2 more")
