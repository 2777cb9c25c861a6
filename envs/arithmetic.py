"""`rlhf/Arithmetic-v0`: add two numbers, digit by digit (a verifiable-reward task).

Prompt: the operands' digits as separate words, "1 7 + 5 =" (a in 0..19, b in 0..9, so sums
0..28 and carries occur); reply: the sum's digits, "2 2". The range is small on purpose: a 2-layer
d=64 Llama trained on 2,000 demonstrations for 10 epochs (625 steps of 32, ~16 s on one CPU thread)
answers 90% right greedily, yet sampling at temperature 1 it copies the demonstrations' mistakes
(mean gold ~0.45), which leaves room for RL with the verifiable reward. (3 epochs: greedy 0.50.)

Gold reward (the environment's reward), correctness in [0, 1] with partial credit:

    reply digits == answer digits            -> 1.0
    same number of digits, some positions wrong -> fraction of positions right (e.g. "2 3" for 22: 0.5)
    wrong number of digits, a non-digit word, empty -> 0.0

so stopping after the answer matters ("2 2 2" scores 0) and a near miss beats a wild guess.

Offline data:
- demonstrations: DEMO_ACCURACY = 60% exact answers; the rest are typical mistakes (off by one,
  a dropped or spurious carry, a random sum): mean gold DEMO_MEAN_GOLD ~= 0.70.
- preferences: two replies for the same problem drawn like the demonstrations, redrawn while their
  gold is equal; label by Bradley-Terry noise with temperature 0.25: P(chosen = higher gold) =
  sigmoid(|gap| / 0.25). Gaps are 0.5 or 1, so the Bayes ceiling of label accuracy is
  PREFERENCE_LABEL_ACCURACY ~= 0.93.

`info` keys after a step: "turn", "gold" (= reward), "answer" (the correct digits, e.g. "2 2"),
"correct" (bool: exact answer).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from envs.base import TextEnv, preference_pair, words

DIGITS = tuple(str(d) for d in range(10))
DEMO_ACCURACY = 0.6
DEMO_MEAN_GOLD = 0.70
PREFERENCE_TEMPERATURE = 0.25
PREFERENCE_LABEL_ACCURACY = 0.93
"""Bayes ceiling of the preference labels' agreement with gold (see `label_accuracy_ceiling`)."""


def spell(number: int) -> str:
    """12 -> "1 2": one word per digit, so a word-level tokenizer needs only ten digit tokens."""
    return " ".join(str(number))


def digit_score(reply: str, answer: int) -> float:
    """The gold formula of the module docstring."""
    got = words(reply)
    want = list(str(answer))
    if len(got) != len(want):
        return 0.0
    right = 0
    for g, w in zip(got, want):
        if g == w:
            right += 1
        elif g not in DIGITS:
            return 0.0
    return right / len(want)


def parse_problem(prompt: str) -> tuple[int, int]:
    """ "1 7 + 5 =" -> (17, 5); ValueError for anything else."""
    left, sep, right = prompt.partition("+")
    right = right.strip().removesuffix("=")
    if not sep or not left.split() or not right.split():
        raise ValueError(f"not an addition prompt like '1 7 + 5 =': {prompt!r}")
    return int("".join(left.split())), int("".join(right.split()))


class ArithmeticEnv(TextEnv):
    """Single-turn: answer `a + b`. See the module docstring."""

    charset: ClassVar[str] = "0123456789+= "
    max_action_length: ClassVar[int] = 128
    max_observation_length: ClassVar[int] = 32
    max_turns: ClassVar[int] = 1
    a_range: ClassVar[tuple[int, int]] = (0, 19)
    """Inclusive range of the first operand."""
    b_range: ClassVar[tuple[int, int]] = (0, 9)
    """Inclusive range of the second operand."""

    def __init__(self) -> None:
        super().__init__()
        self._a = self._b = 0

    # ------------------------------------------------------------------ episodes
    def _reset(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if "a" in options or "b" in options:
            a, b = options.get("a"), options.get("b")
            if not (isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0):
                raise ValueError(
                    f"{self.env_id}: options need both 'a' and 'b' as non-negative ints, got {options}"
                )
            if len(_prompt(a, b)) > self.max_observation_length:
                raise ValueError(
                    f"{self.env_id}: options a={a}, b={b} make a prompt longer than the observation space"
                )
            self._a, self._b = a, b
        else:
            self._a, self._b = _draw_problem(self.np_random, self.a_range, self.b_range)
        return _prompt(self._a, self._b), {}

    def _step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        answer = self._a + self._b
        gold = digit_score(action, answer)
        return "", gold, True, {"gold": gold, "answer": spell(answer), "correct": gold == 1.0}

    def reference_action(self) -> str:
        """The exact sum (gold 1)."""
        return spell(self._a + self._b)

    # ------------------------------------------------------------------ offline data
    @classmethod
    def vocabulary(cls) -> list[str]:
        return [*DIGITS, "+", "="]

    @classmethod
    def gold_reward(cls, prompt: str, completion: str) -> float:
        a, b = parse_problem(prompt)
        return digit_score(completion, a + b)

    @classmethod
    def demonstrations(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            a, b = _draw_problem(rng, cls.a_range, cls.b_range)
            out.append({"prompt": _prompt(a, b), "completion": spell(_draw_answer(rng, a, b, cls))})
        return out

    @classmethod
    def preferences(cls, n: int, seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)
        return [_preference(rng, cls) for _ in range(n)]


def _prompt(a: int, b: int) -> str:
    return f"{spell(a)} + {spell(b)} ="


def _preference(rng: np.random.Generator, cls: type[ArithmeticEnv]) -> dict[str, Any]:
    """Two replies to one problem, drawn like the demonstrations, with different gold."""
    a, b = _draw_problem(rng, cls.a_range, cls.b_range)
    return preference_pair(
        rng,
        _prompt(a, b),
        draw=lambda: spell(_draw_answer(rng, a, b, cls)),
        reward=lambda reply: digit_score(reply, a + b),
        temperature=PREFERENCE_TEMPERATURE,
    )


def _draw_problem(
    rng: np.random.Generator, a_range: tuple[int, int], b_range: tuple[int, int]
) -> tuple[int, int]:
    n_b = b_range[1] - b_range[0] + 1
    a, b = divmod(int(rng.integers((a_range[1] - a_range[0] + 1) * n_b)), n_b)  # one scalar draw: fast
    return a_range[0] + a, b_range[0] + b


def _draw_answer(rng: np.random.Generator, a: int, b: int, cls: type[ArithmeticEnv]) -> int:
    """The sum with probability DEMO_ACCURACY, else a typical mistake (never the sum)."""
    answer = a + b
    if rng.random() < DEMO_ACCURACY:
        return answer
    kind = rng.random()
    if kind < 0.4:  # off by one
        wrong = answer + (1 if rng.random() < 0.5 else -1)
    elif kind < 0.7:  # the carry dropped, or one added where there was none
        carried = (a % 10) + (b % 10) >= 10
        wrong = answer - 10 if carried else answer + 10
    else:  # a random sum
        wrong = int(rng.integers(0, cls.a_range[1] + cls.b_range[1] + 1))
    if wrong < 0 or wrong == answer:
        wrong = answer + 1
    return wrong
