"""A user's environment in their own package works through `gymnasium.make("pkg.module:Name-v0")`.

ECHO_SOURCE, ECHO_PRESET and ECHO_TRAIN are the README's "Write your own reward environment" example, its preset
file and its training command, read from the README itself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium
import pytest

import envs
from envs.base import TextEnv

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def readme_block(first_line: str) -> str:
    """The README's fenced block that starts with `first_line`, verbatim."""
    start = README.index(first_line)
    return README[start : README.index("```", start)]


ECHO_SOURCE = readme_block('"""my_pkg/echo.py')
ECHO_PRESET = readme_block("# @package _global_\n# my_pkg/conf/experiment/echo.yaml")
ECHO_TRAIN = next(
    line
    for line in README.splitlines()
    if line.startswith("PYTHONPATH=. rlhf ") and "experiment=echo" in line
)

BAD_SOURCE = """\
import gymnasium

gymnasium.register("NaN-v0", entry_point="tests.helpers:NonFiniteRewardEnv")
"""
"""A user's module that registers an environment whose rewards are NaN (the tests' own)."""

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
        # this checkout too, for the tests' NaN environment their_pkg.bad registers
        "PYTHONPATH": os.pathsep.join([str(user_packages), str(REPO), os.environ.get("PYTHONPATH", "")]),
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


@pytest.mark.slow
def test_the_readmes_training_command_learns_the_echo_task(tmp_path):
    """The README's example, preset and command, exactly: gold reward +0.20 or more over SFT on held-out episodes
    (measured: 0.53 -> 0.96 in about 30 s). Without <reply> ending the tiny tokenizer's user turns the SFT model
    cannot tell the prompt from its own reply and this gain stays near 0."""
    (tmp_path / "my_pkg" / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_pkg" / "__init__.py").touch()
    (tmp_path / "my_pkg" / "echo.py").write_text(ECHO_SOURCE)
    (tmp_path / "my_pkg" / "conf" / "experiment" / "echo.yaml").write_text(ECHO_PRESET)
    words = shlex.split(ECHO_TRAIN.split("#")[0])
    assert words[:2] == ["PYTHONPATH=.", "rlhf"], ECHO_TRAIN
    # PYTHONPATH=. as the README says, plus this checkout (whatever rlhf the environment has installed)
    path = os.pathsep.join([str(tmp_path), str(REPO)])
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", *words[2:], "hydra.run.dir=run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "evaluate" / "eval.json").read_text())["metrics"]
    assert metrics["gold_reward_gain"] >= 0.20, metrics
