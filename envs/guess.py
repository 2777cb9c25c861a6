"""`rlhf/GuessNumber-v0`: find a secret number from higher/lower hints (a multi-turn task).

Dialogue (the environment speaks first; numbers are single words "1".."16"):

    env: "guess a number from 1 to 16 :"    policy: "8"
    env: "higher"                           policy: "12"
    env: "lower"                            policy: "10"
    env: "correct"                          (terminated)

The secret is drawn from 1..N (N = 16) with `np_random`. Each reply must be exactly one number word
in 1..N; anything else is answered "invalid" and still costs a turn. After `max_turns` = 6 replies
without success the episode is truncated (the last hint is the final observation).

Reward (the gold reward), paid on the step that ends the episode, 0 on every other step:

    success at turn k: 1 - (k - 1) / max_turns     (1.0 at the first reply, 1/6 at the sixth)
    no success within max_turns: 0

Binary search always succeeds within 5 replies (mean gold 0.60); guessing uniformly among the
numbers the hints still allow succeeds 90% of the time (mean gold 0.48).

Offline data (conversational TRL formats; each dialogue is a whole episode, ending with the
environment's last message, so it shows the outcome):
- demonstrations {"messages": [...]}: a sloppy player that guesses uniformly among the numbers the
  hints allow, but with probability 0.5 ignores the hints and guesses anywhere in 1..N: success ~64%,
  mean gold DEMO_MEAN_GOLD ~= 0.34, so RL can raise both (binary search: 100%, 0.60).
- preferences {"prompt": [first env message], "chosen": [...], "rejected": [...]}: two dialogues for
  the same secret from players of random sloppiness (0..0.6), redrawn while their gold is equal;
  Bradley-Terry label noise with temperature 0.1: P(chosen = higher gold) = sigmoid(|gap| / 0.1);
  gaps are multiples of 1/6, Bayes ceiling PREFERENCE_LABEL_ACCURACY ~= 0.94.

`info` keys: "turn"; after a step also "success" (bool), "gold" (this step's reward), "guess" (the
parsed number, or None when the reply was invalid). `dialogue_gold(messages)` scores a transcript.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from envs.base import TextEnv, preference_pair, words

N = 16
PREFERENCE_TEMPERATURE = 0.1
DEMO_MEAN_GOLD = 0.34
PREFERENCE_LABEL_ACCURACY = 0.94
"""Bayes ceiling of the preference labels' agreement with gold (see `label_accuracy_ceiling`)."""
DEMO_SLOPPINESS = 0.5
HIGHER, LOWER, CORRECT, INVALID = "higher", "lower", "correct", "invalid"
NUMBERS = tuple(str(i) for i in range(1, N + 1))
_NUMBER_OF = {w: i for i, w in enumerate(NUMBERS, start=1)}


class GuessNumberEnv(TextEnv):
    """Multi-turn: guess the secret in as few replies as possible. See the module docstring."""

    charset: ClassVar[str] = "abcdefghijklmnopqrstuvwxyz0123456789 :"
    max_action_length: ClassVar[int] = 256
    max_observation_length: ClassVar[int] = 40
    max_turns: ClassVar[int] = 6
    opening: ClassVar[str] = f"guess a number from 1 to {N} :"

    def __init__(self) -> None:
        super().__init__()
        self._secret = 1
        self._lo, self._hi = 1, N  # numbers the hints so far allow (for the reference policy)

    # ------------------------------------------------------------------ episodes
    def _reset(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if "secret" in options:
            secret = options["secret"]
            if not isinstance(secret, int) or not 1 <= secret <= N:
                raise ValueError(f"{self.env_id}: options['secret'] must be an int in 1..{N}, got {secret!r}")
            self._secret = secret
        else:
            self._secret = int(self.np_random.integers(1, N + 1))
        self._lo, self._hi = 1, N
        return self.opening, {}

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        reply = words(action)
        guess = _NUMBER_OF.get(reply[0]) if len(reply) == 1 else None
        if guess is None:
            return INVALID, 0.0, False, {"success": False, "gold": 0.0, "guess": None}
        if guess == self._secret:
            gold = success_reward(self.turn, self.max_turns)
            return CORRECT, gold, True, {"success": True, "gold": gold, "guess": guess}
        if guess < self._secret:
            self._lo = max(self._lo, guess + 1)
            hint = HIGHER
        else:
            self._hi = min(self._hi, guess - 1)
            hint = LOWER
        return hint, 0.0, False, {"success": False, "gold": 0.0, "guess": guess}

    def reference_action(self) -> str:
        """Binary search: the middle of the numbers the hints still allow (always succeeds within 5)."""
        return str((self._lo + self._hi) // 2)

    # ------------------------------------------------------------------ offline data
    @classmethod
    def vocabulary(cls) -> list[str]:
        return list(dict.fromkeys([*cls.opening.split(), *NUMBERS, HIGHER, LOWER, CORRECT, INVALID]))

    @classmethod
    def dialogue_gold(cls, messages: list[dict[str, str]]) -> float:
        """Gold of a transcript: success_reward at the assistant turn answered "correct", else 0."""
        turn = 0
        for message in messages:
            if message["role"] == "assistant":
                turn += 1
            elif turn and message["content"].strip() == CORRECT:
                return success_reward(turn, cls.max_turns) if turn <= cls.max_turns else 0.0
        return 0.0

    @classmethod
    def demonstrations(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            secret = int(rng.integers(1, N + 1))
            out.append({"messages": _play(rng, secret, DEMO_SLOPPINESS, cls)})
        return out

    @classmethod
    def preferences(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        return [_preference(rng, cls) for _ in range(n)]


def success_reward(turn: int, max_turns: int) -> float:
    """1 at the first reply, falling by 1 / max_turns per extra reply."""
    return 1.0 - (turn - 1) / max_turns


def _preference(rng: np.random.Generator, cls: type[GuessNumberEnv]) -> dict[str, Any]:
    """Two dialogues for one secret, from players of random sloppiness (0..0.6), with different gold; the prompt is
    the opening message, the responses the rest of each dialogue."""
    secret = int(rng.integers(1, N + 1))
    opening = [{"role": "user", "content": cls.opening}]
    return preference_pair(
        rng,
        opening,
        draw=lambda: _play(rng, secret, float(rng.uniform(0.0, 0.6)), cls)[1:],
        reward=lambda reply: cls.dialogue_gold([*opening, *reply]),
        temperature=PREFERENCE_TEMPERATURE,
    )


def _play(
    rng: np.random.Generator, secret: int, sloppiness: float, cls: type[GuessNumberEnv]
) -> list[dict[str, str]]:
    """One whole episode of a player who follows the hints except with probability `sloppiness`."""
    messages = [{"role": "user", "content": cls.opening}]
    lo, hi = 1, N
    for _ in range(cls.max_turns):
        guess = int(rng.integers(1, N + 1)) if rng.random() < sloppiness else int(rng.integers(lo, hi + 1))
        messages.append({"role": "assistant", "content": str(guess)})
        if guess == secret:
            messages.append({"role": "user", "content": CORRECT})
            break
        if guess < secret:
            lo = max(lo, guess + 1)
            messages.append({"role": "user", "content": HIGHER})
        else:
            hi = min(hi, guess - 1)
            messages.append({"role": "user", "content": LOWER})
    return messages
