"""Episode seeds: training episodes and evaluation episodes never share one."""

from __future__ import annotations

SEED_SPACE = 2**31
"""Training episodes use seeds in [0, 2**31); evaluation uses EVAL_SEED_OFFSET + i, so they never overlap."""
EVAL_SEED_OFFSET = 2**31


def train_episode_seed(seed: int, index: int) -> int:
    """Seed of the index-th training prompt of a run seeded `seed` (disjoint from evaluation seeds)."""
    return (seed * 1_000_003 + index) % SEED_SPACE


def rollout_seeds(seed: int, first_episode: int, count: int, group_size: int) -> list[int]:
    """Seeds of the `count` episodes from global episode index `first_episode` on: the `group_size` samples of a
    prompt share its seed (GRPO / RLOO groups)."""
    return [train_episode_seed(seed, (first_episode + j) // group_size) for j in range(count)]
