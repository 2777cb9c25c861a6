"""One process at a time in a run directory: an exclusive `flock` on `<run dir>/.rlhf.lock`, held while it runs.

The holder writes its pid, host and start time into the file, so a second `rlhf` in the same directory fails at
once with one line naming it. The operating system releases the lock when the holder exits, however it exits
(kill -9 included): there is no stale lock to clean up. Under torchrun the processes of one run share the
directory; only the main process takes the lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".rlhf.lock"


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Create `run_dir` if needed and hold its lock for the body; ValueError (one line) when it cannot be written
    or another process holds it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if not os.access(run_dir, os.W_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ValueError(
            f"cannot write to run directory {run_dir} ({e.strerror}); set hydra.run.dir=<writable dir>"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ValueError(
            f"run directory {run_dir} is in use by {holder}; wait for it to finish, or set hydra.run.dir=<another dir>"
        ) from None
    try:
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {stamp})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
