"""`TextEnv`: the contract every text environment follows, built-in or a user's own.

An episode is a conversation between the environment and the policy. `reset` returns the first
message (the prompt); each `step` takes the policy's reply (whatever its tokenizer decodes: words
joined by single spaces) and returns the environment's next message, a reward, and whether the
episode ended. Single-turn tasks end after one reply (`terminated=True`, next observation "");
multi-turn tasks go on until the task ends (`terminated`) or `max_turns` replies were made
(`truncated`: the episode was cut off, not finished).

Subclasses set the class attributes and implement `_reset` and `_step`; the public `reset` and
`step` here do the bookkeeping and reject bad input with an error that names the environment id
and the broken constraint, so a mistake in a trainer or a user's policy surfaces at once instead
of as a silently wrong reward.

`info` keys set by every TextEnv (subclasses add their own, documented in their docstrings):
    "turn": int   policy replies made so far in this episode (0 after reset).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium
import numpy as np
from gymnasium import spaces

__all__ = [
    "TextEnv",
    "bradley_terry_pair",
    "id_of",
    "label_accuracy_ceiling",
    "preference_pair",
    "printable_charset",
    "printable_text_space",
    "words",
]


def id_of(env: gymnasium.Env) -> str:
    """How errors name an environment: its registered id when made through `gymnasium.make`, else its class name."""
    spec = getattr(env, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


def words(text: str) -> list[str]:
    """Split a reply on any whitespace: policies decode to single spaces, users type anything."""
    return text.split()


class TextEnv(gymnasium.Env[str, str]):
    """A Gymnasium environment whose observations and actions are text.

    Class attributes (subclasses set them):
        charset: every character an observation or action may hold; must include " ".
        max_action_length: the longest reply, in characters, `step` accepts; leave room for what a
            trainer decodes (the built-ins fit 32 tokens of their longest word).
        max_observation_length: the longest message, in characters, the environment sends.
        max_turns: policy replies per episode; 1 = single-turn, >1 = multi-turn (truncated after this many).

    Subclasses implement (randomness only through `self.np_random`, seeded by `reset`):
        _reset(options) -> (observation, info)
        _step(action) -> (observation, reward, terminated, info)     action already validated
        reference_action() -> str                                    optional scripted policy
    and the classmethods `vocabulary`, `demonstrations`, `preferences` (and `gold_reward` for
    single-turn tasks) so that a tokenizer and offline datasets exist without an instance.
    `step` adds `truncated` (turn == max_turns and not terminated) and info["turn"].
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    charset: ClassVar[str]
    max_action_length: ClassVar[int]
    max_observation_length: ClassVar[int]
    max_turns: ClassVar[int] = 1

    def __init__(self) -> None:
        for name in ("charset", "max_action_length", "max_observation_length"):
            if not hasattr(type(self), name):
                raise ValueError(
                    f"{type(self).__name__}: set the class attribute `{name}` (see envs.base.TextEnv)"
                )
        if " " not in self.charset:
            raise ValueError(f"{type(self).__name__}: charset must include ' ' (words are space-separated)")
        if self.max_turns < 1:
            raise ValueError(f"{type(self).__name__}: max_turns must be >= 1, got {self.max_turns}")
        self.observation_space = spaces.Text(
            max_length=self.max_observation_length, charset=self.charset, min_length=0
        )
        self.action_space = spaces.Text(max_length=self.max_action_length, charset=self.charset, min_length=0)
        self._charset_set = frozenset(self.charset)
        self._turn = 0
        self._started = False
        self._finished = ""  # "terminated" / "truncated" once the episode is over

    # ------------------------------------------------------------------ identity and errors
    @property
    def env_id(self) -> str:
        """The registered id when made through `gymnasium.make`, else the class name."""
        return id_of(self)

    @property
    def turn(self) -> int:
        """Policy replies made so far in this episode."""
        return self._turn

    def _check_action(self, action: Any) -> None:
        """Raise the contract's errors; leaves the episode untouched so the caller may retry."""
        if not self._started:
            raise RuntimeError(f"{self.env_id}: step() called before reset(); call reset() first")
        if self._finished:
            raise RuntimeError(
                f"{self.env_id}: step() called after the episode ended ({self._finished} at turn "
                f"{self._turn}); call reset() to start a new episode"
            )
        if not isinstance(action, str):
            raise ValueError(
                f"{self.env_id}: action must be a str (the policy's decoded reply), got {type(action).__name__}"
            )
        if len(action) > self.max_action_length:
            raise ValueError(
                f"{self.env_id}: action has {len(action)} characters, more than max_action_length="
                f"{self.max_action_length}; truncate the reply (e.g. fewer generated tokens)"
            )
        if not self._charset_set.issuperset(action):
            bad = sorted(set(action) - self._charset_set)
            raise ValueError(
                f"{self.env_id}: action holds characters outside the charset: {''.join(bad)!r}; "
                f"allowed: {self.charset!r}"
            )

    def _check_observation(self, obs: Any) -> None:
        """An environment's own message must fit its observation space (a bug in the env, not the policy)."""
        if not isinstance(obs, str):
            raise ValueError(
                f"{self.env_id}: observations must be str, _reset/_step returned {type(obs).__name__}"
            )
        if len(obs) > self.max_observation_length or not self._charset_set.issuperset(obs):
            raise ValueError(
                f"{self.env_id}: observation {obs[:40]!r} ({len(obs)} characters) does not fit the observation "
                f"space: raise max_observation_length={self.max_observation_length} or widen the charset"
            )

    # ------------------------------------------------------------------ gymnasium API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self._turn = 0
        self._finished = ""
        self._started = True
        obs, info = self._reset(options or {})
        self._check_observation(obs)
        info["turn"] = 0
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action)
        self._turn += 1
        obs, reward, terminated, info = self._step(action)
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(
                f"{self.env_id}: reward {reward} at turn {self._turn} is not finite; return a finite float"
            )
        terminated = bool(terminated)
        truncated = not terminated and self._turn >= self.max_turns
        if terminated:
            self._finished = "terminated"
        elif truncated:
            self._finished = "truncated"
        self._check_observation(obs)
        info["turn"] = self._turn
        return obs, reward, terminated, truncated, info

    # ------------------------------------------------------------------ subclass hooks
    def _reset(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Start an episode using `self.np_random`; return the first message and a new info dict."""
        raise NotImplementedError

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        """Apply a validated reply; return (next message, reward, terminated, new info dict)."""
        raise NotImplementedError

    def reference_action(self) -> str:
        """A scripted good reply for the current state (a baseline and a test oracle)."""
        raise NotImplementedError(f"{type(self).__name__} has no scripted reference policy")

    # ------------------------------------------------------------------ offline data
    @classmethod
    def vocabulary(cls) -> list[str]:
        """Every whitespace-separated word observations, demonstrations and preferences use."""
        raise NotImplementedError(
            f"{cls.__name__} declares no vocabulary; set model.name_or_path to a tokenizer"
        )

    @classmethod
    def demonstrations(cls, n: int, seed: int) -> list[dict[str, Any]]:
        """SFT data in TRL's format: {"prompt", "completion"} or {"messages"}; deliberately imperfect."""
        raise NotImplementedError(f"{cls.__name__} has no demonstrations; set sft.dataset to a file")

    @classmethod
    def preferences(cls, n: int, seed: int) -> list[dict[str, Any]]:
        """Reward-model data in TRL's format {"prompt", "chosen", "rejected"}, labelled with noise."""
        raise NotImplementedError(f"{cls.__name__} has no preference pairs; set reward.dataset to a file")

    @classmethod
    def gold_reward(cls, prompt: str, completion: str) -> float:
        """Single-turn tasks: the environment's reward for `completion` after `prompt`, in [0, 1]."""
        raise NotImplementedError(
            f"{cls.__name__} has no gold_reward (multi-turn: sum the episode's rewards)"
        )


def bradley_terry_pair(
    rng: np.random.Generator,
    prompt: Any,
    response_a: Any,
    response_b: Any,
    reward_a: float,
    reward_b: float,
    temperature: float,
) -> dict[str, Any]:
    """Label a pair like a noisy human would: `a` is chosen with probability sigmoid((r_a - r_b) / T).

    Consumes exactly one random number, so datasets stay reproducible whatever the rewards.
    """
    p_a = 1.0 / (1.0 + math.exp(-(reward_a - reward_b) / temperature))
    if rng.random() < p_a:
        return {"prompt": prompt, "chosen": response_a, "rejected": response_b}
    return {"prompt": prompt, "chosen": response_b, "rejected": response_a}


def preference_pair(
    rng: np.random.Generator,
    prompt: Any,
    draw: Callable[[], Any],
    reward: Callable[[Any], float],
    temperature: float,
) -> dict[str, Any]:
    """A labelled pair for `prompt`: two responses from `draw()`, drawn again while `reward` ties them (a tie
    teaches a reward model nothing), then labelled by `bradley_terry_pair`."""
    while True:
        a, b = draw(), draw()
        reward_a, reward_b = reward(a), reward(b)
        if reward_a != reward_b:
            return bradley_terry_pair(rng, prompt, a, b, reward_a, reward_b, temperature)


def label_accuracy_ceiling(reward_gaps: list[float] | np.ndarray, temperature: float) -> float:
    """Bayes ceiling of preference accuracy under Bradley-Terry noise: mean of sigmoid(|gap| / T).

    No model, however good, agrees with the noisy labels more often than this in expectation.
    """
    gaps = np.abs(np.asarray(reward_gaps, dtype=np.float64))
    return float(np.mean(1.0 / (1.0 + np.exp(-gaps / temperature))))


PRINTABLE_RANGES = (
    (0x20, 0x7F),  # ASCII
    (0xA0, 0x250),  # Latin-1 and Latin extended
    (0x370, 0x530),  # Greek, Cyrillic
    (0x2000, 0x2C00),  # punctuation (dashes, quotes), arrows, math, box drawing, shapes, symbols, dingbats
    (0x3000, 0x3040),  # CJK punctuation
    (0x1F300, 0x1FB00),  # emoji
)
"""Unicode ranges whose printable characters `printable_charset` holds."""


@functools.cache
def printable_charset() -> str:
    """Newline, tab and the printable characters of PRINTABLE_RANGES (~5,800): the charset of environments that
    speak free text. Questions, game boards ("●", "│") and a real model's replies (en dashes, accents) fit; control
    characters such as NUL stay out."""
    return "\n\t" + "".join(c for a, b in PRINTABLE_RANGES for c in map(chr, range(a, b)) if c.isprintable())


@functools.cache
def printable_text_space(max_length: int) -> spaces.Text:
    """A `spaces.Text` over `printable_charset()` with `min_length=0`, one instance per length for all environments."""
    return spaces.Text(max_length=max_length, charset=printable_charset(), min_length=0)
