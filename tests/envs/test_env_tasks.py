"""The built-in tasks: gold formulas, reference policies, determinism and offline data."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs import arithmetic, guess, review
from envs.arithmetic import ArithmeticEnv
from envs.base import TextEnv, label_accuracy_ceiling
from envs.guess import GuessNumberEnv
from envs.review import ReviewEnv

MODULES = {
    "rlhf/Review-v0": review,
    "rlhf/Review-v1": review,
    "rlhf/Arithmetic-v0": arithmetic,
    "rlhf/GuessNumber-v0": guess,
}


def episode(env: TextEnv, seed: int, policy) -> tuple[list, float]:
    """(transcript as messages, return) of one episode."""
    obs, _ = env.reset(seed=seed)
    messages, total, done = [{"role": "user", "content": obs}], 0.0, False
    while not done:
        action = policy(env)
        obs, reward, terminated, truncated, _ = env.step(action)
        messages += [{"role": "assistant", "content": action}] + (
            [{"role": "user", "content": obs}] if obs else []
        )
        total += reward
        done = terminated or truncated
    return messages, total


def gold_of(cls: type[TextEnv], prompt, completion) -> float:
    if isinstance(prompt, list):
        return cls.dialogue_gold(prompt + completion)
    return cls.gold_reward(prompt, completion)


# ---------------------------------------------------------------------- gold formulas
@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        ("great and wonderful", 1.0),
        ("  great \n superb  fun ", 1.0),
        ("good , but the plot was dull", 0.5),
        ("bad and boring", 0.0),
        ("the plot was long", 0.5),  # no sentiment: neutral
        ("", 0.0),
        ("   ", 0.0),
        ("great qzx", 0.5),  # junk counts as negative
        ("qzx vv", 0.0),
        ("great great great bad", 0.75),
    ],
)
def test_review_gold(completion, gold):
    assert ReviewEnv.gold_reward("review : the film was", completion) == pytest.approx(gold)


@pytest.mark.parametrize(
    ("prompt", "completion", "gold"),
    [
        ("1 7 + 5 =", "2 2", 1.0),
        ("1 7 + 5 =", " 2  2 ", 1.0),
        ("1 7 + 5 =", "2 3", 0.5),
        ("1 7 + 5 =", "3 3", 0.0),
        ("1 7 + 5 =", "2 2 2", 0.0),  # must stop after the answer
        ("1 7 + 5 =", "2", 0.0),
        ("1 7 + 5 =", "", 0.0),
        ("1 7 + 5 =", "2 +", 0.0),
        ("3 + 4 =", "7", 1.0),
        ("9 + 9 =", "1 8", 1.0),
        ("1 9 + 9 =", "2 9", 0.5),
    ],
)
def test_arithmetic_gold(prompt, completion, gold):
    assert ArithmeticEnv.gold_reward(prompt, completion) == pytest.approx(gold)


def test_arithmetic_env_reward_is_its_gold_reward():
    env = envs.make("rlhf/Arithmetic-v0")
    rng = np.random.default_rng(0)
    for seed in range(50):
        prompt, _ = env.reset(seed=seed)
        reply = " ".join(rng.choice(list("0123456789"), size=int(rng.integers(1, 3))))
        _, reward, _, _, info = env.step(reply)
        assert reward == ArithmeticEnv.gold_reward(prompt, reply) == info["gold"]
        assert info["correct"] is (reward == 1.0)


def test_review_env_reward_is_its_gold_reward():
    env = envs.make("rlhf/Review-v0")
    rng = np.random.default_rng(0)
    for seed in range(50):
        prompt, _ = env.reset(seed=seed)
        reply = " ".join(rng.choice(ReviewEnv.vocabulary(), size=int(rng.integers(1, 8))))
        _, reward, _, _, info = env.step(reply)
        assert reward == ReviewEnv.gold_reward(prompt, reply) == info["gold"]


def test_guess_rewards_success_more_for_fewer_turns():
    env = envs.make("rlhf/GuessNumber-v0")
    rewards = []
    for turns in range(1, env.max_turns + 1):
        env.reset(seed=0, options={"secret": turns})
        for guess_ in range(1, turns + 1):  # guesses 1, 2, ... reach the secret at turn `turns`
            obs, reward, terminated, truncated, info = env.step(str(guess_))
        assert (obs, terminated, truncated, info["success"]) == ("correct", True, False, True)
        rewards.append(reward)
    assert rewards == pytest.approx([1 - k / env.max_turns for k in range(env.max_turns)])


def test_guess_replies_invalid_to_junk_and_counts_the_turn():
    env = envs.make("rlhf/GuessNumber-v0")
    env.reset(seed=0, options={"secret": 5})
    for junk in ("", "five", "0", "17", "5 5"):
        obs, reward, terminated, _, info = env.step(junk)
        assert (obs, reward, terminated, info["guess"]) == ("invalid", 0.0, False, None)
    obs, reward, terminated, *_ = env.step("5")
    assert (obs, terminated) == ("correct", True) and reward == pytest.approx(1 - 5 / 6)


def test_guess_dialogue_gold_matches_episode_return():
    env = envs.make("rlhf/GuessNumber-v0")
    rng = np.random.default_rng(0)
    for seed in range(100):
        messages, total = episode(env, seed, lambda env: str(rng.integers(1, 17)))
        assert GuessNumberEnv.dialogue_gold(messages) == pytest.approx(total)


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_reference_policy_is_best(env_id):
    env = envs.make(env_id)
    returns = [episode(env, seed, lambda env: env.reference_action())[1] for seed in range(200)]
    if env_id == "rlhf/GuessNumber-v0":
        assert min(returns) > 0  # binary search always succeeds
        assert np.mean(returns) == pytest.approx(0.60, abs=0.03)
    else:
        assert min(returns) == 1.0


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_same_seed_same_episode_and_seeds_vary(env_id):
    env, other = envs.make(env_id), envs.make(env_id)
    vocabulary = type(env).vocabulary()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        actions = [
            " ".join(rng.choice(vocabulary, size=int(rng.integers(1, 3)))) for _ in range(env.max_turns)
        ]
        a, b = iter(actions), iter(actions)
        assert episode(env, seed, lambda e, a=a: next(a)) == episode(other, seed, lambda e, b=b: next(b))
    # seeds vary the task: the prompt, or (multi-turn) the secret the reference policy's dialogue reveals
    dialogues = {str(episode(env, s, lambda e: e.reference_action())[0]) for s in range(50)}
    assert len(dialogues) > 5


# ---------------------------------------------------------------------- offline data
@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_vocabulary_is_small_unique_and_in_charset(env_id):
    cls = envs.env_class(env_id)
    vocabulary = cls.vocabulary()
    assert 0 < len(vocabulary) < 150
    assert len(set(vocabulary)) == len(vocabulary)
    assert all(w and " " not in w and set(w) <= set(cls.charset) for w in vocabulary)


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_offline_data_formats_determinism_and_vocabulary(env_id):
    cls = envs.env_class(env_id)
    vocabulary = set(cls.vocabulary())
    demos, prefs = cls.demonstrations(200, seed=0), cls.preferences(200, seed=0)
    assert len(demos) == len(prefs) == 200
    assert demos == cls.demonstrations(200, seed=0) and prefs == cls.preferences(200, seed=0)
    assert demos != cls.demonstrations(200, seed=1) and prefs != cls.preferences(200, seed=1)
    texts = []
    if env_id == "rlhf/GuessNumber-v0":
        for row in demos:
            assert set(row) == {"messages"}
            roles = [m["role"] for m in row["messages"]]
            assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
            assert row["messages"][0]["content"] == GuessNumberEnv.opening
            texts += [m["content"] for m in row["messages"]]
        for row in prefs:
            assert set(row) == {"prompt", "chosen", "rejected"}
            assert row["prompt"] == [{"role": "user", "content": GuessNumberEnv.opening}]
            assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
            texts += [m["content"] for m in row["chosen"] + row["rejected"]]
    else:
        for row in demos:
            assert set(row) == {"prompt", "completion"} and isinstance(row["completion"], str)
            assert row["completion"] and "</s>" not in row["completion"]
            texts += [row["prompt"], row["completion"]]
        for row in prefs:
            assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
            texts += [row["prompt"], row["chosen"], row["rejected"]]
    assert {w for t in texts for w in t.split()} <= vocabulary
    # observations too: everything the tokenizer will see from the environment
    env = envs.make(env_id)
    observations = [episode(env, s, lambda e: e.reference_action())[0] for s in range(50)]
    assert {w for msgs in observations for m in msgs for w in m["content"].split()} <= vocabulary


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_demonstrations_are_imperfect_at_the_documented_level(env_id):
    cls, module = envs.env_class(env_id), MODULES[env_id]
    demos = cls.demonstrations(4000, seed=0)
    if "messages" in demos[0]:
        golds = np.array([cls.dialogue_gold(d["messages"]) for d in demos])
    else:
        golds = np.array([cls.gold_reward(d["prompt"], d["completion"]) for d in demos])
    assert golds.mean() == pytest.approx(module.DEMO_MEAN_GOLD, abs=0.02)
    assert golds.mean() < 0.75 and (golds < 1.0).mean() > 0.3  # room for RL


def test_review_demonstrations_leave_room_for_a_positive_policy():
    demos = ReviewEnv.demonstrations(2000, seed=0)
    assert np.mean([ReviewEnv.gold_reward(d["prompt"], d["completion"]) for d in demos]) < 0.5
    lengths = np.array([len(d["completion"].split()) for d in demos])
    assert lengths.min() >= 3 and lengths.max() <= 10
    assert ReviewEnv.gold_reward("review : the plot was", " ".join(review.POSITIVE)) == 1.0


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_preference_labels_agree_with_gold_at_the_documented_rate(env_id):
    cls, module = envs.env_class(env_id), MODULES[env_id]
    prefs = cls.preferences(4000, seed=0)
    gaps = np.array(
        [gold_of(cls, p["prompt"], p["chosen"]) - gold_of(cls, p["prompt"], p["rejected"]) for p in prefs]
    )
    assert (gaps != 0).all()  # ties are redrawn
    ceiling = label_accuracy_ceiling(gaps, module.PREFERENCE_TEMPERATURE)
    assert ceiling == pytest.approx(module.PREFERENCE_LABEL_ACCURACY, abs=0.01)
    assert (gaps > 0).mean() == pytest.approx(ceiling, abs=0.02)
    assert 0.85 <= ceiling <= 0.97  # noisy, but a reward model can reach >= 0.80


def test_reset_options_pick_the_task_and_are_validated():
    review_env = envs.make("rlhf/Review-v0")
    assert review_env.reset(options={"prompt": "review : the cast is"})[0] == "review : the cast is"
    with pytest.raises(ValueError, match="does not fit the observation space"):
        review_env.reset(options={"prompt": "Review!"})
    arithmetic_env = envs.make("rlhf/Arithmetic-v0")
    assert arithmetic_env.reset(options={"a": 12, "b": 7})[0] == "1 2 + 7 ="
    assert arithmetic_env.step("1 9")[1] == 1.0
    with pytest.raises(ValueError, match="options need both 'a' and 'b'"):
        arithmetic_env.reset(options={"a": 3})
    guess_env = envs.make("rlhf/GuessNumber-v0")
    guess_env.reset(options={"secret": 9})
    assert guess_env.step("9")[:3] == ("correct", 1.0, True)
    with pytest.raises(ValueError, match=r"options\['secret'\] must be an int in 1..16"):
        guess_env.reset(options={"secret": 17})


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
def test_any_reply_of_32_vocabulary_tokens_fits_the_action_space(env_id):
    """A trainer decoding up to 32 tokens never trips the over-long-action error."""
    cls = envs.env_class(env_id)
    longest = max(cls.vocabulary(), key=len)
    env = envs.make(env_id)
    env.reset(seed=0)
    env.step(" ".join([longest] * 32))
