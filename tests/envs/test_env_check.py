"""`python -m envs.check`: passes the built-ins, fails broken environments with a clear line."""

from __future__ import annotations

import random
import subprocess
import sys

import gymnasium
import pytest

import envs
from envs.base import TextEnv
from envs.check import NEEDS_DATA, main
from tests.helpers import NanEnv, NonFiniteRewardEnv


class UnseededEnv(TextEnv):
    """Draws from Python's global `random` instead of `self.np_random`: not deterministic for a seed."""

    charset = "ab "
    max_action_length = 8
    max_observation_length = 8

    def _reset(self, options):
        return random.choice(["a", "b", "ab", "ba", "aa", "bb"]), {}

    def _step(self, action):
        return "", 1.0, True, {}


class AcceptsAnythingEnv(gymnasium.Env):
    """Not a TextEnv: takes any action, validated or not."""

    def __init__(self):
        self.observation_space = gymnasium.spaces.Text(8, charset="ab ", min_length=0)
        self.action_space = gymnasium.spaces.Text(8, charset="ab ", min_length=0)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "a", {}

    def step(self, action):
        return "", 0.0, True, False, {}


class DefaultSpacesEnv(AcceptsAnythingEnv):
    def __init__(self):
        super().__init__()
        self.action_space = gymnasium.spaces.Text(8)  # min_length=1, no space in the charset


BROKEN = {
    "checktest/NaN-v0": (NonFiniteRewardEnv, "reward nan at turn 1 is not finite"),  # TextEnv's own check
    "checktest/Unseeded-v0": (
        UnseededEnv,
        "not deterministic: reset(seed=",
    ),  # the first seed to show it is chance
    "checktest/RawNaN-v0": (
        NanEnv,
        "reward nan (float) at turn 1",
    ),  # past TextEnv's check: the checker's own
}
LENIENT = {
    "checktest/AcceptsAnything-v0": (AcceptsAnythingEnv, ["an over-long action (9 characters"]),
    "checktest/DefaultSpaces-v0": (
        DefaultSpacesEnv,
        ["action_space has min_length=1", "action_space charset lacks ' '"],
    ),
}
"""Environments the trainer copes with: they pass, with a WARN line for each thing they do not validate."""


@pytest.fixture
def broken_ids():
    for env_id, (cls, _) in {**BROKEN, **LENIENT}.items():
        gymnasium.register(env_id, entry_point=cls)
    yield BROKEN
    for env_id in {**BROKEN, **LENIENT}:
        del gymnasium.registry[env_id]


@pytest.mark.parametrize(
    "env_id", sorted(i for i in gymnasium.registry if i.startswith("rlhf/") and i not in NEEDS_DATA)
)
def test_every_registered_rlhf_id_passes(env_id, capsys):
    assert main([env_id]) == 0
    assert capsys.readouterr().out == f"PASS {env_id}\n"


def test_builtin_and_adapter_ids_are_registered():
    assert set(envs.BUILTIN_IDS) | set(envs.ADAPTER_IDS) <= set(gymnasium.registry)


@pytest.mark.parametrize("env_id", list(LENIENT))
def test_what_the_trainer_copes_with_passes_with_warnings(env_id, broken_ids, capsys):
    assert main([env_id]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"PASS {env_id}"
    for expected in LENIENT[env_id][1]:
        assert any(ln.startswith(f"WARN {env_id}: ") and expected in ln for ln in lines[:-1]), (
            expected,
            lines,
        )


@pytest.mark.parametrize("env_id", list(BROKEN))
def test_broken_env_fails_with_a_clear_line(env_id, broken_ids, capsys):
    assert main([env_id, "rlhf/Arithmetic-v0"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "PASS rlhf/Arithmetic-v0"
    assert lines[0].startswith(f"FAIL {env_id}: ")
    assert broken_ids[env_id][1] in lines[0]


def test_unknown_id_fails():
    assert main(["rlhf/DoesNotExist-v0"]) == 1


def test_cli_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "envs.check"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    adapters = set(envs.ADAPTER_IDS) - set(NEEDS_DATA)  # their extras are installed here, as in CI
    assert sorted(ok.stdout.splitlines()) == sorted(
        [
            *(f"PASS {i}" for i in {*envs.BUILTIN_IDS, *adapters}),
            *(f"SKIP {i}: {w}" for i, w in NEEDS_DATA.items()),
        ]
    )
    bad = subprocess.run(
        [sys.executable, "-m", "envs.check", "rlhf/Review-v0", "rlhf/Nope-v0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[0] == "PASS rlhf/Review-v0"
    assert bad.stdout.splitlines()[1].startswith("FAIL rlhf/Nope-v0: cannot make the environment")
