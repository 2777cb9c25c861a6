"""`rlhf/TextArena-v0`: TextArena's single-player games as multi-turn text environments.

    pip install -c constraints.txt -e ".[textarena]"
    gymnasium.make("rlhf/TextArena-v0", game="GuessTheNumber-v0")            # any single-player TextArena game id
    gymnasium.make("rlhf/TextArena-v0", game="TowerOfHanoi-v0", max_turns=12)
    rlhf task=textarena task.env_kwargs.game=Minesweeper-v0-small model=smollm2   # the same from the command line

An episode is one game: the first observation is the game's opening text (rules and board), each step plays the
policy's reply as the player's move and returns what the game said since (its answer, the new board). The reward
is 0 until the game ends, then the game's outcome for the player (TextArena's reward: 1 for a win, 0 or a share of
the way for a loss; a game with a non-numeric outcome counts 0). An episode still running after `max_turns` moves
is truncated with reward 0. TextArena ends a game after a second invalid move.

TextArena draws from Python's and numpy's global random generators; each environment here keeps its own copies
(seeded from `self.np_random` at reset) and swaps them in around every call into the game, so an episode depends on
its seed alone, whatever other environments of the batch do in between. Games that need data files TextArena
downloads on first use (nltk corpora: Wordle, Hangman, ...) do not run offline.

info after each step: "turn"; at the end also "reason" (TextArena's explanation), "invalid_move" and "success"
(the reward is at least 1).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np

from envs.adapter import TextAdapter, import_library

__all__ = ["TextArenaEnv"]

PLAYER = 0
"""The policy's player id in a single-player game."""


class TextArenaEnv(TextAdapter):
    """One TextArena single-player game per episode; the policy's replies are the moves."""

    def __init__(
        self,
        game: str = "GuessTheNumber-v0",
        max_turns: int = 8,
        max_observation_length: int = 16_384,
        max_action_length: int = 1_024,
        **game_kwargs: Any,
    ) -> None:
        """game: a TextArena environment id; max_turns: moves before the episode is truncated; game_kwargs: the
        game's own options (passed to `textarena.make`)."""
        textarena = import_library("textarena", "rlhf/TextArena-v0", "textarena")
        from textarena.core import Wrapper

        if max_turns < 1:
            raise ValueError(f"rlhf/TextArena-v0: max_turns must be >= 1, got {max_turns}")
        self.game = game
        self.max_turns = max_turns
        super().__init__(max_observation_length, max_action_length)
        self._random = _random_states(0)
        with self._own_random():
            try:
                self._game = textarena.make(game, **game_kwargs)
            except ValueError as e:  # not in TextArena's registry
                raise ValueError(f"rlhf/TextArena-v0: game={game!r}: {e}") from e
        raw = self._game
        while isinstance(
            raw, Wrapper
        ):  # the innermost game gives each turn's new messages (wrappers keep all)
            raw = raw.env
        self._raw = raw
        self._turn = 0
        self._running = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        game_seed = int(self.np_random.integers(2**31))
        self._random = _random_states(game_seed)
        with self._own_random():
            try:
                self._game.reset(num_players=1, seed=game_seed)
            except AssertionError as e:  # TextArena asserts its games' numbers of players
                raise ValueError(
                    f"{self.env_id}: game={self.game!r} is not a single-player game ({e})"
                ) from e
            obs = self._new_text()
        self._turn = 0
        self._running = True
        return obs, {"turn": 0}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        self._check_action(action, running=self._running, episode="a running game")
        with self._own_random():
            done, _ = self._game.step(action)
            obs = self._new_text()
            outcome = self._game.close() if done else None
        self._turn += 1
        info: dict[str, Any] = {"turn": self._turn}
        reward = 0.0
        if outcome is not None:
            rewards, game_info = outcome
            reward = _number((rewards or {}).get(PLAYER))
            player_info = (game_info or {}).get(PLAYER, {})
            info |= {
                "reason": str(player_info.get("reason", "")),
                "invalid_move": bool(player_info.get("invalid_move", False)),
                "success": reward >= 1.0,
            }
        truncated = not done and self._turn >= self.max_turns
        self._running = not (done or truncated)
        return obs, reward, bool(done), truncated, info

    # ------------------------------------------------------------------ helpers
    def _new_text(self) -> str:
        """What the game told the player since the last call (not the player's own move), printable only."""
        _, messages = self._raw.get_observation()
        texts = [str(m[1]).strip() for m in messages or [] if m[0] != PLAYER]
        return self._printable("\n".join(t for t in texts if t), keep_end=True)

    @contextlib.contextmanager
    def _own_random(self) -> Iterator[None]:
        """Run with this environment's own state of Python's and numpy's global generators."""
        outer = random.getstate(), np.random.get_state()
        random.setstate(self._random[0])
        np.random.set_state(self._random[1])
        try:
            yield
        finally:
            self._random = random.getstate(), np.random.get_state()
            random.setstate(outer[0])
            np.random.set_state(outer[1])


def _random_states(seed: int) -> tuple[Any, Any]:
    """States of Python's `random` and numpy's legacy global generator seeded with `seed`."""
    return random.Random(seed).getstate(), np.random.RandomState(seed).get_state()


def _number(value: Any) -> float:
    """A game's reward as a finite float (some games report a message instead: 0)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0
