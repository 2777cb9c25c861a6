"""`rlhf/SkyRL-v0`: skyrl-gym's text environments (`BaseTextEnv`) over the rows of a dataset, single- or multi-turn.

    pip install -c constraints.txt -e ".[skyrl-gym]"
    gymnasium.make("rlhf/SkyRL-v0", env="gsm8k", data="gsm8k.jsonl")
    rlhf task=skyrl task.env_kwargs.env=gsm8k_multi_turn task.env_kwargs.data=/abs/path/rows.jsonl ...

A skyrl-gym environment is made per example from a dataset row in SkyRL's format: `prompt` (a string or chat
messages) plus the environment's extras (e.g. `reward_spec: {ground_truth: "72"}` for gsm8k). `reset(seed)` draws a
row with `self.np_random`, makes `skyrl_gym.make(env, env_config=env_config, extras=row)` and returns its `init`
conversation as text (message contents joined by blank lines); each step returns the environment's new messages,
its reward and `done` as `terminated`. Episodes still running after `max_turns` replies (default: the skyrl-gym
environment's own `max_turns`) are truncated.

`data`: a .jsonl / .json file of rows, or the list of rows itself.
info after each step: the environment's `metadata`, plus "turn".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.adapter import TextAdapter, import_library

__all__ = ["SkyRLEnv"]


class SkyRLEnv(TextAdapter):
    """One dataset row per episode, played by a skyrl-gym environment."""

    def __init__(
        self,
        env: str = "gsm8k",
        data: str | list[dict[str, Any]] | None = None,
        env_config: dict[str, Any] | None = None,
        max_turns: int | None = None,
        max_observation_length: int = 16_384,
        max_action_length: int = 4_096,
    ) -> None:
        self._skyrl = import_library("skyrl_gym", "rlhf/SkyRL-v0", "skyrl-gym")
        self.env_name = env
        self.env_config = dict(env_config or {})
        self.rows = _rows(data)
        if not self.rows:
            raise ValueError(f"rlhf/SkyRL-v0: data={data!r} holds no rows")
        probe = self._make(self.rows[0])
        self.max_turns = int(max_turns or getattr(probe, "max_turns", 1) or 1)
        probe.close()
        super().__init__(max_observation_length, max_action_length)
        self._env = None
        self._turn = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        if self._env is not None:
            self._env.close()
        index = int(self.np_random.integers(len(self.rows)))
        row = self.rows[index]
        self._env = self._make(row)
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        conversation, _ = self._env.init(messages)
        self._turn = 0
        return self._text(conversation), {"index": index}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action, running=self._env is not None)
        out = self._env.step(action)
        self._turn += 1
        terminated = bool(out["done"])
        truncated = not terminated and self._turn >= self.max_turns
        info = {**(out.get("metadata") or {}), "turn": self._turn}
        if terminated or truncated:
            self._env.close()
            self._env = None
        return self._text(out.get("observations") or []), float(out["reward"]), terminated, truncated, info

    def _make(self, row: dict[str, Any]):
        try:
            return self._skyrl.make(self.env_name, env_config=self.env_config, extras=row)
        except self._skyrl.error.Error as e:  # not in skyrl-gym's registry
            raise ValueError(f"rlhf/SkyRL-v0: env={self.env_name!r}: {e}") from e
        except (AssertionError, KeyError) as e:  # a row without the extras this environment needs
            raise ValueError(f"rlhf/SkyRL-v0: env={self.env_name!r} cannot take the row {row}: {e!r}") from e

    def _text(self, messages: list[dict[str, str]]) -> str:
        return self._printable("\n\n".join(str(m.get("content", "")).strip() for m in messages))


def _rows(data: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Dataset rows from a .jsonl / .json file, or the rows themselves."""
    if data is None:
        raise ValueError("rlhf/SkyRL-v0 needs data=<.jsonl or .json file of rows> (or the list of rows)")
    if not isinstance(data, str | Path):
        return [dict(row) for row in data]
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"rlhf/SkyRL-v0: data={str(data)!r} is not a file")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        return list(json.loads(path.read_text()))
    raise ValueError(f"rlhf/SkyRL-v0: data={str(data)!r}: use a .jsonl or .json file")
