"""Hydra overrides shared by the tests that train through the pipeline or the `rlhf` command, and `free_port`.

Import them (`from tests.conftest import TINY`) and add what a test needs after them: a later override of the same
key wins.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port no one listens on now, for a torchrun rendezvous: a fixed port collides with another run of the
    suite on the same machine (EADDRINUSE)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=2"]
"""The tiny Llama, smaller than the default one (`conf/model/tiny.yaml`)."""

TINY = [
    *TINY_MODEL,
    "task.num_demonstrations=48",
    "task.num_preferences=48",
    "task.eval_fraction=0.25",
    "sft.num_train_epochs=1",
    "reward.num_train_epochs=1",
    "sft.per_device_train_batch_size=16",
    "reward.per_device_train_batch_size=16",
]
"""SFT and the reward model on the tiny Llama in 3 optimizer steps each (36 training rows, 12 held out)."""

TINY_PPO = [
    "ppo.batch_size=16",
    "ppo.num_mini_batches=2",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=4",
    "ppo.total_episodes=32",
    "evaluate.num_prompts=16",
]
"""PPO in 2 updates of 16 episodes, replies of at most 4 tokens; evaluation on 16 prompts."""

TINY_CHAIN = [*TINY, *TINY_PPO]
"""Every stage (sft, reward, ppo, evaluate) as fast as the pipeline runs them."""
