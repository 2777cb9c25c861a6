"""Steps per second of each built-in environment, scripted reference policy; Gymnasium's CartPole-v1 as the peer.

    .venv/bin/python benchmarks/env_steps.py [--seconds 2] [--num-envs 64]

Times whole episodes (reset + action + step until the episode ends) and reports env steps per second for the
TextEnv itself (what `envs.make` returns and the trainer uses), also with a seeded reset every episode, through
`gymnasium.make`'s wrappers, and as `gymnasium.vector.SyncVectorEnv` of `--num-envs` copies (counted per
sub-environment step, autoreset in the same step). The reference row runs Gymnasium's own `CartPole-v1` through
the same loops with random actions (`action_space.sample()`). Target: > 10,000 steps/s, so that environments
cost nothing next to generation (~6,000 tokens/s for a tiny model). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import gymnasium
import measure
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs

PEER_ID = "CartPole-v1"


def policy_for(env: gymnasium.Env) -> Callable[[gymnasium.Env], object]:
    """The scripted reference reply of a TextEnv; a random action for anything else (the peer)."""
    if isinstance(env.unwrapped, envs.TextEnv):
        return lambda e: e.unwrapped.reference_action()
    return lambda e: e.action_space.sample()


def steps_per_second(env: gymnasium.Env, seconds: float, seed_every_episode: bool) -> tuple[float, float]:
    """(steps/s, episodes/s) over at least `seconds` of reset-and-roll episodes.

    seed_every_episode: reset(seed=i) for episode i (re-seeding has its own cost: numpy builds a new
    generator); else reset(seed=0) once and plain reset() after, as a trainer drawing prompts does.
    """
    act = policy_for(env)
    steps = episodes = 0
    env.reset(seed=0)
    env.action_space.seed(0)

    def play_200_episodes() -> None:
        nonlocal steps, episodes
        for _ in range(200):
            env.reset(seed=episodes if seed_every_episode else None)
            done = False
            while not done:
                _, _, terminated, truncated, _ = env.step(act(env))
                steps += 1
                done = terminated or truncated
            episodes += 1

    elapsed = sum(lap.wall_s for lap in measure.timed(play_200_episodes, seconds=seconds))
    return steps / elapsed, episodes / elapsed


def vector_steps_per_second(env_id: str, num_envs: int, seconds: float) -> float:
    """Sub-environment steps/s of a SyncVectorEnv of `num_envs` `gymnasium.make(env_id)` copies."""
    vec = SyncVectorEnv(
        [lambda: gymnasium.make(env_id) for _ in range(num_envs)], autoreset_mode=AutoresetMode.SAME_STEP
    )
    act = policy_for(vec.envs[0])
    vec.reset(seed=0)
    vec.action_space.seed(0)

    def twenty_steps() -> None:
        for _ in range(20):
            vec.step(tuple(act(e) for e in vec.envs))

    laps = measure.timed(twenty_steps, seconds=seconds)
    vec.close()
    return 20 * num_envs * len(laps) / sum(lap.wall_s for lap in laps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="measuring time per environment and variant"
    )
    parser.add_argument("--num-envs", type=int, default=64, help="copies in the SyncVectorEnv column")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, gymnasium {gymnasium.__version__}, {platform.machine()}\n")
    print(
        "| environment | steps/s | episodes/s | steps/s, reset(seed=i) each episode | steps/s via gymnasium.make "
        f"| env-steps/s, SyncVectorEnv x{args.num_envs} |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for env_id in (*envs.BUILTIN_IDS, PEER_ID):
        bare = envs.make(env_id) if env_id in envs.BUILTIN_IDS else gymnasium.make(env_id).unwrapped
        steps, episodes = steps_per_second(bare, args.seconds, seed_every_episode=False)
        seeded, _ = steps_per_second(bare, args.seconds, seed_every_episode=True)
        wrapped, _ = steps_per_second(gymnasium.make(env_id), args.seconds, seed_every_episode=False)
        vector = vector_steps_per_second(env_id, args.num_envs, args.seconds)
        name = env_id if env_id in envs.BUILTIN_IDS else f"{env_id} (peer: Gymnasium, random actions)"
        print(f"| {name} | {steps:,.0f} | {episodes:,.0f} | {seeded:,.0f} | {wrapped:,.0f} | {vector:,.0f} |")
    print(
        f"\n`.venv/bin/python benchmarks/env_steps.py --seconds {args.seconds:g} --num-envs {args.num_envs}`"
    )


if __name__ == "__main__":
    main()
