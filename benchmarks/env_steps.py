"""Steps per second of each built-in environment, single env, scripted reference policy.

    python benchmarks/env_steps.py [--seconds 2]

Times whole episodes (reset + reference_action + step until the episode ends) and reports env
steps per second for the TextEnv itself (what `envs.make` returns and the trainer uses), also with
a seeded reset every episode, and through `gymnasium.make`'s wrappers. Target: > 10,000 steps/s, so that environments cost nothing
next to generation (~6,000 tokens/s for a tiny model). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import time

import gymnasium

import envs


def steps_per_second(env: gymnasium.Env, seconds: float, seed_every_episode: bool) -> tuple[float, float]:
    """(steps/s, episodes/s) over at least `seconds` of reset-and-roll episodes.

    seed_every_episode: reset(seed=i) for episode i (re-seeding costs ~40 us: numpy builds a new
    generator); else reset(seed=0) once and plain reset() after, as a trainer drawing prompts does.
    """
    unwrapped = env.unwrapped
    steps = episodes = 0
    env.reset(seed=0)
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        for _ in range(200):
            env.reset(seed=episodes if seed_every_episode else None)
            done = False
            while not done:
                _, _, terminated, truncated, _ = env.step(unwrapped.reference_action())
                steps += 1
                done = terminated or truncated
            episodes += 1
        elapsed = time.perf_counter() - start
    return steps / elapsed, episodes / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measuring time per environment and variant"
    )
    args = parser.parse_args()
    print(f"python {platform.python_version()}, gymnasium {gymnasium.__version__}, {platform.machine()}\n")
    print(
        "| environment | steps/s | episodes/s | steps/s, reset(seed=i) each episode | steps/s via gymnasium.make |"
    )
    print("|---|---:|---:|---:|---:|")
    for env_id in envs.BUILTIN_IDS:
        steps, episodes = steps_per_second(envs.make(env_id), args.seconds, seed_every_episode=False)
        seeded, _ = steps_per_second(envs.make(env_id), args.seconds, seed_every_episode=True)
        wrapped, _ = steps_per_second(gymnasium.make(env_id), args.seconds, seed_every_episode=False)
        print(f"| {env_id} | {steps:,.0f} | {episodes:,.0f} | {seeded:,.0f} | {wrapped:,.0f} |")


if __name__ == "__main__":
    main()
