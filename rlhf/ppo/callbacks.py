"""What a PPO run reports, and to whom: the trainer calls a `Callback` on the main process; it knows no console and no
tracker (the PPO stage's callback drives both: `rlhf.stages.ppo`)."""

from __future__ import annotations

from rlhf.ppo.rollout import Rollout


class Callback:
    """Hooks of `PPOTrainer.train`, each a no-op here: override those you need. Called on the main process only."""

    def on_resume(self, history: list[dict]) -> None:
        """A checkpoint was resumed: the history rows up to it (`{"update": k, ...metrics}`), e.g. to replay them
        into a tracker that may have lost those of the killed run."""

    def on_train_start(self, update: int, num_updates: int) -> None:
        """Training starts (or continues) after update `update` of `num_updates`."""

    def on_update(self, update: int, metrics: dict[str, float], rollout: Rollout) -> None:
        """Update `update` (1-based) is done: its metrics (also in history.jsonl) and its episodes."""

    def on_train_end(self) -> None:
        """`train` is done with its updates."""
