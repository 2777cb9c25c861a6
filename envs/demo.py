"""Roll every built-in environment with simple policies and print mean gold rewards.

`python -m envs.demo [--episodes N]` prints one markdown row per environment: the scripted
reference policy, a policy of random vocabulary words, one of random characters (junk), and the
gold of the SFT demonstrations, which is what RL has to improve on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

import envs
from envs.base import TextEnv

Policy = Callable[[TextEnv, np.random.Generator], str]


def random_words(env: TextEnv, rng: np.random.Generator) -> str:
    """1-8 words drawn uniformly from the task's vocabulary."""
    return " ".join(rng.choice(type(env).vocabulary(), size=int(rng.integers(1, 9))))[: env.max_action_length]


def random_characters(env: TextEnv, rng: np.random.Generator) -> str:
    """Up to 30 characters drawn uniformly from the charset."""
    return "".join(rng.choice(list(env.charset), size=int(rng.integers(0, 31))))


def reference(env: TextEnv, rng: np.random.Generator) -> str:
    return env.reference_action()


def mean_return(env: TextEnv, policy: Policy, episodes: int, seed: int = 0) -> float:
    """Mean episode return (= gold for the built-in tasks) over seeds seed..seed+episodes-1."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(episodes):
        env.reset(seed=seed + i)
        done = False
        while not done:
            _, reward, terminated, truncated, _ = env.step(policy(env, rng))
            total += reward
            done = terminated or truncated
    return total / episodes


def demonstrations_gold(cls: type[TextEnv], n: int) -> float:
    """Mean gold of the SFT demonstrations (transcripts for dialogue tasks)."""
    rows = cls.demonstrations(n, seed=0)
    if "messages" in rows[0]:
        return float(np.mean([cls.dialogue_gold(r["messages"]) for r in rows]))  # type: ignore[attr-defined]
    return float(np.mean([cls.gold_reward(r["prompt"], r["completion"]) for r in rows]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m envs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=500, help="episodes per policy and environment")
    args = parser.parse_args(argv)
    print("| environment | reference | random words | random characters | demonstrations |")
    print("|---|---|---|---|---|")
    for env_id in envs.BUILTIN_IDS:
        env = envs.make(env_id)
        row = [mean_return(env, p, args.episodes) for p in (reference, random_words, random_characters)]
        row.append(demonstrations_gold(type(env), 4000))
        print(f"| {env_id} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
        env.close()


if __name__ == "__main__":
    main()
