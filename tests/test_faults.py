"""Fault injection: kill -9 the real `rlhf` command at a random point of every stage, rerun the same command, and
get what an uninterrupted run gets: the same weights, history.jsonl, eval.json and W&B history of PPO."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.tracking.wandb_offline import find_offline_runs, read_offline_run
from tests.helpers import TINY_MODEL

ARGS = [
    *TINY_MODEL,
    "task.num_demonstrations=64",
    "task.num_preferences=64",
    "task.eval_fraction=0.25",
    "sft.num_train_epochs=2",
    "reward.num_train_epochs=2",
    "sft.per_device_train_batch_size=8",
    "reward.per_device_train_batch_size=8",
    "sft.logging_steps=1",
    "reward.logging_steps=1",
    "ppo.total_episodes=64",
    "ppo.batch_size=16",
    "ppo.num_mini_batches=2",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=6",
    "ppo.save_every=1",
    "evaluate.num_prompts=64",
    "evaluate.batch_size=16",
]
TIMING = ("eps", "time/rollout", "time/score", "time/update", "tokens_per_second")
WEIGHTS = (
    "sft/model.safetensors",
    "reward/model.safetensors",
    "ppo/model.safetensors",
    "ppo/critic/model.safetensors",
)
REPO = Path(__file__).resolve().parents[1]


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rlhf", *ARGS, f"hydra.run.dir={run_dir}"]


def environment() -> dict[str, str]:
    """The runs' own W&B service: not the pytest process's (WANDB_SERVICE, set by in-process tests before this
    one), which would keep a killed run's id "in use" and refuse its resume."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def kill_when(run_dir: Path, ready, delay: float, timeout: float = 600) -> None:
    """Start the command, wait until `ready(new log text)` holds, wait `delay` seconds more, then SIGKILL it."""
    log = run_dir / "rlhf.log"
    offset = log.stat().st_size if log.exists() else 0
    stderr = run_dir.parent / f"{run_dir.name}-stderr.txt"  # why a run ended early, should one
    proc = subprocess.Popen(
        command(run_dir), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr.open("w")
    )
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready(lambda: log.read_text()[offset:] if log.exists() else ""):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    assert code == -signal.SIGKILL, (
        f"the run ended (exit {code}) before the kill: {stderr.read_text()[-1500:]}"
    )


def logged(line: str):
    """Ready once the run's log shows `line` (e.g. `[sft] step 3 |`: the trainer is at step 3)."""

    def ready(text) -> bool:
        time.sleep(0.01)
        return line in text()

    return ready


def checkpoint_done(run_dir: Path, update: int):
    """Ready once PPO's checkpoint of update `update` is in place (the kill then lands in a later update)."""
    path = run_dir / "ppo" / "checkpoints" / f"checkpoint-{update:06d}"

    def ready(text) -> bool:
        time.sleep(0.005)
        return path.exists()

    return ready


def checkpoint_being_written(run_dir: Path):
    """A new checkpoint directory being written (polled without a pause: a tiny one takes milliseconds); one left
    half-written by an earlier kill does not count."""
    root = run_dir / "ppo" / "checkpoints"

    def tmp_dirs() -> set[tuple[str, int]]:
        try:
            return {(e.name, e.inode()) for e in os.scandir(root) if e.name.startswith(".tmp-")}
        except FileNotFoundError:
            return set()

    leftovers: list[set[tuple[str, int]]] = []  # taken at the first poll, as the command starts

    def ready(text) -> bool:
        if not leftovers:
            leftovers.append(tmp_dirs())
        return bool(tmp_dirs() - leftovers[0])

    return ready


def finished_stages(run_dir: Path) -> set[str]:
    path = run_dir / "summary.json"
    return set(json.loads(path.read_text())["stages"]) if path.exists() else set()


def history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "ppo" / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def ppo_wandb_rows(run_dir: Path) -> tuple[list[dict], int]:
    """objective/kl rows of every offline file of the PPO stage's W&B run (killed processes' files included), and
    the number of processes that wrote to that run."""
    run_id = json.loads((run_dir / "summary.json").read_text())["stages"]["ppo"]["wandb_run"]
    dirs = [d for d in find_offline_runs(run_dir) if d.name.endswith(run_id)]
    rows = [
        row for d in dirs for row in read_offline_run(d, wait_seconds=2)["history"] if "objective/kl" in row
    ]
    return rows, len(dirs)


@pytest.mark.slow
def test_kill_9_in_every_stage_then_the_same_command_gives_the_uninterrupted_result(tmp_path):
    seed = int(os.environ.get("FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        command(straight), cwd=REPO, env=environment(), check=True, capture_output=True, timeout=900
    )

    # Each kill lands at a random point early in its stage, so that it lands before the stage ends: by step 8 of the
    # 12 optimizer steps of sft and reward (a later step leaves too little time), after PPO's checkpoint 1 or 2 of
    # its 4 updates, and early in evaluate.
    kills = [
        ("sft", logged(f"[sft] step {rng.randint(1, 8)} |"), rng.uniform(0.0, 0.02)),
        ("reward", logged(f"[reward] step {rng.randint(1, 8)} |"), rng.uniform(0.0, 0.02)),
        ("ppo", checkpoint_done(killed, rng.randint(1, 2)), rng.uniform(0.0, 0.05)),
        ("ppo", checkpoint_being_written(killed), 0.0),  # mid-checkpoint
        ("evaluate", logged(": evaluate (seed "), rng.uniform(0.0, 0.15)),
    ]
    for stage, ready, delay in kills:
        kill_when(killed, ready, delay)
        assert stage not in finished_stages(killed), f"killed after {stage} finished (FAULT_SEED={seed})"
    subprocess.run(command(killed), cwd=REPO, env=environment(), check=True, capture_output=True, timeout=900)

    for name in WEIGHTS:
        a, b = load_file(straight / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, seed)
    assert history(killed) == history(straight) and [r["update"] for r in history(killed)] == [1, 2, 3, 4]
    eval_a = json.loads((straight / "evaluate" / "eval.json").read_text())
    eval_b = json.loads((killed / "evaluate" / "eval.json").read_text())
    assert eval_a["metrics"] == eval_b["metrics"] and eval_a["samples"] == eval_b["samples"]
    # W&B: every PPO update exactly once across the killed and the resumed processes' files, as history.jsonl has it
    rows, processes = ppo_wandb_rows(killed)
    assert processes == 3, seed  # killed after a checkpoint, killed mid-checkpoint, finished: one W&B run
    assert sorted(r["_step"] for r in rows) == [1, 2, 3, 4], seed
    expected = {r["update"]: r for r in history(straight)}
    for row in rows:
        want = {k: v for k, v in expected[row["_step"]].items() if k != "update"}
        assert {k: row[k] for k in want} == want, (row["_step"], seed)
    assert sorted(r["_step"] for r in ppo_wandb_rows(straight)[0]) == [1, 2, 3, 4]
