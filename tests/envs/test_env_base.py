"""The TextEnv contract: episode protocol, clear errors, terminated vs truncated, label noise."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from gymnasium import spaces

import envs
from envs.base import TextEnv, bradley_terry_pair, label_accuracy_ceiling
from tests.helpers import NonFiniteRewardEnv


@pytest.fixture(params=envs.BUILTIN_IDS)
def env(request) -> TextEnv:
    made = envs.make(request.param)
    yield made
    made.close()


def test_make_returns_textenv_with_text_spaces(env: TextEnv):
    for space in (env.observation_space, env.action_space):
        assert isinstance(space, spaces.Text)
        assert space.min_length == 0
        assert " " in space.character_set
    assert env.spec is not None and env.env_id == env.spec.id


def test_reset_and_step_return_contract_types(env: TextEnv):
    obs, info = env.reset(seed=0)
    assert isinstance(obs, str) and obs in env.observation_space
    assert info == {"turn": 0}
    obs, reward, terminated, truncated, info = env.step(env.reference_action())
    assert type(reward) is float and math.isfinite(reward)
    assert type(terminated) is bool and type(truncated) is bool
    assert info["turn"] == 1 and "gold" in info


def test_step_before_reset_names_the_env(env: TextEnv):
    with pytest.raises(RuntimeError, match=rf"{env.env_id}: step\(\) called before reset\(\)"):
        env.step("1")


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (42, "action must be a str"),
        (b"bytes", "action must be a str"),
        ("\u20ac", "outside the charset: '\u20ac'"),
        ("\x07", re.escape("outside the charset: '\\x07'")),  # a control character: outside every charset
    ],
)
def test_bad_actions_are_refused_and_leave_the_episode_usable(env: TextEnv, action, message):
    env.reset(seed=3)
    with pytest.raises(ValueError, match=message) as err:
        env.step(action)
    assert env.env_id in str(err.value)
    *_, info = env.step(env.reference_action())
    assert info["turn"] == 1  # the refused reply did not count


def test_over_long_action_is_refused(env: TextEnv):
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match=rf"{env.env_id}: action has \d+ characters, more than max_action_length"
    ):
        env.step(
            "1" * (env.max_action_length + 1) if "1" in env.charset else "a" * (env.max_action_length + 1)
        )
    env.step(" " * env.max_action_length)  # exactly the limit is fine


def test_stepping_a_finished_episode_is_refused(env: TextEnv):
    env.reset(seed=0)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(env.reference_action())
        done = terminated or truncated
    with pytest.raises(RuntimeError, match=rf"{env.env_id}: step\(\) called after the episode ended"):
        env.step(env.reference_action())
    env.reset()  # and a new episode starts normally
    env.step(env.reference_action())


def test_errors_name_the_class_without_a_spec():
    from envs.arithmetic import ArithmeticEnv

    with pytest.raises(RuntimeError, match="ArithmeticEnv: step"):
        ArithmeticEnv().step("1")


def test_single_turn_terminates_and_never_truncates():
    env = envs.make("rlhf/Review-v0")
    env.reset(seed=0)
    obs, _, terminated, truncated, _ = env.step("")
    assert (obs, terminated, truncated) == ("", True, False)


def test_multi_turn_truncates_at_max_turns_and_keeps_terminated_apart():
    env = envs.make("rlhf/GuessNumber-v0")
    env.reset(seed=0, options={"secret": 16})
    for turn in range(1, env.max_turns + 1):
        obs, reward, terminated, truncated, info = env.step("1")
        assert obs == "higher" and reward == 0.0 and not terminated
        assert truncated is (turn == env.max_turns)
        assert info["turn"] == turn
    with pytest.raises(RuntimeError, match="ended \\(truncated at turn 6\\)"):
        env.step("2")


def test_non_finite_reward_is_an_error_naming_the_env():
    class InfinityEnv(NonFiniteRewardEnv):
        reward = math.inf

    env = InfinityEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="InfinityEnv: reward inf at turn 1 is not finite"):
        env.step("a")


def test_subclass_mistakes_are_value_errors():
    class NoCharset(TextEnv):
        max_action_length = 4
        max_observation_length = 4

    class NoSpace(TextEnv):
        charset = "ab"
        max_action_length = 4
        max_observation_length = 4

    with pytest.raises(ValueError, match="set the class attribute `charset`"):
        NoCharset()
    with pytest.raises(ValueError, match="charset must include ' '"):
        NoSpace()


def test_make_and_env_class_reject_unknown_ids():
    with pytest.raises(ValueError, match="no environment registered as 'rlhf/Nope-v0'"):
        envs.env_class("rlhf/Nope-v0")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg_xyz.module'"):
        envs.make("no_such_pkg_xyz.module:Env-v0")


def test_env_class_gives_classmethods_without_an_instance():
    from envs.review import ReviewEnv

    assert envs.env_class("rlhf/Review-v0") is ReviewEnv
    assert envs.env_class("envs:rlhf/Review-v0") is ReviewEnv


def test_bradley_terry_labels_follow_the_sigmoid():
    rng = np.random.default_rng(0)
    rows = [bradley_terry_pair(rng, "p", "a", "b", 0.6, 0.5, temperature=0.1) for _ in range(4000)]
    rate = np.mean([r["chosen"] == "a" for r in rows])
    assert abs(rate - 1 / (1 + math.exp(-1.0))) < 0.03  # sigmoid(0.1 / 0.1) = 0.731
    assert all({r["chosen"], r["rejected"]} == {"a", "b"} and r["prompt"] == "p" for r in rows)


def test_label_accuracy_ceiling():
    assert label_accuracy_ceiling([0.0], 0.1) == pytest.approx(0.5)
    assert label_accuracy_ceiling([1.0, -1.0], 0.25) == pytest.approx(1 / (1 + math.exp(-4)))


def test_observation_outside_the_space_is_an_error_naming_the_env():
    class Loud(TextEnv):
        charset = "ab "
        max_action_length = 4
        max_observation_length = 4

        def _reset(self, options):
            return "ABBA", {}

    with pytest.raises(ValueError, match="Loud: observation 'ABBA' .* does not fit the observation space"):
        Loud().reset(seed=0)
