"""Any `gymnasium.Env[str, str]` with `spaces.Text` spaces, not only a TextEnv: made with kwargs, checked (what it
does not validate is a warning, what breaks training a failure), and trained by `rlhf stages=[ppo,evaluate]` on a
pretrained model with the environment's reward alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium
import pytest

import envs
from envs.check import main
from rlhf.cli import compose
from rlhf.tracking.wandb_offline import find_offline_runs, history_values, read_offline_run
from tests.helpers import TINY_MODEL

PLAIN_SOURCE = '''\
"""their_pkg/plain.py: plain gymnasium environments (not TextEnv), written for any library."""
import random

import gymnasium
from gymnasium import spaces

WORDS = ["apple", "river", "stone", "cloud", "green"]
CHARSET = "abcdefghijklmnopqrstuvwxyz "


class PlainEcho(gymnasium.Env):
    """Say the word back. Validates nothing: any action is scored."""

    def __init__(self, words=WORDS, bonus=0.0):
        self.words = list(words)
        self.bonus = bonus
        self.observation_space = spaces.Text(16, charset=CHARSET, min_length=0)
        self.action_space = spaces.Text(32, charset=CHARSET, min_length=0)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = self.words[self.np_random.integers(len(self.words))]
        return self.word, {}

    def step(self, action):
        reward = 1.0 + self.bonus if action.split() == [self.word] else 0.0
        return "", reward, True, False, {"success": reward > 0}


class Chatty(PlainEcho):
    """Two replies per episode, but no max_turns attribute."""

    def reset(self, *, seed=None, options=None):
        self.turns = 0
        return super().reset(seed=seed)

    def step(self, action):
        self.turns += 1
        return "again", 0.0, self.turns >= 2, False, {}


class Unseeded(PlainEcho):
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.word = random.choice(self.words)
        return self.word, {}


class NumberObservation(PlainEcho):
    def step(self, action):
        return 3, 0.0, True, False, {}


class Crashes(PlainEcho):
    def step(self, action):
        raise KeyError(action)


class NotText(PlainEcho):
    def __init__(self):
        super().__init__()
        self.action_space = spaces.Discrete(3)


for name in ("PlainEcho", "Chatty", "Unseeded", "NumberObservation", "Crashes", "NotText"):
    gymnasium.register(f"{name}-v0", entry_point=f"their_pkg.plain:{name}")
'''


@pytest.fixture
def plain_pkg(tmp_path: Path, monkeypatch) -> Path:
    """their_pkg/plain.py outside the repository, importable (then forgotten)."""
    pkg = tmp_path / "their_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").touch()
    (pkg / "plain.py").write_text(PLAIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("their_pkg")]:
        del sys.modules[name]
    for name in ("PlainEcho", "Chatty", "Unseeded", "NumberObservation", "Crashes", "NotText"):
        gymnasium.registry.pop(f"{name}-v0", None)


def test_make_passes_kwargs_and_accepts_any_text_env(plain_pkg):
    env = envs.make("their_pkg.plain:PlainEcho-v0", words=["apple"], bonus=0.5)
    assert type(env).__name__ == "PlainEcho" and not isinstance(env, envs.TextEnv)
    obs, _ = env.reset(seed=0)
    assert obs == "apple" and env.step("apple")[1] == 1.5
    with pytest.raises(ValueError, match=r"cannot make it with task.env_kwargs=\{'colour': 'red'\}"):
        envs.make("their_pkg.plain:PlainEcho-v0", colour="red")
    with pytest.raises(ValueError, match="its action_space is Discrete\\(3\\); text environments need"):
        envs.make("their_pkg.plain:NotText-v0")
    assert envs.offline_data("their_pkg.plain:PlainEcho-v0") == set()
    assert envs.offline_data("rlhf/Review-v1") == {"vocabulary", "demonstrations", "preferences"}


def run_check(plain_pkg: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plain_pkg), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "envs.check", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_checker_passes_a_plain_env_and_warns_about_what_it_does_not_validate(plain_pkg):
    out = run_check(plain_pkg, "their_pkg.plain:PlainEcho-v0", "their_pkg.plain:Chatty-v0")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    warn = [ln for ln in lines if ln.startswith("WARN their_pkg.plain:PlainEcho-v0: ")]
    assert any("over-long action (33 characters" in ln and "was accepted" in ln for ln in warn)
    assert any("outside-charset action" in ln and "was accepted" in ln for ln in warn)
    assert "PASS their_pkg.plain:PlainEcho-v0" in lines and "PASS their_pkg.plain:Chatty-v0" in lines
    assert any(
        ln.startswith("WARN their_pkg.plain:Chatty-v0: ") and "no `max_turns` attribute" in ln for ln in lines
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "Unseeded",
            "not deterministic: reset(seed=",
        ),  # the first seed that shows it is chance: an unseeded draw
        (
            "NumberObservation",
            "observation 3 at turn 1 after reset(seed=0) with the random-character policy is a int",
        ),
        ("Crashes", "KeyError"),
        ("NotText", "action_space is Discrete(3), expected gymnasium.spaces.Text"),
    ],
)
def test_checker_still_fails_what_breaks_training(plain_pkg, capsys, name, reason):
    assert main([f"their_pkg.plain:{name}-v0"]) == 1
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert verdict.startswith(f"FAIL their_pkg.plain:{name}-v0: ") and reason in verdict


def test_checker_takes_kwargs_for_every_id(plain_pkg, capsys):
    assert main(["their_pkg.plain:PlainEcho-v0", "-k", "words=[apple, river]", "-k", "bonus=0.25"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "PASS their_pkg.plain:PlainEcho-v0"
    assert main(["their_pkg.plain:PlainEcho-v0", "-k", "colour=red"]) == 1
    assert "cannot make the environment" in capsys.readouterr().out


def test_offline_stages_and_a_tiny_tokenizer_need_a_textenv(plain_pkg):
    from rlhf.task.environment import check

    env_id = "task.env_id=their_pkg.plain:PlainEcho-v0"
    with pytest.raises(ValueError, match="provides no vocabulary .* model=hf model.name_or_path="):
        check(compose([env_id]), ["ppo", "evaluate"])
    with pytest.raises(ValueError, match="provides no demonstrations, preferences .* sft.dataset=<file>"):
        check(compose([env_id, "model=hf", "model.name_or_path=x"]), ["sft", "reward", "ppo"])
    with pytest.raises(ValueError, match="cannot make it with task.env_kwargs"):
        check(compose([env_id, "model=hf", "model.name_or_path=x", "+task.env_kwargs.colour=red"]), ["ppo"])
    check(
        compose([env_id, "model=hf", "model.name_or_path=x", "+task.env_kwargs.bonus=1"]), ["ppo", "evaluate"]
    )


@pytest.fixture
def pretrained(plain_pkg, tmp_path) -> Path:
    """A tiny 'pretrained' model with a BPE tokenizer (ChatML, pad = eos), saved like any hub model."""
    from rlhf.models.tiny import build_tiny_model
    from rlhf.models.tokenizer import build_bpe_tokenizer

    texts = ["apple", "river", "stone", "cloud", "green"] * 20
    tokenizer = build_bpe_tokenizer(texts, vocab_size=300)
    cfg = compose(TINY_MODEL)
    model = build_tiny_model(cfg.model, tokenizer)
    out = tmp_path / "pretrained"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["ppo.critic_init=sft", "ppo.advantage=grpo"])
def test_ppo_and_evaluate_train_a_plain_env_from_its_reward_alone(plain_pkg, pretrained, tmp_path, advantage):
    """No SFT and no reward stage; a rubric of three components, each logged in history and evaluation."""
    from rlhf.run.pipeline import run

    rubric = tmp_path / "conf" / "task"
    rubric.mkdir(parents=True)
    (rubric / "plain_rubric.yaml").write_text(
        textwrap.dedent("""
            defaults:
              - task_schema
              - _self_
            env_id: their_pkg.plain:PlainEcho-v0
            env_kwargs:
              bonus: 0.5
            rubric:
              one_word:
                kind: format
                pattern: '^[a-z]+$'
                weight: 0.2
              long:
                kind: length
                weight: 0.0
                target_length: 2
        """)
    )
    cfg = compose(
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "task=plain_rubric",
            "stages=[ppo,evaluate]",
            "model=hf",
            f"model.name_or_path={pretrained}",
            f"ppo.policy_path={pretrained}",
            "ppo.reward_source=env",
            advantage,
            "ppo.batch_size=8",
            "ppo.total_episodes=16",
            "ppo.num_mini_batches=2",
            "ppo.num_ppo_epochs=1",
            "ppo.response_length=4",
            "evaluate.num_prompts=8",
            "evaluate.batch_size=8",
        ]
    )
    run_dir = tmp_path / "run"
    summary = run(cfg, run_dir=run_dir)
    assert list(summary["stages"]) == ["ppo", "evaluate"]
    history = [json.loads(line) for line in (run_dir / "ppo" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for row in history:
        assert {"reward/env", "reward/one_word", "reward/long"} <= set(row)
        assert row["reward/env"] == pytest.approx(row["env/gold"])
        assert row["reward/long"] <= 0.0
        # the trained score is the weighted sum; the weight-0 length penalty is logged, not trained on
        assert row["objective/scores"] == pytest.approx(
            row["reward/env"] + 0.2 * row["reward/one_word"], abs=1e-5
        )
    metrics = json.loads((run_dir / "evaluate" / "eval.json").read_text())["metrics"]
    for policy in ("sft", "ppo"):
        assert {f"{policy}/reward/env", f"{policy}/reward/one_word", f"{policy}/reward/long"} <= set(metrics)
    # W&B (offline): one curve per component in the PPO run, one value per policy in the evaluation run, and the
    # weights in the run's config
    runs = {r["run"]["job_type"]: r for r in map(read_offline_run, find_offline_runs(run_dir))}
    for name in ("reward/env", "reward/one_word", "reward/long"):
        assert len(history_values(runs["ppo"], name)) == 2
        assert {f"sft/{name}", f"ppo/{name}"} <= set(runs["evaluate"]["summary"])
    rubric = runs["ppo"]["config"]["task"]["rubric"]
    assert (rubric["one_word"]["weight"], rubric["long"]["weight"]) == (0.2, 0.0)
