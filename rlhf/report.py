"""Moved to `rlhf.tracking.report`: this old path keeps configs, scripts and `python -m rlhf.report` working, with a warning."""

import sys
import warnings

from rlhf.tracking import report

warnings.warn(
    "rlhf.report moved to rlhf.tracking.report: update the import, `_target_` or `python -m` path",
    FutureWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    report.main()
else:
    sys.modules[__name__] = report
