"""Every stage on a tokenizer like a real model's: byte-level BPE, BOS, pad = eos, ChatML with a turn newline.

The word-level tiny tokenizer hides most real-world formatting bugs; these runs take the same stages through a
BPE stand-in, single-turn (review) and multi-turn (guess), including a resumed PPO stage.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf.cli import compose
from rlhf.models.chat_format import ChatFormat
from rlhf.models.loading import load_tokenizer
from rlhf.run.pipeline import run
from tests.helpers import TINY_CHAIN

BPE = [
    *TINY_CHAIN,
    "model.tokenizer=bpe",
    "model.max_position_embeddings=512",
    "ppo.save_every=1",
    "evaluate.batch_size=16",
    "logger=none",
]


@pytest.mark.parametrize(
    ("task", "extra"),
    [
        ("review", ["ppo.response_length=8"]),
        ("guess", ["experiment=guess"]),  # replies of 4 tokens, as TINY_CHAIN sets
    ],
)
def test_whole_chain_on_a_bpe_tokenizer(tmp_path, task, extra):
    run_dir = tmp_path / task
    summary = run(compose([*BPE, *extra]), run_dir=run_dir)
    stages = summary["stages"]
    assert list(stages) == ["sft", "reward", "ppo", "evaluate"]
    tokenizer = load_tokenizer(stages["ppo"]["artifact"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.bos_token_id is not None
    assert stages["ppo"]["metrics"]["updates"] == 2
    history = [json.loads(line) for line in (run_dir / "ppo" / "history.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(row["objective/scores"])) for row in history)
    evaluation = json.loads((run_dir / "evaluate" / "eval.json").read_text())
    assert {"sft/gold_reward", "ppo/gold_reward", "ppo/proxy_reward"} <= set(evaluation["metrics"])
    # the samples show the template's turns: the policy answered after the generation prompt
    fmt = ChatFormat(tokenizer)
    assert fmt.is_chat and all(
        "<|im_start|>" not in row[2].split("<|im_end|>")[0]
        for row in evaluation["samples"]
        if task == "review"
    )
    if task == "guess":
        assert any(
            "<|im_start|>user" in row[2] for row in evaluation["samples"]
        )  # later turns are user turns


@pytest.mark.slow
def test_ppo_killed_mid_run_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 once the first PPO checkpoint exists, rerun the same command: same history and weights."""
    args = [*BPE, "ppo.total_episodes=48", "ppo.response_length=6"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli = [sys.executable, "-m", "rlhf", *args]
    subprocess.run([*cli, f"hydra.run.dir={straight}"], check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(
        [*cli, f"hydra.run.dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    first = killed / "ppo" / "checkpoints" / "checkpoint-000001"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (killed / "evaluate" / "eval.json").exists(), "killed before the end"
    subprocess.run([*cli, f"hydra.run.dir={killed}"], check=True, capture_output=True, timeout=600)

    def rows(d):
        return [json.loads(line) for line in (d / "ppo" / "history.jsonl").read_text().splitlines()]

    drop = ("eps", "time/rollout", "time/score", "time/update", "tokens_per_second")
    a = [{k: v for k, v in r.items() if k not in drop} for r in rows(straight)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in rows(killed)]
    assert [r["update"] for r in b] == [1, 2, 3] and a == b
    weights_a = load_file(straight / "ppo" / "model.safetensors")
    weights_b = load_file(killed / "ppo" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
