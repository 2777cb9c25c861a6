"""Moved to `rlhf.models.pretrained`: this old path keeps configs, scripts and `python -m rlhf.pretrained` working, with a warning."""

import sys
import warnings

from rlhf.models import pretrained

warnings.warn(
    "rlhf.pretrained moved to rlhf.models.pretrained: update the import, `_target_` or `python -m` path",
    FutureWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    pretrained.main()
else:
    sys.modules[__name__] = pretrained
