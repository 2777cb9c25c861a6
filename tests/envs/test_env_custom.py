"""A user's environment in their own package works through `gymnasium.make("pkg.module:Name-v0")`.

ECHO_SOURCE is the README's "Write your own reward environment" example, verbatim.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium
import pytest

import envs
from envs.base import TextEnv

ECHO_SOURCE = '''\
"""my_pkg/echo.py: the environment says a word; the policy should say it back."""
import gymnasium
import numpy as np

from envs.base import TextEnv, bradley_terry_pair

WORDS = ["apple", "river", "stone", "cloud", "green"]


class EchoEnv(TextEnv):
    """Single-turn. Reward: 1 if the reply is exactly the word, 0.5 if it contains it, else 0."""

    charset = "abcdefghijklmnopqrstuvwxyz "
    max_action_length = 64
    max_observation_length = 16

    def _reset(self, options):
        self._word = WORDS[self.np_random.integers(len(WORDS))]  # randomness only via np_random
        return self._word, {}  # first observation, info

    def _step(self, action):
        reward = self.gold_reward(self._word, action)
        return "", reward, True, {"gold": reward}  # observation, reward, terminated, info

    def reference_action(self):
        return self._word

    @classmethod
    def vocabulary(cls):  # every word of observations and data: the tiny tokenizer is built from it
        return WORDS

    @classmethod
    def gold_reward(cls, prompt, completion):
        words = completion.split()
        return 1.0 if words == [prompt] else 0.5 if prompt in words else 0.0

    @classmethod
    def demonstrations(cls, n, seed):  # SFT data, imperfect on purpose: 30% echo a random word
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            word = WORDS[rng.integers(len(WORDS))]
            reply = word if rng.random() < 0.7 else WORDS[rng.integers(len(WORDS))]
            rows.append({"prompt": word, "completion": reply})
        return rows

    @classmethod
    def preferences(cls, n, seed):  # reward-model data, noisy labels
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(n):
            word, other = rng.choice(WORDS, size=2, replace=False)
            rows.append(bradley_terry_pair(rng, str(word), str(word), str(other), 1.0, 0.0, temperature=0.25))
        return rows


gymnasium.register("Echo-v0", entry_point="my_pkg.echo:EchoEnv")
'''

BAD_SOURCE = """\
import gymnasium
from envs.base import TextEnv


class NaNEnv(TextEnv):
    charset = "ab "
    max_action_length = 8
    max_observation_length = 8

    def _reset(self, options):
        return "a", {}

    def _step(self, action):
        return "", float("nan"), True, {}


gymnasium.register("NaN-v0", entry_point="their_pkg.bad:NaNEnv")
"""

PACKAGES = {
    "my_pkg/echo.py": ECHO_SOURCE,
    # the same environment under the names the issue uses: their_pkg.module:MyEnv-v0
    "their_pkg/module.py": ECHO_SOURCE.replace("my_pkg.echo:EchoEnv", "their_pkg.module:EchoEnv").replace(
        '"Echo-v0"', '"MyEnv-v0"'
    ),
    "their_pkg/bad.py": BAD_SOURCE,
}
IDS = {"my_pkg.echo:Echo-v0": "Echo-v0", "their_pkg.module:MyEnv-v0": "MyEnv-v0"}


@pytest.fixture
def user_packages(tmp_path: Path, monkeypatch) -> Path:
    """Write the user's packages outside the repository and make them importable (then forget them)."""
    for relative, source in PACKAGES.items():
        path = tmp_path / relative
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.split(".")[0] in ("my_pkg", "their_pkg")]:
        del sys.modules[name]
    for env_id in ("Echo-v0", "MyEnv-v0", "NaN-v0"):
        gymnasium.registry.pop(env_id, None)


@pytest.mark.parametrize("env_id", list(IDS))
def test_gymnasium_make_imports_the_users_module(env_id, user_packages):
    env = gymnasium.make(env_id)
    assert isinstance(env.unwrapped, TextEnv) and env.spec.id == IDS[env_id]
    obs, info = env.reset(seed=0)
    assert obs in ("apple", "river", "stone", "cloud", "green") and info == {"turn": 0}
    _, reward, terminated, truncated, info = env.step(f"{obs}")
    assert (reward, terminated, truncated, info["gold"]) == (1.0, True, False, 1.0)
    with pytest.raises(ValueError, match=rf"{IDS[env_id]}: action holds characters outside the charset"):
        env.reset(seed=0)
        env.step("Apple!")


@pytest.mark.parametrize("env_id", list(IDS))
def test_envs_helpers_and_checker_accept_the_users_id(env_id, user_packages, capsys):
    cls = envs.env_class(env_id)
    assert cls.__name__ == "EchoEnv" and cls.vocabulary() == ["apple", "river", "stone", "cloud", "green"]
    demos = cls.demonstrations(100, seed=0)
    assert 0.5 < sum(cls.gold_reward(d["prompt"], d["completion"]) for d in demos) / 100 < 1.0
    assert isinstance(envs.make(env_id), cls)  # the TextEnv itself, unwrapped
    from envs.check import main

    assert main([env_id]) == 0
    assert capsys.readouterr().out == f"PASS {env_id}\n"


def test_cli_on_user_packages_via_pythonpath(user_packages):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(user_packages), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "envs.check", "my_pkg.echo:Echo-v0", "their_pkg.bad:NaN-v0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "PASS my_pkg.echo:Echo-v0"
    assert lines[1].startswith("FAIL their_pkg.bad:NaN-v0: ") and "reward nan" in lines[1]
    # the README's usage snippet
    snippet = textwrap.dedent("""
        import gymnasium
        env = gymnasium.make("my_pkg.echo:Echo-v0")
        obs, info = env.reset(seed=0)
        print(obs, env.step(obs)[1])
    """)
    out = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    word, reward = out.stdout.split()
    assert word in ("apple", "river", "stone", "cloud", "green") and reward == "1.0"
