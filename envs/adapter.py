"""`TextAdapter`: the base of the adapters, which put another library's environments behind Gymnasium's text API.

An adapter speaks free text both ways: its spaces hold every printable character (`printable_text_space`), it keeps
what is printable of the library's messages and cuts them to the observation space, and it refuses a reply that
does not fit the action space with a ValueError naming the environment id (as a `TextEnv` does).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, ClassVar

import gymnasium

from envs.base import id_of, printable_charset, printable_text_space

__all__ = ["TextAdapter", "import_library"]


def import_library(module: str, env_id: str, extra: str) -> ModuleType:
    """The adapted library's `module`, or a ValueError naming the extra of this project that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f'{env_id} needs {extra}: pip install -c constraints.txt -e ".[{extra}]"') from e


class TextAdapter(gymnasium.Env[str, str]):
    """An environment of another library as a `gymnasium.Env[str, str]` over printable text.

    Subclasses call `__init__` with their spaces' lengths, `_check_action` first thing in `step`, and pass the
    library's messages through `_printable`.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, max_observation_length: int, max_action_length: int) -> None:
        self.observation_space = printable_text_space(max_observation_length)
        self.action_space = printable_text_space(max_action_length)

    @property
    def env_id(self) -> str:
        """The registered id when made through `gymnasium.make`, else the class name."""
        return id_of(self)

    def _check_action(self, action: Any, running: bool, episode: str = "an episode") -> None:
        """Refuse a step outside a running `episode` (RuntimeError) and an action outside the action space
        (ValueError); the episode is left as it was."""
        if not running:
            raise RuntimeError(f"{self.env_id}: step() without {episode}; call reset() first")
        if not isinstance(action, str) or action not in self.action_space:
            raise ValueError(
                f"{self.env_id}: action must be a str of at most {self.action_space.max_length} printable "
                f"characters, got {str(action)[:40]!r}"
            )

    def _printable(self, text: str, keep_end: bool = False) -> str:
        """The printable characters of `text`, cut to the observation space's length: the start kept, or the end
        (`keep_end`)."""
        allowed = printable_charset()
        text = "".join(c for c in text if c in allowed)
        limit = self.observation_space.max_length
        return text[-limit:] if keep_end else text[:limit]
