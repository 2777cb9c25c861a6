"""Reward rubrics: the pure components, a rubric from config, every component's values and their token placement."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch

from rlhf.rewards import Episodes, build_rubric, component_values, describe, needs_reward_model, token_scores
from rlhf.rewards.components import call_function, format_reward, length_penalty, load_function


@pytest.fixture
def user_function(tmp_path, monkeypatch):
    """A user's package with reward functions, outside the repository."""
    pkg = tmp_path / "their_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").touch()
    (pkg / "scores.py").write_text(
        textwrap.dedent("""
            def shouts(prompt, completion, info):
                return float(completion.isupper()) + info.get("bonus", 0.0)

            def broken(prompt, completion, info):
                return float("nan")

            NOT_CALLABLE = 3
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "their_rewards.scores"
    for name in [m for m in sys.modules if m.startswith("their_rewards")]:
        del sys.modules[name]


def test_format_reward_searches_the_pattern():
    assert format_reward(re.compile(r"^\d+$"), "42") == 1.0
    assert format_reward(re.compile(r"^\d+$"), "42 apples") == 0.0
    assert format_reward(re.compile(r"\[\d+\]"), "my guess is [7]") == 1.0


def test_length_penalty_counts_tokens_beyond_the_target():
    assert length_penalty(3, 5) == 0.0
    assert length_penalty(5, 5) == 0.0
    assert length_penalty(9, 5) == -4.0
    assert length_penalty(9, 0) == -9.0


def test_load_and_call_a_users_function(user_function):
    fn = load_function(f"{user_function}:shouts")
    assert call_function(fn, "loud", "p", "HEY", {"bonus": 0.5}) == 1.5
    with pytest.raises(ValueError, match="'bad': the function returned nan; it must return a finite float"):
        call_function(load_function(f"{user_function}:broken"), "bad", "p", "x", {})
    with pytest.raises(ValueError, match="no callable 'NOT_CALLABLE'"):
        load_function(f"{user_function}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="cannot import 'no_such_pkg_xyz.mod'"):
        load_function("no_such_pkg_xyz.mod:f")
    with pytest.raises(ValueError, match="write it as pkg.module:function"):
        load_function("their_rewards.scores.shouts")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("env", [("env", "env", 1.0)]),
        ("model", [("model", "model", 1.0)]),
        ("both", [("env", "env", 0.3), ("model", "model", 2.0)]),
    ],
)
def test_reward_source_is_a_shortcut_for_a_rubric(source, expected):
    rubric = build_rubric({}, source, env_weight=0.3, model_weight=2.0)
    assert [(c.name, c.kind, c.weight) for c in rubric] == expected
    assert needs_reward_model(rubric) == (source != "env")


def test_task_rubric_adds_components_and_replaces_one_of_the_same_name(user_function):
    rubric = build_rubric(
        {
            "env": {"kind": "env", "weight": 0.0},
            "loud": {"kind": "function", "function": f"{user_function}:shouts", "weight": 0.5},
            "digits": {"kind": "format", "pattern": r"^\d+$"},
            "short": {"kind": "length", "weight": 0.1, "target_length": 2},
        },
        "env",
    )
    assert [(c.name, c.kind, c.weight) for c in rubric] == [
        ("env", "env", 0.0),
        ("loud", "function", 0.5),
        ("digits", "format", 1.0),
        ("short", "length", 0.1),
    ]
    assert (
        describe(rubric)
        == "0*env [logged only] + 0.5*loud (function) + 1*digits (format) + 0.1*short (length)"
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "bleu"}, r"task.rubric.x.kind='bleu' is not one of env, model, function, length, format"),
        ({"kind": "function"}, r"kind=function needs task.rubric.x.function=pkg.module:function"),
        ({"kind": "format"}, r"kind=format needs task.rubric.x.pattern"),
        (
            {"kind": "format", "pattern": "(unclosed"},
            r"task.rubric.x.pattern='\(unclosed' is not a regular expression",
        ),
        ({"kind": "length", "target_length": -1}, r"task.rubric.x.target_length=-1 must be >= 0"),
        ({"kind": "env", "weight": float("inf")}, r"task.rubric.x.weight=inf must be a finite number"),
    ],
)
def test_bad_components_say_what_to_change(spec, message):
    with pytest.raises(ValueError, match=message):
        build_rubric({"x": spec}, "env")
    with pytest.raises(ValueError, match="ppo.reward_source='gold' is not one of env, model, both"):
        build_rubric({}, "gold")


def episodes(model_scores=None) -> Episodes:
    return Episodes(
        prompts=["a", "b", "c"],
        completions=["12", "LOUD", "twelve apples"],
        infos=[{}, {"bonus": 1.0}, {}],
        env_rewards=torch.tensor([1.0, 0.0, 0.5]),
        lengths=torch.tensor([2, 1, 5]),
        model_scores=model_scores,
    )


def test_component_values_per_episode(user_function):
    rubric = build_rubric(
        {
            "loud": {"kind": "function", "function": f"{user_function}:shouts"},
            "digits": {"kind": "format", "pattern": r"^\d+$", "weight": 0.0},
            "short": {"kind": "length", "target_length": 2},
        },
        "both",
    )
    values = component_values(rubric, episodes(model_scores=torch.tensor([0.1, -0.2, 0.3])))
    assert list(values) == ["env", "model", "loud", "digits", "short"]
    torch.testing.assert_close(values["env"], torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(values["model"], torch.tensor([0.1, -0.2, 0.3]))
    torch.testing.assert_close(values["loud"], torch.tensor([0.0, 2.0, 0.0]))
    torch.testing.assert_close(values["digits"], torch.tensor([1.0, 0.0, 0.0]))  # weight 0: still computed
    torch.testing.assert_close(values["short"], torch.tensor([0.0, 0.0, -3.0]))
    with pytest.raises(ValueError, match="'model' \\(kind=model\\) needs a reward model"):
        component_values(rubric, episodes())


def test_token_scores_place_env_per_turn_and_the_rest_at_the_last_token():
    rubric = build_rubric(
        {
            "digits": {"kind": "format", "pattern": r"^\d+$", "weight": 0.5},
            "off": {"kind": "length", "weight": 0},
        },
        "env",
    )
    values = {
        "env": torch.tensor([1.5, 0.0]),
        "digits": torch.tensor([1.0, 1.0]),
        "off": torch.tensor([-100.0, -100.0]),  # weight 0: never in the trained score
    }
    turn_rewards = torch.tensor(
        [[0.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]]
    )  # (B, R): two turns in episode 0
    last = torch.tensor([3, 1])
    scores = token_scores(rubric, values, turn_rewards, last)
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(scores, expected)
    # a plain loop over the components gives the same per-episode sums
    total = sum(c.weight * values[c.name] for c in rubric)
    torch.testing.assert_close(scores.sum(1), total)
