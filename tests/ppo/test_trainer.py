"""The PPO loop on a tiny model: learning, faults, resume equivalence, critic-free advantages, LoRA reference."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import BrokenEnv, DialogueEnv, NanEnv, ToyEnv, tiny_llama
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from rlhf.config import PPOConfig
from rlhf.ppo.checkpoint import CheckpointError, latest_checkpoint, read_resume_run_id
from rlhf.ppo.rollout import EnvFailure
from rlhf.ppo.trainer import PPOTrainer, train_episode_seed

BASE = PPOConfig(
    reward_source="env",
    total_episodes=64,
    batch_size=16,
    num_mini_batches=2,
    num_ppo_epochs=2,
    response_length=5,
    learning_rate=3e-3,
    kl_coef=0.05,
    save_every=0,
    samples_every=0,
)
TIMING = ("eps", "time/rollout", "time/score", "time/update", "tokens_per_second")


def critic_from(policy, seed=1):
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    torch.manual_seed(seed)
    critic = LlamaForSequenceClassification(config)
    critic.model.load_state_dict(policy.model.state_dict())
    return critic.eval()


def make_trainer(
    tokenizer, tmp_path, cfg=BASE, env=ToyEnv, seed=0, model_seed=0, critic=True, reward_model=None
):
    reference = tiny_llama(tokenizer, seed=0)  # the frozen SFT model: the same in every run
    policy = tiny_llama(tokenizer, seed=model_seed)
    return PPOTrainer(
        cfg,
        policy,
        tokenizer,
        env,
        output_dir=tmp_path,
        ref_policy=reference,
        critic=critic_from(policy) if critic else None,
        reward_model=reward_model,
        seed=seed,
        run_id="run-abc",
    )


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


def test_updates_change_parameters_and_report_trl_metrics(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    before_policy, before_critic = params(trainer.unwrapped_policy), params(trainer.unwrapped_critic)
    metrics = trainer.train()
    assert trainer.update == 4 and trainer.episodes == 64
    after_policy, after_critic = params(trainer.unwrapped_policy), params(trainer.unwrapped_critic)
    assert any(not torch.equal(before_policy[k], after_policy[k]) for k in before_policy)
    assert any(not torch.equal(before_critic[k], after_critic[k]) for k in before_critic)
    for key in (
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "eps",
        "env/gold",
        *TIMING,
    ):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    rows = history(tmp_path)
    assert [r["update"] for r in rows] == [1, 2, 3, 4]
    # reward = score - kl_coef * kl, summed per episode
    assert metrics["objective/rlhf_reward"] == pytest.approx(
        metrics["objective/scores"] - BASE.kl_coef * metrics["objective/kl"], abs=1e-5
    )
    assert latest_checkpoint(tmp_path).name == "checkpoint-000004"  # always one at the end


def test_policy_learns_the_toy_task(tokenizer, tmp_path):
    cfg = replace(BASE, total_episodes=16 * 12, num_ppo_epochs=4)
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    trainer.train()
    gold = [r["env/gold"] for r in history(tmp_path)]
    assert sum(gold[-3:]) / 3 > sum(gold[:3]) / 3 + 0.2, gold


def test_nan_reward_stops_training_with_a_clear_error(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, env=NanEnv)
    before = params(trainer.unwrapped_policy)
    with pytest.raises(ValueError, match="returned reward nan.*must be finite"):
        trainer.train()
    after = params(trainer.unwrapped_policy)
    assert all(torch.equal(before[k], after[k]) for k in before), "no update may run on a NaN reward"


def test_raising_env_names_env_and_episode_and_keeps_last_checkpoint(tokenizer, tmp_path):
    cfg = replace(BASE, save_every=2)
    bad = train_episode_seed(0, 2 * cfg.batch_size + 5)  # an episode of update 3
    BrokenEnv.bad_seed = bad
    try:
        trainer = make_trainer(tokenizer, tmp_path, cfg, env=BrokenEnv)
        with pytest.raises(EnvFailure) as info:
            trainer.train()
    finally:
        BrokenEnv.bad_seed = -1
    message = str(info.value)
    assert "BrokenEnv" in message and f"seed={bad}" in message and "KeyError" in message
    assert "update 3/4" in message and "checkpoint-000002" in message
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002"
    assert read_resume_run_id(tmp_path) == "run-abc"
    # the kept checkpoint loads with plain transformers
    AutoModelForCausalLM.from_pretrained(latest_checkpoint(tmp_path) / "policy")


def test_resume_reproduces_an_uninterrupted_run(tokenizer, tmp_path):
    straight = make_trainer(tokenizer, tmp_path / "a")
    straight.train()

    cfg = replace(BASE, save_every=2)
    first = make_trainer(tokenizer, tmp_path / "b", cfg)
    first.train(max_updates=2)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-000002"
    # a fresh process: different initial policy/critic weights and RNG; all must come from the checkpoint
    torch.manual_seed(999)
    second = make_trainer(tokenizer, tmp_path / "b", cfg, model_seed=7)
    second.train()
    assert second.update == 4

    for a, b in (
        (straight.unwrapped_policy, second.unwrapped_policy),
        (straight.unwrapped_critic, second.unwrapped_critic),
    ):
        pa, pb = params(a), params(b)
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], atol=1e-6, rtol=0, msg=k)
    ha, hb = history(tmp_path / "a"), history(tmp_path / "b")
    assert [r["update"] for r in hb] == [1, 2, 3, 4]
    for ra, rb in zip(ha, hb):
        for key in ra:
            if key not in TIMING:
                assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["update"], key)


def test_resume_drops_history_after_the_checkpoint(tokenizer, tmp_path):
    cfg = replace(BASE, save_every=2)
    make_trainer(tokenizer, tmp_path, cfg).train(max_updates=3)  # update 3 logged, not checkpointed
    assert len(history(tmp_path)) == 3
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    assert trainer.resume() and trainer.update == 2
    assert [r["update"] for r in history(tmp_path)] == [1, 2]


def test_corrupt_checkpoint_is_a_one_line_error(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, replace(BASE, total_episodes=16)).train()
    ckpt = latest_checkpoint(tmp_path)
    (ckpt / "accelerate" / "optimizer.bin").write_bytes(b"garbage")
    trainer = make_trainer(tokenizer, tmp_path, replace(BASE, total_episodes=16))
    with pytest.raises(CheckpointError, match=r"corrupt or incomplete.*ppo.resume=false") as info:
        trainer.resume()
    assert "\n" not in str(info.value)


def test_interrupted_save_leaves_previous_checkpoint(tokenizer, tmp_path, monkeypatch):
    cfg = replace(BASE, save_every=1, total_episodes=32)
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    trainer.train(max_updates=1)
    good = latest_checkpoint(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(trainer.unwrapped_policy, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert latest_checkpoint(tmp_path) == good and (good / "meta.json").exists()
    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    resumed = make_trainer(tokenizer, tmp_path, cfg)
    assert resumed.resume() and resumed.update == 1


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_advantages_train_without_a_critic(tokenizer, tmp_path, method):
    cfg = replace(BASE, advantage=method, num_generations=4, total_episodes=32)
    trainer = make_trainer(tokenizer, tmp_path, cfg, critic=False)
    assert trainer.value_model is None
    before = params(trainer.unwrapped_policy)
    metrics = trainer.train()
    after = params(trainer.unwrapped_policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "loss/value_avg" not in metrics
    ro = trainer._rollout()
    assert all(len(set(ro.queries[i : i + 4])) == 1 for i in range(0, len(ro), 4)), (
        "a group shares its prompt"
    )


def test_gae_without_critic_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs a critic"):
        make_trainer(tokenizer, tmp_path, critic=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reward_source": "gold"}, "reward_source"),
        ({"reward_source": "model"}, "needs a reward model"),
        ({"batch_size": 12, "num_mini_batches": 5}, "divisible by ppo.num_mini_batches"),
        ({"total_episodes": 8}, "total_episodes"),
        ({"stop_token": "nope"}, "stop_token"),
    ],
)
def test_bad_config_is_refused_with_what_to_change(tokenizer, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tokenizer, tmp_path, replace(BASE, **change))


def test_lora_reference_is_the_adapter_disabled_policy(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tokenizer)
    frozen_copy = copy.deepcopy(base)
    policy = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    cfg = replace(BASE, advantage="rloo", num_generations=4, total_episodes=32)
    trainer = PPOTrainer(cfg, policy, tokenizer, ToyEnv, output_dir=tmp_path, seed=0)
    ro = trainer._rollout()
    ref = trainer._ref_logprobs(ro)
    from rlhf.ppo.rollout import sequence_logprobs

    expected = sequence_logprobs(frozen_copy, ro.query_responses, ro.attention_mask, ro.context_length)
    torch.testing.assert_close(ref, expected.masked_fill(~ro.action_mask, 0.0), atol=1e-5, rtol=0)
    assert not torch.allclose(ref, ro.logprobs, atol=1e-3), "adapters (non-zero init) must change the policy"
    base_before = {k: v for k, v in params(trainer.unwrapped_policy).items() if "lora_" not in k}
    trainer.train()
    base_after = {k: v for k, v in params(trainer.unwrapped_policy).items() if "lora_" not in k}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), (
        "the base model must stay frozen"
    )


def test_reward_model_scores_the_last_token_of_each_episode(tokenizer, tmp_path):
    policy = tiny_llama(tokenizer)
    reward_model = critic_from(policy, seed=3)
    cfg = replace(BASE, reward_source="model", total_episodes=16)
    trainer = make_trainer(tokenizer, tmp_path, cfg, env=DialogueEnv, reward_model=reward_model)
    ro = trainer._rollout()
    scores = trainer.reward_model_scores(ro.query_responses, ro.attention_mask)
    for i in range(len(ro)):
        ids = ro.query_responses[i][ro.attention_mask[i].bool()][None]
        with torch.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0]  # HF's own pooling, no padding at all
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    token_scores, total, _ = trainer._score(ro)
    last = ro.action_mask.cumsum(1).argmax(1)
    assert torch.allclose(token_scores[torch.arange(len(ro)), last], scores)
    assert torch.allclose(total, scores)


def test_missing_eos_penalty_hits_truncated_turns(tokenizer, tmp_path):
    cfg = replace(BASE, missing_eos_penalty=1.0, total_episodes=16)
    trainer = make_trainer(tokenizer, tmp_path, cfg, env=DialogueEnv)
    trainer.policy_for_test = None
    ro = trainer._rollout()
    token_scores, total, _ = trainer._score(ro)
    missing = (ro.turn_ends & ~ro.turn_eos).sum(1).float()
    torch.testing.assert_close(total, ro.env_rewards - missing)


@pytest.mark.slow
def test_two_processes_with_torchrun_share_one_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, json, torch
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            torch.set_num_threads(1)
            from accelerate import Accelerator
            from conftest import ToyEnv, tiny_llama, WORDS
            from dataclasses import replace
            from rlhf.tokenizer import build_tokenizer
            from test_trainer import BASE, critic_from
            import copy
            from rlhf.ppo.trainer import PPOTrainer
            acc = Accelerator(cpu=True)
            tok = build_tokenizer(WORDS)
            policy = tiny_llama(tok)
            cfg = replace(BASE, total_episodes=32)
            t = PPOTrainer(cfg, policy, tok, ToyEnv, output_dir={str(tmp_path / "out")!r},
                           ref_policy=copy.deepcopy(policy), critic=critic_from(policy), accelerator=acc, seed=0)
            ro = t._rollout()
            t.train()
            total = sum(p.double().sum().item() for p in t.unwrapped_policy.parameters())
            out = dict(rank=acc.process_index, n=acc.num_processes, local=len(t.envs), seeds=ro.seeds, total=total)
            print("RESULT " + json.dumps(out), flush=True)
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [
        json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line
    ]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(
        r["n"] == 2 and r["local"] == 8 for r in results
    )
    r0, r1 = sorted(results, key=lambda r: r["rank"])
    assert r0["seeds"] + r1["seeds"] == [train_episode_seed(0, i) for i in range(16)], (
        "one global batch, split"
    )
    assert r0["total"] == pytest.approx(r1["total"], abs=1e-6), "DDP keeps the replicas identical"
    assert [r["update"] for r in history(tmp_path / "out")] == [1, 2]
