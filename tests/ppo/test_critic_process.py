"""ppo.critic_process: the critic's passes in a worker process take exactly the steps the in-process critic takes,
checkpoint and resume as it does, and the worker never outlives its trainer's process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_trainer import BASE, TIMING, history, make_trainer, params

from rlhf.cli import compose
from rlhf.ppo.config import check_ppo
from rlhf.ppo.trainer import PPOTrainer
from rlhf.run.validation import validate


@pytest.fixture
def one_thread_each():
    """Every run at one thread in this process, and the critic process (half of it, at least one) at one too: each
    pass runs on one thread in both modes, the same kernels on the same inputs, so the same bits on any CPU.

    Not 2 threads for the split run (1 here while the worker runs, 1 there): its rollout, where the worker idles,
    keeps both, and the sampler's float32 attention (CPU flash attention over MKL sgemm) differs in the last bit at 2
    threads from 1 on AMD EPYC CPUs, AVX2 and AVX-512 alike (tests/numerics.py): one ulp in a log-probability, and
    4 updates later the policy's weights differ by ~1e-7. Serial at 2 threads equals split at 2 threads bit for bit
    here, and the critic process's own passes never differed: the thread count did, not the process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(tokenizer, path, cfg, critic_process: bool, max_updates=None, model_seed=0):
    assert torch.get_num_threads() == 1, "use the one_thread_each fixture"
    trainer = make_trainer(
        tokenizer, path, replace(cfg, critic_process=critic_process), model_seed=model_seed
    )
    try:
        trainer.critic.wait_ready()  # both modes: a no-op in process, the worker answering with one
        trainer.train(max_updates=max_updates)
    finally:
        trainer.close()
    return trainer


def assert_same_run(a, b, path_a, path_b):
    for model_a, model_b in (
        (a.unwrapped_policy, b.unwrapped_policy),
        (a.critic.model, b.critic.model),
    ):
        pa, pb = params(model_a), params(model_b)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    ha, hb = history(path_a), history(path_b)
    assert [r["update"] for r in ha] == [r["update"] for r in hb]
    for ra, rb in zip(ha, hb):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {
            k: v for k, v in rb.items() if k not in TIMING
        }


@pytest.mark.numerics
@pytest.mark.parametrize(
    "change",
    [
        {"micro_batch_size": 3},  # uneven micro-batches: the accumulation weights matter
        {"target_kl": 1e-9, "num_ppo_epochs": 3},  # every update stops after its first epoch
    ],
)
def test_the_critic_process_takes_the_in_process_critics_steps_bit_for_bit(
    tokenizer, tmp_path, one_thread_each, change
):
    cfg = replace(BASE, **change)
    serial = run(tokenizer, tmp_path / "serial", cfg, critic_process=False)
    split = run(tokenizer, tmp_path / "split", cfg, critic_process=True)
    assert split.critic.worker is None  # closed
    assert_same_run(serial, split, tmp_path / "serial", tmp_path / "split")
    rows = history(tmp_path / "split")
    assert all(r["loss/value_avg"] > 0 and "val/clipfrac_avg" in r for r in rows)
    assert all(r["policy/early_stop"] == ("target_kl" in change) for r in rows)
    # the worker's steps reached the shared weights
    start = params(make_trainer(tokenizer, tmp_path / "fresh").critic.model)
    assert any(not torch.equal(v, start[k]) for k, v in params(split.critic.model).items())


@pytest.mark.numerics
@pytest.mark.parametrize(("first", "then"), [(True, True), (False, True), (True, False)])
def test_a_checkpoint_resumes_into_the_uninterrupted_run_with_or_without_the_critic_process(
    tokenizer, tmp_path, one_thread_each, first, then
):
    straight = run(tokenizer, tmp_path / "a", BASE, critic_process=False)
    cfg = replace(BASE, save_every=2)
    run(tokenizer, tmp_path / "b", cfg, critic_process=first, max_updates=2)
    torch.manual_seed(999)  # a fresh process: other weights and RNG, all must come from the checkpoint
    resumed = run(tokenizer, tmp_path / "b", cfg, critic_process=then, model_seed=7)
    assert resumed.update == 4
    assert_same_run(straight, resumed, tmp_path / "a", tmp_path / "b")


def test_distributed_and_gpu_runs_refuse_the_critic_process(monkeypatch):
    with pytest.raises(ValueError, match="ppo.critic_process=false"):
        check_ppo(replace(BASE, critic_process=True), num_processes=2)
    cfg = compose(["ppo.critic_process=true", "device=cuda"])
    # as on a GPU machine
    monkeypatch.setattr("rlhf.models.loading.resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(ValueError, match="on device=cuda set ppo.critic_process=false"):
        validate(cfg)
    cfg.ppo.critic_process = False
    validate(cfg)


def test_an_unguarded_script_starts_the_worker_once_and_the_worker_exits_when_the_script_is_killed(tmp_path):
    """A user's script without `if __name__ == "__main__":` (spawn would re-run it in the child), killed with -9."""
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
        import sys, time, torch
        from transformers import LlamaConfig, LlamaForSequenceClassification
        from rlhf.ppo.critic_process import CriticProcess
        from rlhf.ppo.value_head import ValueHead

        config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_labels=1)
        critic = ValueHead(LlamaForSequenceClassification(config))
        worker = CriticProcess(critic, torch.optim.AdamW(critic.parameters()), threads=1, cliprange_value=0.2,
                               max_grad_norm=1.0, forward_batch_size=4, autocast_dtype=None)
        ids = torch.ones(2, 5, dtype=torch.long)
        worker.start_values(ids, torch.ones_like(ids), torch.ones(2, 3, dtype=torch.bool), 2)
        assert worker.result().shape == (2, 3)
        print(worker._process.pid, flush=True)
        time.sleep(600)
        """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), "the critic process outlived its trainer"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.numerics
def test_under_bf16_mixed_precision_the_worker_autocasts_as_the_trainer_does(
    tokenizer, tmp_path, one_thread_each, fresh_accelerator_state
):
    from accelerate import Accelerator
    from test_trainer import critic_from

    from tests.helpers import ToyEnv, tiny_llama

    trainers = {}
    for name, critic_process in (("serial", False), ("split", True)):
        policy = tiny_llama(tokenizer).to(torch.bfloat16)
        trainer = PPOTrainer(
            replace(BASE, total_episodes=32, critic_process=critic_process),
            policy,
            tokenizer,
            ToyEnv,
            output_dir=tmp_path / name,
            ref_policy=tiny_llama(tokenizer).to(torch.bfloat16),
            critic=critic_from(tiny_llama(tokenizer)).to(torch.bfloat16),
            accelerator=Accelerator(cpu=True, mixed_precision="bf16"),
        )
        try:
            trainer.train()
        finally:
            trainer.close()
        trainers[name] = trainer
    assert_same_run(trainers["serial"], trainers["split"], tmp_path / "serial", tmp_path / "split")


def tiny_worker(tokenizer):
    from test_trainer import critic_from

    from rlhf.ppo.critic_process import CriticProcess
    from rlhf.ppo.value_head import ValueHead
    from tests.helpers import tiny_llama

    critic = ValueHead(critic_from(tiny_llama(tokenizer)))
    return CriticProcess(
        critic,
        torch.optim.AdamW(critic.parameters()),
        threads=1,
        cliprange_value=0.2,
        max_grad_norm=1.0,
        forward_batch_size=4,
        autocast_dtype=None,
    )


def test_a_failing_worker_raises_its_error_and_still_closes_quietly(tokenizer):
    worker = tiny_worker(tokenizer)
    worker.wait_ready()  # up and answering
    assert worker._process.is_alive()
    worker.start_steps([[([0, 1], 1.0)]], 0.1)  # before any rollout: the worker has nothing to train on
    with pytest.raises(RuntimeError, match="the critic process failed:(.|\n)*KeyError: 'query_responses'"):
        worker.finish_steps()
    # a failure in flight, as when an error propagates: close stays quiet
    worker.start_steps([[([0], 1.0)]], 0.1)
    worker.close()
    assert worker._process.exitcode == 0


def test_a_dead_worker_is_a_one_line_error(tokenizer):
    worker = tiny_worker(tokenizer)
    try:
        worker._process.kill()
        worker._process.join()
        with pytest.raises(
            RuntimeError, match=r"the critic process died \(exit code -9\); set ppo.critic_process=false"
        ):
            worker.start_steps([[([0], 1.0)]], 0.1)
            worker.finish_steps()
    finally:
        worker.close()


def test_messages_carry_tensors_by_value_and_shared_parts_as_they_are():
    """Tensors cross the pipe as numpy arrays (the same bytes; a shared-memory hand-off costs ~0.25 ms each), bf16
    ones (numpy has none) and `Shared` parts (the optimizer state: one storage for both processes) as tensors."""
    from rlhf.ppo.critic_process import Shared, _from_wire, _to_wire

    stats = {"loss/value_avg": torch.tensor(0.1234567), "mask": torch.tensor([[True, False]])}
    state = [{"exp_avg": torch.zeros(3)}]
    wire = _to_wire(({"minibatches": [stats]}, torch.ones(2, dtype=torch.bfloat16), Shared(state)))
    assert isinstance(wire[0]["minibatches"][0]["loss/value_avg"], np.ndarray)
    back = _from_wire(wire)
    assert torch.equal(back[0]["minibatches"][0]["loss/value_avg"], stats["loss/value_avg"])
    assert torch.equal(back[0]["minibatches"][0]["mask"], stats["mask"])
    assert back[1].dtype == torch.bfloat16
    assert back[2] is state and back[2][0]["exp_avg"] is state[0]["exp_avg"]


def test_a_lora_critic_trains_in_its_own_process_and_the_threads_come_back(tokenizer, tmp_path):
    """LoRA adapters on the policy and the critic, the critic in its worker: only the critic's adapters and head move
    (they live in shared memory), and this process's thread count is restored after every update."""
    from peft import LoraConfig, get_peft_model
    from test_trainer import critic_from
    from transformers import AutoModelForSequenceClassification

    from rlhf.models.config import LoraConfig as LoraSettings
    from rlhf.models.lora import apply_lora
    from tests.helpers import ToyEnv, tiny_llama

    base = tiny_llama(tokenizer)
    critic = critic_from(base)
    critic.save_pretrained(tmp_path / "critic_start")
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cfg = replace(BASE, critic_process=True, total_episodes=32)
    trainer = PPOTrainer(
        cfg,
        policy,
        tokenizer,
        ToyEnv,
        output_dir=tmp_path / "out",
        critic=apply_lora(critic, LoraSettings(r=4), "SEQ_CLS"),
        seed=0,
    )
    threads = torch.get_num_threads()
    try:
        trainer.train()
    finally:
        trainer.close()
    assert torch.get_num_threads() == threads and trainer.update == 2
    trainer.export(tmp_path / "final")
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final" / "critic").state_dict()
    start = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic_start").state_dict()
    moved = {k for k in trained if not torch.equal(trained[k], start[k])}
    assert moved and all("q_proj" in k or "v_proj" in k or k == "score.weight" for k in moved), moved
