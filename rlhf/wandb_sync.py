"""Moved to `rlhf.tracking.wandb_sync`: this old path keeps configs, scripts and `python -m rlhf.wandb_sync` working, with a warning."""

import sys
import warnings

from rlhf.tracking import wandb_sync

warnings.warn(
    "rlhf.wandb_sync moved to rlhf.tracking.wandb_sync: update the import, `_target_` or `python -m` path",
    FutureWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit(wandb_sync.main())
else:
    sys.modules[__name__] = wandb_sync
