"""What tests share: Hydra overrides for runs through the pipeline or the `rlhf` command (add what a test needs
after them: a later override of the same key wins), `free_port`, tiny models and toy text environments."""

from __future__ import annotations

import socket
from typing import Any, ClassVar

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from envs.base import TextEnv


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


WORDS = ["a", "b", "c", "d", "x", "y", "z", "go", "more", "end"]


class ToyEnv(TextEnv):
    """Single-turn: prompt "go x y"; reward = fraction of "a" words in the reply (0 for an empty reply)."""

    charset: ClassVar[str] = "abcdgoxyzmren "
    max_action_length: ClassVar[int] = 200
    max_observation_length: ClassVar[int] = 50

    def _reset(self, options):
        n = int(self.np_random.integers(1, 4))
        return "go " + " ".join(self.np_random.choice(["x", "y", "z"], size=n)), {}

    def _step(self, action):
        w = action.split()
        return "", (sum(t == "a" for t in w) / len(w) if w else 0.0), True, {}

    @classmethod
    def vocabulary(cls) -> list[str]:
        return WORDS


class DialogueEnv(ToyEnv):
    """Multi-turn: after each reply the env answers "more x y" (2-3 words); 3 turns, reward per turn."""

    max_turns: ClassVar[int] = 3

    def _step(self, action):
        w = action.split()
        r = sum(t == "b" for t in w) / len(w) if w else 0.0
        msg = "more " + " ".join(
            self.np_random.choice(["x", "y", "z"], size=int(self.np_random.integers(1, 3)))
        )
        return msg, r, False, {"turn_reward": r}


class BrokenEnv(ToyEnv):
    """Raises on the step of one chosen episode seed."""

    bad_seed: ClassVar[int] = -1

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._seed = seed
        return super().reset(seed=seed, options=options)

    def _step(self, action):
        if self._seed == self.bad_seed:
            raise KeyError("boom")
        return super()._step(action)


class NanEnv(ToyEnv):
    """Returns NaN without going through TextEnv's own check (like a user's plain gymnasium env)."""

    def step(self, action):
        return "", float("nan"), True, False, {}


def tiny_llama(tokenizer, seed: int = 0, eos_bias: float | None = None) -> LlamaForCausalLM:
    """A ~50k-parameter Llama; `eos_bias` adds a bias to the EOS logit (and forbids the other special tokens)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=eos_bias is None,  # like the pipeline's tiny model; untied to add a bias
    )
    model = LlamaForCausalLM(config)
    if eos_bias is not None:
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[tokenizer.eos_token_id] = eos_bias
            for special in tokenizer.all_special_ids:  # <pad>, <unk>, <reply>: never a reply's token
                if special != tokenizer.eos_token_id:
                    head.bias[special] = -30.0
        model.lm_head = head
    return model.eval()
