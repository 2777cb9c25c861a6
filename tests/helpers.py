"""What tests share: Hydra overrides for runs through the pipeline or the `rlhf` command (add what a test needs
after them: a later override of the same key wins), `free_port`, tiny models and toy text environments.

torch and transformers load inside the model builders, so that environment tests (and the user packages they write,
which import the test environments from here) start fast."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from envs.base import TextEnv

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

    from rlhf.ppo.config import PPOConfig


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


class NonFiniteRewardEnv(ToyEnv):
    """Its `_step` rewards `reward` (NaN; a subclass may set another), which TextEnv's `step` refuses."""

    reward: ClassVar[float] = float("nan")

    def _step(self, action):
        return "", self.reward, True, {}


def ppo_config(**fields: Any) -> PPOConfig:
    """The PPO config of a trainer a test builds: rewards from the environment, no checkpoints, no sample tables;
    `fields` over these."""
    from rlhf.ppo.config import PPOConfig

    return PPOConfig(**{"reward_source": "env", "save_every": 0, "samples_every": 0, **fields})


# ---------------------------------------------------------------------------------------------- tiny models
def special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """A model config's vocabulary size and special ids, from its tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def tiny_llama_config(
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    width: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    positions: int = 128,
    **fields: Any,
) -> LlamaConfig:
    """The config of every tiny test Llama: `width` (hidden size; the MLP twice as wide), `layers`, `heads` query
    and `kv_heads` key/value heads (default: as many), `positions`; the vocabulary and special ids of `tokenizer`
    when given; `fields` (any LlamaConfig field: vocab_size, num_labels, tie_word_embeddings, ...) over these."""
    from transformers import LlamaConfig

    sizes = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "max_position_embeddings": positions,
    }
    special = special_ids(tokenizer) if tokenizer is not None else {}
    return LlamaConfig(**{**sizes, **special, **fields})


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, eos_bias: float | None = None
) -> LlamaForCausalLM:
    """A ~50k-parameter Llama; `eos_bias` adds a bias to the EOS logit (and forbids the other special tokens)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    # like the pipeline's tiny model the head is tied to the embeddings; untied where a bias is added
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, tie_word_embeddings=eos_bias is None))
    if eos_bias is not None:
        eos = tokenizer.eos_token_id
        never = {
            s: -30.0 for s in tokenizer.all_special_ids if s != eos
        }  # <pad>, <unk>, <reply>: not a reply's
        biased_head(model, {**never, eos: eos_bias})
    return model.eval()


def biased_head(model: PreTrainedModel, biases: dict[int, float], others: float = 0.0) -> PreTrainedModel:
    """Replace `model`'s output layer by one with the same weights and a bias: `biases[token]` on those tokens,
    `others` on every other token."""
    import torch

    config = model.config
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.fill_(others)
        for token, bias in biases.items():
            head.bias[token] = bias
    model.lm_head = head
    return model


def saved_tokenizer(tokenizer: PreTrainedTokenizerBase, path: Path) -> PreTrainedTokenizerBase:
    """`tokenizer` as every stage gets it: saved to `path`, then loaded by `load_tokenizer` (pad defaulted to eos)."""
    from rlhf.models.tokenizer import load_tokenizer

    tokenizer.save_pretrained(path)
    return load_tokenizer(path)
