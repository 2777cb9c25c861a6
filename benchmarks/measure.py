"""How every benchmark measures: wall and CPU time, peak memory, the machine's load, one side of a comparison in its
own process, the `rlhf` command timed, and the record of a run (its command line, --json).

Standard library only (torch is imported where a function needs it), so that the peer side of
benchmarks/ppo_vs_trl.py, which runs in its own venv, measures itself the same way. Importing this module puts the
repository root on the path (`python benchmarks/x.py` puts only benchmarks/ there), so that scripts import envs/ and
rlhf/ from this checkout.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------- time


class Stopwatch:
    """Wall seconds (`perf_counter`) and this process's CPU seconds (`process_time`) since it started."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu_s(self) -> float:
        return time.process_time() - self.cpu0


@dataclass
class Lap:
    """One timed call: its wall seconds, this process's CPU seconds during it, and what it returned."""

    wall_s: float
    cpu_s: float
    value: Any = None


def timed(fn: Callable[[], Any], runs: int = 1, seconds: float = 0.0) -> list[Lap]:
    """Call `fn` at least `runs` times and until `seconds` have passed; one Lap per call."""
    laps: list[Lap] = []
    start = Stopwatch()
    while len(laps) < runs or start.wall_s < seconds:
        watch = Stopwatch()
        value = fn()
        laps.append(Lap(watch.wall_s, watch.cpu_s, value))
    return laps


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """This process's CPU time / (wall time x torch threads): ~1 when its threads had the cores to themselves, lower
    when other processes took turns on them (the time is then inflated)."""
    import torch

    return cpu_s / max(wall_s * torch.get_num_threads(), 1e-9)


def load_1min() -> float:
    """The 1-min load average: with N threads on N cores one other busy process slows every parallel op, so rows
    show it."""
    return os.getloadavg()[0]


# ---------------------------------------------------------------------------------------------- memory


def _proc_status_mib(field: str, pid: int | str = "self") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (VmHWM; MiB).

    Not `ru_maxrss` where /proc has VmHWM: Linux carries the spawning process's peak RSS over into a child's
    `ru_maxrss` (exec records the old address space's high-water mark, and subprocess's vfork shares the parent's),
    so a side started by a driver holding 2.8 GB reports >= 2.8 GB whatever it uses itself.
    """
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now (VmRSS; MiB), or nan where /proc is missing."""
    rss = _proc_status_mib("VmRSS")
    return rss if rss is not None else float("nan")


def children_peak_rss_mib() -> float:
    """The largest peak resident memory (MiB) of the child processes this process has waited for so far
    (`ru_maxrss` of RUSAGE_CHILDREN): for a command this process does not run itself, such as `rlhf`. It includes
    this process's RSS when it started the child (see `peak_rss_mib`), small for a driver that loads no model."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def sample_descendants_rss(interval: float = 0.2) -> list[float]:
    """Start a daemon thread sampling the summed RSS (MiB) of this process's descendants, e.g. wandb-core.

    Returns a one-item list holding the peak so far. `ru_maxrss` of RUSAGE_CHILDREN would count a fork of this
    process before its exec (wandb runs git) as a full copy; such not-yet-exec'd copies are skipped here.
    """
    peak = [0.0]
    me, page = os.readlink("/proc/self/exe"), os.sysconf("SC_PAGE_SIZE")

    def descendants(pid: int) -> list[int]:
        found = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for kid in map(int, f.read().split()):
                    found += [kid, *descendants(kid)]
        return found

    def loop() -> None:
        while True:
            total = 0
            try:
                for pid in descendants(os.getpid()):
                    if os.readlink(f"/proc/{pid}/exe") != me:
                        with open(f"/proc/{pid}/statm") as f:
                            total += int(f.read().split()[1]) * page
            except OSError:  # a process ended mid-walk: skip this sample
                total = 0
            peak[0] = max(peak[0], total / 2**20)
            time.sleep(interval)

    threading.Thread(target=loop, daemon=True).start()
    return peak


# ---------------------------------------------------------------------------------------------- processes


def run_side(
    cmd: list[str],
    label: str | None = None,
    *,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
) -> dict[str, Any]:
    """Run one side of a comparison in a fresh process, so that its peak memory and threads are its own; return its
    result, the JSON object on the last such line of its output, plus `load_before` (the 1-min load average when it
    started) and `process_s` (its wall time: interpreter start, imports and exit included).

    label: printed with the load before the side starts. log: the side's stdout and stderr go to this file as it
    runs (else they are captured). env: variables added to this process's (TOKENIZERS_PARALLELISM=false always).
    check: exit with the side's error output when it fails; else return {"error": its output's tail, ...}.
    """
    load = load_1min()
    if label is not None:
        print(f"  load {load:.2f} before {label}", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    watch = Stopwatch()
    if log is None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
        out, err = proc.stdout, proc.stderr
    else:
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        out = err = log.read_text()
    seconds = watch.wall_s
    if proc.returncode != 0:
        tail = err[-3000:] + (f"\n(whole output: {log})" if log else "")
        if check:
            sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{tail}")
        return {"error": tail, "load_before": load, "process_s": seconds}
    return {**_last_json_object(out), "load_before": load, "process_s": seconds}


def _last_json_object(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON object line in the output:\n{text[-3000:]}")


RLHF = [sys.executable, "-m", "rlhf"]
"""This checkout's command line, whatever is installed."""


@dataclass
class CommandRun:
    """`rlhf ARGS` run by `run_rlhf`: the command as shown, its wall seconds, and the finished process."""

    command: str
    seconds: float
    proc: subprocess.CompletedProcess[str]


def run_rlhf(args: list[str], log: Path | None = None, env: dict[str, str] | None = None) -> CommandRun:
    """`rlhf ARGS` from the repository root, timed; its stdout and stderr also go to `log` when given. env: the
    whole environment (default: this process's)."""
    shown = "rlhf " + shlex.join(args)
    print(f"running: {shown}", file=sys.stderr, flush=True)
    lap = timed(lambda: subprocess.run([*RLHF, *args], cwd=ROOT, env=env, capture_output=True, text=True))[0]
    if log is not None:
        log.write_text(lap.value.stdout + lap.value.stderr)
    return CommandRun(shown, lap.wall_s, lap.value)


# ---------------------------------------------------------------------------------------------- the record


def command_line(script: str) -> str:
    """The command that reproduces this run, from the repository root."""
    return " ".join([os.path.relpath(sys.executable, ROOT), f"benchmarks/{script}", *sys.argv[1:]])


def write_results(path: Path, script: str, key: dict[str, float], results: Any) -> None:
    """--json output: the command, the key numbers (what benchmarks/summary.py prints) and every row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command_line(script), "key": key, "results": results}, indent=1))
