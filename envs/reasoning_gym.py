"""`rlhf/ReasoningGym-v0`: any reasoning-gym dataset as a single-turn text environment.

    pip install -c constraints.txt -e ".[reasoning-gym]"
    gymnasium.make("rlhf/ReasoningGym-v0", dataset="leg_counting")                  # any reasoning-gym dataset name
    gymnasium.make("rlhf/ReasoningGym-v0", dataset="leg_counting", max_animals=3)   # plus the dataset's own options
    rlhf task=reasoning_gym task.env_kwargs.dataset=basic_arithmetic model=smollm2     # the same from the command line

`reset(seed)` draws one entry of `reasoning_gym.create_dataset(dataset, size=size, seed=data_seed, **options)` with
`self.np_random`; the observation is the entry's question followed by `instruction` (answer briefly). The policy's
one reply ends the episode; the reward is the dataset's own `score_answer(reply, entry)`, in [0, 1].

info after the step: "answer" (the dataset's reference answer) and "success" (the score is 1).
"""

from __future__ import annotations

from typing import Any

from envs.adapter import TextAdapter, import_library

__all__ = ["INSTRUCTION", "ReasoningGymEnv"]

INSTRUCTION = "Answer with the final answer only, no explanation."
"""Appended to every question: a small model's replies are cut at `ppo.response_length` tokens."""


class ReasoningGymEnv(TextAdapter):
    """One question of a reasoning-gym dataset per episode, scored by the dataset itself."""

    max_turns = 1

    def __init__(
        self,
        dataset: str = "leg_counting",
        size: int = 100_000,
        data_seed: int = 0,
        instruction: str = INSTRUCTION,
        max_observation_length: int = 16_384,
        max_action_length: int = 2_048,
        **options: Any,
    ) -> None:
        """dataset: a name of `reasoning_gym.factory.DATASETS`; size, data_seed: the procedural dataset's size and
        seed (entries are generated on demand, so a large size costs nothing); options: the dataset's config."""
        reasoning_gym = import_library("reasoning_gym", "rlhf/ReasoningGym-v0", "reasoning-gym")
        try:
            self.dataset = reasoning_gym.create_dataset(dataset, size=size, seed=data_seed, **options)
        except (ValueError, TypeError, AssertionError) as e:  # unknown name, unknown or invalid option
            raise ValueError(f"rlhf/ReasoningGym-v0: dataset={dataset!r} with options {options}: {e}") from e
        super().__init__(max_observation_length, max_action_length)
        self.dataset_name = dataset
        self.instruction = instruction
        self._entry: dict[str, Any] | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        index = int(self.np_random.integers(len(self.dataset)))
        self._entry = self.dataset[index]
        question = str(self._entry["question"]).strip()
        text = f"{question}\n{self.instruction}" if self.instruction else question
        return self._printable(text), {"dataset": self.dataset_name, "index": index}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action, running=self._entry is not None)
        entry, self._entry = self._entry, None
        score = float(self.dataset.score_answer(answer=action.strip(), entry=entry) or 0.0)
        info = {"answer": str(entry["answer"]), "success": score >= 1.0}
        return "", score, True, False, info
