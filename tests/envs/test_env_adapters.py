"""The adapters against the real libraries (no mock): rlhf/ReasoningGym-v0 (reasoning-gym), rlhf/TextArena-v0
(textarena) and rlhf/SkyRL-v0 (skyrl-gym), installed by the extras of the same names."""

from __future__ import annotations

import json
import re

import gymnasium
import pytest
import reasoning_gym

import envs
from envs.check import check
from envs.reasoning_gym import INSTRUCTION


# ---------------------------------------------------------------------------------------------- reasoning-gym
def test_reasoning_gym_scores_with_the_datasets_own_score_answer():
    env = gymnasium.make("rlhf/ReasoningGym-v0", dataset="leg_counting", min_animals=1, max_animals=2)
    obs, info = env.reset(seed=3)
    entry = reasoning_gym.create_dataset("leg_counting", size=100_000, seed=0, min_animals=1, max_animals=2)[
        info["index"]
    ]
    assert obs == f"{entry['question'].strip()}\n{INSTRUCTION}"
    _, reward, terminated, truncated, info = env.step(entry["answer"])
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info == {"answer": entry["answer"], "success": True}
    env.reset(seed=3)
    wrong = str(int(entry["answer"]) + 1)
    assert env.step(wrong)[1] == 0.0
    assert env.reset(seed=3) == env.reset(seed=3) and env.reset(seed=3)[0] != env.reset(seed=4)[0]


def test_reasoning_gym_refuses_unknown_datasets_options_and_bad_actions():
    with pytest.raises(ValueError, match="dataset='no_such_dataset'.*not registered"):
        envs.make("rlhf/ReasoningGym-v0", dataset="no_such_dataset")
    with pytest.raises(ValueError, match="dataset='leg_counting' with options {'bogus': 1}"):
        envs.make("rlhf/ReasoningGym-v0", dataset="leg_counting", bogus=1)
    env = gymnasium.make("rlhf/ReasoningGym-v0", dataset="basic_arithmetic")
    env.reset(seed=0)
    with pytest.raises(
        ValueError, match="rlhf/ReasoningGym-v0: action must be a str of at most 2048 printable"
    ):
        env.step("1\x00")
    with pytest.raises(RuntimeError, match="call reset"):
        env.step("1")  # the refused action left the episode open; this one ends it
        env.step("1")


@pytest.mark.parametrize("dataset", ["leg_counting", "basic_arithmetic", "letter_counting"])
def test_reasoning_gym_datasets_pass_the_checker(dataset):
    assert check("rlhf/ReasoningGym-v0", dataset=dataset) == []  # no warnings either


# -------------------------------------------------------------------------------------------------- textarena
def play_guess_the_number(env: gymnasium.Env, seed: int) -> tuple[float, bool, bool, int, dict]:
    """Binary search on the game's higher/lower answers: wins within its 10 guesses."""
    obs, _ = env.reset(seed=seed)
    low, high = re.search(r"between (\d+) and (\d+)", obs).groups()
    low, high = int(low), int(high)
    for turn in range(1, 20):
        guess = (low + high) // 2
        obs, reward, terminated, truncated, info = env.step(f"[{guess}]")
        if terminated or truncated:
            return reward, terminated, truncated, turn, info
        if "higher" in obs:
            low = guess + 1
        elif "lower" in obs:
            high = guess - 1
    raise AssertionError("the game did not end")


def test_textarena_game_is_multi_turn_and_rewards_the_outcome():
    env = gymnasium.make("rlhf/TextArena-v0", game="GuessTheNumber-v0", max_turns=10)
    reward, terminated, truncated, turns, info = play_guess_the_number(env, seed=7)
    assert (reward, terminated, truncated) == (1.0, True, False) and turns > 1
    assert info["success"] and not info["invalid_move"] and "guessed" in info["reason"]
    obs, _ = env.reset(seed=7)
    assert "Guess The Number" in obs and "[Player]" not in obs  # the game's text, not the player's own move


def test_textarena_truncates_at_max_turns_with_reward_zero():
    env = gymnasium.make("rlhf/TextArena-v0", game="GuessTheNumber-v0", max_turns=2)
    env.reset(seed=0)
    first = env.step("[1]")
    assert first[1:4] == (0.0, False, False) or first[2]  # unless 1 was the number
    if not first[2]:
        obs, reward, terminated, truncated, _ = env.step("[1]")
        assert (reward, terminated, truncated) == (0.0, False, True)


def test_textarena_episodes_depend_on_their_seed_alone():
    """2048 spawns its tiles from Python's global generator; each env keeps its own, so interleaving two games gives
    the episodes each gives alone."""
    moves = ["[Up]", "[Left]", "[Down]", "[Right]", "[Up]", "[Left]"]

    def make():
        return envs.make("rlhf/TextArena-v0", game="2048-v0-super-easy", max_turns=20)

    def alone(seed):
        env = make()
        trace = [env.reset(seed=seed)[0]]
        for move in moves:
            trace.append(env.step(move)[:4])
        return trace

    a, b = make(), make()
    traces = {0: [a.reset(seed=0)[0]], 1: [b.reset(seed=1)[0]]}
    for move in moves:
        for seed, env in ((0, a), (1, b)):
            traces[seed].append(env.step(move)[:4])
    assert traces[0] == alone(0) and traces[1] == alone(1)


def test_textarena_refuses_multi_player_and_unknown_games():
    with pytest.raises(ValueError, match="game='Nim-v0' is not a single-player game"):
        envs.make("rlhf/TextArena-v0", game="Nim-v0").reset(seed=0)
    with pytest.raises(ValueError, match="game='NoSuchGame-v0'"):
        envs.make("rlhf/TextArena-v0", game="NoSuchGame-v0")


@pytest.mark.parametrize(
    "game", ["GuessTheNumber-v0", "TowerOfHanoi-v0", "Minesweeper-v0-small", "LightsOut-v0"]
)
def test_textarena_games_pass_the_checker(game):
    assert check("rlhf/TextArena-v0", game=game) == []


# -------------------------------------------------------------------------------------------------- skyrl-gym
ROWS = [
    {
        "prompt": [{"role": "user", "content": f"What is {a} + {b}? End with '#### <answer>'."}],
        "reward_spec": {"method": "rule", "ground_truth": str(a + b)},
        "extra_info": {},
    }
    for a, b in [(1, 2), (30, 12), (7, 8), (100, 1)]
]


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def test_skyrl_env_plays_the_rows_with_the_environments_own_reward(rows_file):
    env = gymnasium.make("rlhf/SkyRL-v0", env="gsm8k", data=rows_file)
    assert env.unwrapped.max_turns == 1  # skyrl-gym's gsm8k is single-turn
    obs, info = env.reset(seed=0)
    row = ROWS[info["index"]]
    assert obs == row["prompt"][0]["content"]
    _, reward, terminated, truncated, _ = env.step(f"#### {row['reward_spec']['ground_truth']}")
    assert (reward, terminated, truncated) == (1.0, True, False)
    env.reset(seed=0)
    assert env.step("#### -1")[1] == 0.0


def test_skyrl_multi_turn_env_answers_and_truncates(rows_file):
    env = gymnasium.make("rlhf/SkyRL-v0", env="gsm8k_multi_turn", data=rows_file, max_turns=2)
    env.reset(seed=1)
    obs, reward, terminated, truncated, info = env.step("no idea")
    assert "#### ANSWER" in obs and (reward, terminated, truncated, info["turn"]) == (0.0, False, False, 1)
    assert env.step("still no idea")[2:4] == (False, True)


def test_skyrl_refuses_missing_data_unknown_envs_and_rows_without_extras(rows_file):
    with pytest.raises(ValueError, match="needs data="):
        envs.make("rlhf/SkyRL-v0", env="gsm8k")
    with pytest.raises(ValueError, match="env='nope'.*No registered env"):
        envs.make("rlhf/SkyRL-v0", env="nope", data=rows_file)
    with pytest.raises(ValueError, match="cannot take the row .*reward_spec field is required"):
        envs.make("rlhf/SkyRL-v0", env="gsm8k", data=[{"prompt": "2 + 2?"}])


@pytest.mark.parametrize("skyrl_env", ["gsm8k", "gsm8k_multi_turn"])
def test_skyrl_envs_pass_the_checker(rows_file, skyrl_env):
    assert check("rlhf/SkyRL-v0", env=skyrl_env, data=rows_file) == []
