"""A catalogue of bad inputs run into a finished run directory: each is refused before any training, with one line
that names what to change, and leaves every file already written exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import compose
from rlhf.run.lock import LOCK_FILE, hold_run_dir
from rlhf.run.pipeline import InputError, run
from rlhf.stages import Stage
from tests.helpers import TINY

FINISHED = [*TINY, "logger=none", "stages=[sft,reward]"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run directory holding a finished tiny sft + reward run, and the data files the catalogue points at."""
    root = tmp_path_factory.mktemp("bad_input")
    run(compose(FINISHED), run_dir=root / "run")
    data = root / "data"
    data.mkdir()
    rows = {
        "empty.jsonl": "",
        "blank.jsonl": "\n  \n",
        "malformed.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e",\n',
        "not_objects.jsonl": '["a", "b"]\n',
        "wrong_columns.jsonl": '{"question": "a", "answer": "b"}\n',
        "same_pair.jsonl": '{"prompt": "p", "chosen": "good", "rejected": "bad"}\n'
        '{"prompt": "p", "chosen": "same", "rejected": "same"}\n',
        "no_rejected.jsonl": '{"prompt": "p", "chosen": "good"}\n',
        "header_only.csv": "prompt,completion\n",
        "notes.txt": "hello\n",
        "broken.json": '[{"prompt": "a", "completion": "b"},',
    }
    for name, text in rows.items():
        (data / name).write_text(text)
    return root


def snapshot(run_dir: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime, sha256) of every file under the run directory but its lock file."""
    return {
        p.relative_to(run_dir).as_posix(): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def data(name: str) -> str:
    return f"{{data}}/{name}"


CATALOGUE: list[tuple[list[str], str]] = [
    # enum-like values: one line naming the key and the allowed values
    (["stages=[sft,rl]"], "stages: unknown rl"),
    (["stages=[]"], "stages is empty"),
    (["device=tpu"], "device='tpu' is not one of auto, cpu, cuda"),
    (["model.kind=big"], "model.kind='big' is not one of tiny, hf"),
    (["model.dtype=fp8"], "model.dtype='fp8' is not one of"),
    (["model.tokenizer=char"], "model.tokenizer='char' is not one of word, bpe"),
    (["logger.backend=mlflow"], "logger.backend='mlflow' is not one of wandb, none"),
    (["logger.mode=sometimes"], "logger.mode='sometimes' is not one of"),
    (["ppo.advantage=bogus"], "ppo.advantage='bogus' is not one of gae, grpo, rloo"),
    (["ppo.kl_estimator=k9"], "ppo.kl_estimator='k9' is not one of k1, k2, k3"),
    (["ppo.kl_in=advantage"], "ppo.kl_in='advantage' is not one of reward, loss"),
    (["ppo.reward_source=gold"], "ppo.reward_source='gold' is not one of env, model, both"),
    (["ppo.critic_init=random"], "ppo.critic_init='random' is not one of reward, sft"),
    # ranges and cross-field rules of PPO: refused before SFT and the reward model train
    (["ppo.num_mini_batches=5"], "must be divisible by ppo.num_mini_batches=5"),
    (["ppo.response_length=0"], "ppo.response_length=0 must be >= 1"),
    (
        ["stages=[sft,reward,ppo]", "ppo.response_length=256"],
        "leaves no room for a prompt in the policy's 256-token context",
    ),
    (["ppo.temperature=0"], "ppo.temperature=0.0 must be > 0"),
    (["ppo.batch_size=0"], "ppo.batch_size=0 must be >= 1"),
    (["ppo.total_episodes=8"], "ppo.total_episodes=8 must be >= ppo.batch_size=64"),
    (["ppo.learning_rate=0"], "ppo.learning_rate=0.0 must be > 0"),
    (["ppo.critic_learning_rate=-1e-4"], "ppo.critic_learning_rate=-0.0001 must be > 0"),
    (["ppo.kl_estimator=k3"], "use ppo.kl_estimator=k1 or set ppo.kl_in=loss"),
    (["ppo.kl_in=loss"], "use ppo.kl_estimator=k3"),
    (["ppo.kl_coef=-0.1"], "ppo.kl_coef=-0.1 must be >= 0"),
    (["ppo.weight_decay=-0.1"], "ppo.weight_decay=-0.1 must be >= 0"),
    (["ppo.advantage=grpo", "ppo.num_generations=1"], "needs ppo.num_generations >= 2"),
    (["ppo.advantage=rloo", "ppo.num_generations=3"], "dividing the per-process batch 64"),
    (["ppo.num_ppo_epochs=0"], "ppo.num_ppo_epochs=0 must be >= 1"),
    (["ppo.forward_batch_size=0"], "ppo.forward_batch_size=0 must be >= 1"),
    (["ppo.cliprange=0"], "ppo.cliprange=0.0 must be > 0"),
    (["ppo.gamma=1.5"], "ppo.gamma=1.5 must be in [0, 1]"),
    (["ppo.target_kl=0"], "ppo.target_kl=0.0 must be > 0"),
    (
        ["stages=[ppo]", "ppo.stop_token=nope"],
        "ppo.stop_token='nope' is not a token of the policy's tokenizer",
    ),
    # the other sections
    (["evaluate.num_prompts=0"], "evaluate.num_prompts=0 must be >= 1"),
    (["evaluate.batch_size=0"], "evaluate.batch_size=0 must be >= 1"),
    (["evaluate.temperature=-1"], "evaluate.temperature=-1.0 must be >= 0"),
    (["sft.learning_rate=0"], "sft.learning_rate=0.0 must be > 0"),
    (["reward.learning_rate=-1"], "reward.learning_rate=-1.0 must be > 0"),
    (["sft.num_train_epochs=0"], "sft.num_train_epochs=0.0 must be > 0"),
    (["reward.per_device_train_batch_size=0"], "reward.per_device_train_batch_size=0 must be >= 1"),
    (["sft.max_length=0"], "sft.max_length=0 must be >= 1"),
    (["task.eval_fraction=1.0"], "task.eval_fraction=1.0 must be in [0, 1)"),
    (["task.num_demonstrations=0"], "task.num_demonstrations=0 must be >= 1"),
    (["task.num_preferences=1", "task.eval_fraction=0.6"], "holds out all 1 of task.num_preferences"),
    (["task.env_id=rlhf/Nope-v0"], "task.env_id=rlhf/Nope-v0"),
    (["model.hidden_size=31"], "model.hidden_size=31 must be divisible by model.num_heads=2"),
    (["model.hidden_size=30"], "model.hidden_size / model.num_heads = 15 must be even"),
    (["model.num_layers=0"], "model.num_layers=0 must be >= 1"),
    (["model.lora.r=-1"], "model.lora.r=-1 must be >= 0"),
    (["model.lora.dropout=1.5"], "model.lora.dropout=1.5 must be in [0, 1)"),
    (["num_threads=-1"], "num_threads=-1 must be >= 0"),
    (["model=hf"], "model=hf needs model.name_or_path"),
    # paths, model directories of the wrong kind, data files
    (["model=hf", "model.name_or_path={data}"], "holds no model (no config.json)"),
    (
        ["stages=[ppo]", "ppo.policy_path=/no/such/model"],
        "/no/such/model does not exist; set ppo.policy_path",
    ),
    (
        ["stages=[ppo]", "ppo.policy_path={run}/reward"],
        "is a reward model (LlamaForSequenceClassification), not a",
    ),
    (
        ["stages=[ppo]", "ppo.reward_model_path={run}/sft"],
        "is a language model (LlamaForCausalLM), not a reward",
    ),
    (["reward.init_from=/no/such/dir"], "/no/such/dir does not exist; set reward.init_from"),
    ([f"sft.dataset={data('missing.jsonl')}"], "missing.jsonl: no such file"),
    ([f"sft.dataset={data('empty.jsonl')}"], "empty.jsonl is empty"),
    ([f"sft.dataset={data('blank.jsonl')}"], "blank.jsonl is empty"),
    ([f"sft.dataset={data('malformed.jsonl')}"], "malformed.jsonl line 3: not valid JSON"),
    ([f"sft.dataset={data('not_objects.jsonl')}"], "not_objects.jsonl line 1: expected a JSON object"),
    ([f"sft.dataset={data('broken.json')}"], "broken.json line 1: not valid JSON"),
    ([f"sft.dataset={data('wrong_columns.jsonl')}"], "match no SFT format"),
    ([f"sft.dataset={data('header_only.csv')}"], "header_only.csv cannot be read (ValueError: Instruction"),
    ([f"sft.dataset={data('notes.txt')}"], "unsupported file type"),
    (
        [f"reward.dataset={data('same_pair.jsonl')}"],
        "1 preference pair(s) have chosen == rejected (first: row 2)",
    ),
    ([f"reward.dataset={data('no_rejected.jsonl')}"], "missing rejected"),
    (["logger=wandb", "logger.mode=online"], "logger.mode=online needs a W&B API key"),
    # the run directory's finished stages: a stage that reads one made with another config
    (["stages=[reward]", "seed=1"], "reward reads the sft stage's output"),
    (["stages=[ppo]", "reward.learning_rate=0.01"], "(reward.learning_rate 0.0005 -> 0.01)"),
    (["stages=[evaluate]", "model.hidden_size=48"], "evaluate reads the sft stage's output"),
    (["stages=[ppo,evaluate]", "task.num_demonstrations=16"], "(task.num_demonstrations 48 -> 16)"),
]


def test_the_catalogue_has_forty_entries():
    assert len(CATALOGUE) >= 40


@pytest.mark.parametrize(("overrides", "needle"), CATALOGUE, ids=[" ".join(o) for o, _ in CATALOGUE])
def test_bad_input_is_refused_before_training_in_one_line_changing_nothing(
    finished, monkeypatch, overrides, needle
):
    run_dir = finished / "run"
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(finished / "no-netrc"))

    def no_training(self, cfg, ctx):
        raise AssertionError(f"stage {self.name} started")

    monkeypatch.setattr(Stage, "run", no_training)
    overrides = [o.format(data=finished / "data", run=run_dir) for o in overrides]
    before = snapshot(run_dir)
    with pytest.raises(InputError) as info:
        run(compose([*FINISHED, *overrides]), run_dir=run_dir)
    message = str(info.value)
    assert needle in message and "\n" not in message
    assert snapshot(run_dir) == before


def test_an_unwritable_run_directory_is_one_line(finished):
    not_a_dir = finished / "data" / "notes.txt"
    with pytest.raises(
        InputError, match=r"cannot write to run directory .*notes.txt/run \(Not a directory\)"
    ) as info:
        run(compose(FINISHED), run_dir=not_a_dir / "run")
    assert "\n" not in str(info.value)


def test_a_held_run_directory_is_refused_in_process(finished):
    run_dir = finished / "run"
    before = snapshot(run_dir)
    with hold_run_dir(run_dir), pytest.raises(InputError, match=f"in use by pid {os.getpid()} on"):
        run(compose(FINISHED), run_dir=run_dir)
    assert snapshot(run_dir) == before


HOLDER = """
import sys, time
from pathlib import Path
from rlhf.run.lock import hold_run_dir
with hold_run_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_process_in_a_used_run_directory_fails_at_once_naming_the_holder(tmp_path):
    """Two real processes: one holds the run directory, the real `rlhf` command in the same directory is refused
    with one line naming the holder; once the holder is killed (-9), the directory is free again."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        rlhf = str(Path(sys.executable).with_name("rlhf"))
        proc = subprocess.run(
            [rlhf, *FINISHED, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 1
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"rlhf: error: run directory {run_dir} is in use by pid {holder.pid} on ")
        assert socket.gethostname() in lines[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, "rlhf.log"]  # nothing of a run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_run_dir(run_dir):  # the kernel released the killed holder's lock
        pass


def test_hydra_errors_are_one_line_too(finished):
    """Through the real command: a wrong type and an unknown key, into the finished directory, which stays as it
    was (Hydra's own record, .hydra/, is written only after validation)."""
    run_dir = finished / "run"
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    before = snapshot(run_dir)
    for override, needle in (
        ("ppo.batch_size=abc", "rlhf: error: Error merging override ppo.batch_size=abc: Value 'abc'"),
        ("sft.learnin_rate=1", "Key 'learnin_rate' not in 'SFTConfig' (full_key: sft.learnin_rate)"),
        ("ppo.advantage=bogus", "rlhf: error: ppo.advantage='bogus' is not one of gae, grpo, rloo"),
    ):
        proc = subprocess.run(
            [rlhf, *FINISHED, override, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], proc.stderr
    after = snapshot(run_dir)
    assert {k: after[k] for k in before} == before and set(after) - set(before) <= {"rlhf.log"}  # Hydra's log
    assert json.loads((run_dir / "summary.json").read_text())["stages"].keys() == {"sft", "reward"}
