"""Built-in environments in Gymnasium's vector envs give what single environments give."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv, SyncVectorEnv

import envs
from envs.arithmetic import parse_problem, spell


def policy(env_id: str, obs: str, rng: np.random.Generator) -> str:
    """Replies that earn varied rewards: right sums, random review words, random guesses."""
    if env_id == "rlhf/Arithmetic-v0":
        a, b = parse_problem(obs) if "+" in obs else (0, 0)
        return spell(a + b + int(rng.integers(0, 2)))  # right half of the time
    if env_id == "rlhf/Review-v0":
        return " ".join(rng.choice(envs.env_class(env_id).vocabulary(), size=3))
    return str(rng.integers(1, 17))


@pytest.mark.parametrize("env_id", envs.BUILTIN_IDS)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_vector_env_matches_single_envs(env_id, kind):
    seeds = [10, 11, 12]
    fns = [lambda: gymnasium.make(env_id) for _ in seeds]
    # Text spaces need shared_memory=False in AsyncVectorEnv (else stale strings come back).
    vector = SyncVectorEnv(fns) if kind == "sync" else AsyncVectorEnv(fns, shared_memory=False)
    singles = [envs.make(env_id) for _ in seeds]
    try:
        obs, _ = vector.reset(seed=seeds)
        assert list(obs) == [env.reset(seed=s)[0] for env, s in zip(singles, seeds)]
        rng = np.random.default_rng(0)
        ended = [False] * len(seeds)
        total = 0.0
        for _ in range(12):
            actions = tuple(policy(env_id, o, rng) for o in obs)
            obs, rewards, terminated, truncated, _ = vector.step(actions)
            for i, env in enumerate(singles):
                # gymnasium's default next-step autoreset: the step after an episode ends resets it
                expected = (env.reset()[0], 0.0, False, False) if ended[i] else env.step(actions[i])[:4]
                ended[i] = expected[2] or expected[3]
                assert (obs[i], float(rewards[i]), bool(terminated[i]), bool(truncated[i])) == expected
            total += float(np.sum(rewards))
        assert total > 0  # the comparison covered rewarded steps, not only zeros
    finally:
        vector.close()
