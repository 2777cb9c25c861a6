"""The PPO loop on a tiny model: learning, faults, resume equivalence, critic-free advantages, LoRA reference."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

from rlhf.ppo.advantages import group_advantages
from rlhf.ppo.callbacks import Callback
from rlhf.ppo.checkpoint import CheckpointError, latest_checkpoint, read_resume_run_id
from rlhf.ppo.config import PPOConfig
from rlhf.ppo.rollout import EnvFailure
from rlhf.ppo.seeds import train_episode_seed
from rlhf.ppo.trainer import PPOTrainer
from tests.helpers import BrokenEnv, DialogueEnv, NanEnv, ToyEnv, free_port, ppo_config, tiny_llama

BASE = ppo_config(
    total_episodes=64,
    batch_size=16,
    num_mini_batches=2,
    num_ppo_epochs=2,
    response_length=5,
    learning_rate=3e-3,
    kl_coef=0.05,
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
    tokenizer,
    tmp_path,
    cfg=BASE,
    env=ToyEnv,
    seed=0,
    model_seed=0,
    critic=True,
    reward_model=None,
    stage_key=None,
    callback=None,
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
        stage_key=stage_key,
        callback=callback,
    )


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def history(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "history.jsonl").read_text().splitlines()]


def test_updates_change_parameters_and_report_trl_metrics(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    before_policy, before_critic = params(trainer.unwrapped_policy), params(trainer.critic.model)
    metrics = trainer.train()
    assert trainer.update == 4 and trainer.episodes == 64
    after_policy, after_critic = params(trainer.unwrapped_policy), params(trainer.critic.model)
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
        (straight.critic.model, second.critic.model),
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


def test_a_truncated_rng_state_refuses_the_checkpoint_naming_the_file(tokenizer, tmp_path):
    cfg = replace(BASE, total_episodes=16)
    make_trainer(tokenizer, tmp_path, cfg).train()
    ckpt = latest_checkpoint(tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"meta.json", "accelerate/random_states_0.pkl", "policy/model.safetensors"} <= set(manifest)
    rng = ckpt / "accelerate" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"random_states_0.pkl has \d+ bytes, the manifest \d+") as info:
        make_trainer(tokenizer, tmp_path, cfg).resume()
    assert str(ckpt) in str(info.value) and "\n" not in str(info.value)
    rng.unlink()
    with pytest.raises(CheckpointError, match="random_states_0.pkl is missing"):
        make_trainer(tokenizer, tmp_path, cfg).resume()
    (
        ckpt / "manifest.json"
    ).unlink()  # a checkpoint killed mid-write (or by an older version): not vouched for
    with pytest.raises(CheckpointError, match="no readable manifest.json"):
        make_trainer(tokenizer, tmp_path, cfg).resume()


def test_a_checkpoint_of_another_stage_key_is_not_resumed(tokenizer, tmp_path, caplog):
    cfg = replace(BASE, save_every=1)
    make_trainer(tokenizer, tmp_path, cfg, stage_key="key-a").train(max_updates=2)
    assert json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["stage_key"] == "key-a"
    assert make_trainer(tokenizer, tmp_path, cfg, stage_key="key-a").resume()
    other = make_trainer(tokenizer, tmp_path, cfg, stage_key="key-b")
    with caplog.at_level(logging.INFO, logger="rlhf.ppo.checkpoint"):
        assert not other.resume()
    assert "written for another config or upstream (key key-a, now key-b): starting over" in caplog.text
    other.train(max_updates=1)  # a fresh start leaves nothing of the other key's run behind
    assert [r["update"] for r in history(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path).name == "checkpoint-000001"
    assert json.loads((latest_checkpoint(tmp_path) / "meta.json").read_text())["stage_key"] == "key-b"


class Recorder(Callback):
    """Keeps what the trainer reports: the resumed history, the updates and the start and end of `train`."""

    def __init__(self):
        self.calls: list[tuple] = []

    def on_resume(self, history):
        self.calls.append(("resume", history))

    def on_train_start(self, update, num_updates):
        self.calls.append(("start", update, num_updates))

    def on_update(self, update, metrics, rollout):
        self.calls.append(("update", update, metrics, len(rollout)))

    def on_train_end(self):
        self.calls.append(("end",))


def test_resume_hands_the_history_up_to_the_checkpoint_to_the_callback(tokenizer, tmp_path):
    """A killed process may not have flushed its W&B rows: the resumed trainer hands back the rows of updates 1..k
    (the PPO stage replays those it tracks into W&B: tests/stages/test_ppo.py), then reports each update it runs."""
    cfg = replace(BASE, save_every=2, log_every=2, total_episodes=96)
    make_trainer(tokenizer, tmp_path, cfg).train(max_updates=5)  # checkpoint at 4, update 5 not checkpointed
    rows = history(tmp_path)[:4]
    recorder = Recorder()
    resumed = make_trainer(tokenizer, tmp_path, cfg, callback=recorder)
    resumed.train()
    assert resumed.update == 6
    assert recorder.calls[0] == ("resume", rows)
    assert recorder.calls[1] == ("start", 4, 6)
    updates = [c for c in recorder.calls if c[0] == "update"]
    assert [c[1] for c in updates] == [5, 6] and all(c[3] == cfg.batch_size for c in updates)
    assert [{"update": c[1], **c[2]} for c in updates] == history(tmp_path)[4:]
    assert recorder.calls[-1] == ("end",)


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
    assert trainer.critic.model is None
    before = params(trainer.unwrapped_policy)
    metrics = trainer.train()
    after = params(trainer.unwrapped_policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "loss/value_avg" not in metrics
    ro = trainer.rollout()
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
    ro = trainer.rollout()
    ref = trainer.ref_logprobs(ro)
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
    ro = trainer.rollout()
    scores = trainer.reward_scorer.score(ro)
    eos = tokenizer.eos_token_id
    assert not ro.ended_with_eos[:, 2].all(), "some last replies should be cut at the length limit"
    for i in range(len(ro)):
        ids = ro.query_responses[i][ro.attention_mask[i].bool()].tolist()
        ids = torch.tensor([ids + ([eos] if ids[-1] != eos else [])])  # a cut last reply: closed by the eos
        with torch.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0]  # HF's own pooling, no padding at all
        assert scores[i].item() == pytest.approx(expected.item(), abs=1e-5)
    scored = trainer.score(ro)
    last = ro.action_mask.cumsum(1).argmax(1)
    assert torch.allclose(scored.token_scores[torch.arange(len(ro)), last], scores)
    assert torch.allclose(scored.scores, scores)
    assert torch.equal(scored.model_scores, scores)


def test_missing_eos_penalty_hits_truncated_turns(tokenizer, tmp_path):
    cfg = replace(BASE, missing_eos_penalty=1.0, total_episodes=16)
    trainer = make_trainer(tokenizer, tmp_path, cfg, env=DialogueEnv)
    ro = trainer.rollout()
    total = trainer.score(ro).scores
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
            from tests.helpers import ToyEnv, tiny_llama, WORDS
            from dataclasses import replace
            from rlhf.models.tokenizer import build_tokenizer
            from test_trainer import BASE, critic_from
            import copy
            from rlhf.ppo.trainer import PPOTrainer
            acc = Accelerator(cpu=True)
            tok = build_tokenizer(WORDS)
            policy = tiny_llama(tok)
            cfg = replace(BASE, total_episodes=32)
            t = PPOTrainer(cfg, policy, tok, ToyEnv, output_dir={str(tmp_path / "out")!r},
                           ref_policy=copy.deepcopy(policy), critic=critic_from(policy), accelerator=acc, seed=0)
            ro = t.rollout()
            t.train()
            total = sum(p.double().sum().item() for p in t.unwrapped_policy.parameters())
            out = dict(rank=acc.process_index, n=acc.num_processes, local=len(t.envs), seeds=ro.seeds, total=total)
            # one write of one line (< PIPE_BUF bytes, atomic): print's separate newline let the ranks' lines interleave
            sys.stdout.write("RESULT " + json.dumps(out) + "\\n")
            sys.stdout.flush()
            """
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
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


# ---------------------------------------------------------------- KL placement, optimizer, faults, metrics


class SometimesSuccessEnv(ToyEnv):
    """Reports info["success"] (reward > 0.3) only on episodes with an even seed, like a task with partial info."""

    def reset(self, *, seed=None, options=None):
        self._seed = seed
        return super().reset(seed=seed, options=options)

    def _step(self, action):
        obs, reward, terminated, info = super()._step(action)
        if self._seed % 2 == 0:
            info = {**info, "success": reward > 0.3}
        return obs, reward, terminated, info


def capture_optimize(trainer, monkeypatch) -> dict:
    """Replace step 6 by a recorder of the batch it would have optimised."""
    seen = {}

    def record(batch, kl_coef, update):
        seen["batch"] = batch
        return {}

    monkeypatch.setattr(trainer.optimiser, "optimise", record)
    return seen


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_advantages_normalise_the_score_alone_and_add_the_kl_per_token(
    tokenizer, tmp_path, monkeypatch, method
):
    cfg = replace(BASE, advantage=method, num_generations=4, total_episodes=16, kl_coef=0.5)
    trainer = make_trainer(tokenizer, tmp_path, cfg, critic=False, model_seed=1)  # policy != reference
    seen = capture_optimize(trainer, monkeypatch)
    _, ro = trainer.step()
    mask = ro.action_mask
    k1 = torch.where(mask, ro.logprobs - trainer.ref_logprobs(ro), 0.0)
    assert k1.abs().sum() > 0.1
    expected = torch.where(mask, group_advantages(ro.env_rewards, 4, method)[:, None] - 0.5 * k1, 0.0)
    torch.testing.assert_close(seen["batch"].advantages, expected)
    torch.testing.assert_close(seen["batch"].ref_logprobs, trainer.ref_logprobs(ro))


def test_kl_in_loss_leaves_group_advantages_to_the_scores_and_adds_k3_to_the_loss(
    tokenizer, tmp_path, monkeypatch
):
    cfg = replace(
        BASE,
        advantage="grpo",
        num_generations=4,
        total_episodes=16,
        kl_coef=0.5,
        kl_in="loss",
        kl_estimator="k3",
        num_ppo_epochs=1,
        num_mini_batches=1,
    )
    trainer = make_trainer(tokenizer, tmp_path, cfg, critic=False, model_seed=1)
    losses = []
    backward = trainer.acc.backward
    monkeypatch.setattr(trainer.acc, "backward", lambda loss: (losses.append(loss.item()), backward(loss)))
    metrics, ro = trainer.step()
    mask = ro.action_mask
    ref = trainer.ref_logprobs(ro)
    k3 = torch.where(mask, torch.expm1(ref - ro.logprobs) - (ref - ro.logprobs), 0.0)  # (B, R)
    # one minibatch, first of the update: the current policy is the rollout's, so the KL term is the rollout's k3
    assert metrics["loss/kl_avg"] == pytest.approx(k3[mask].mean().item(), rel=1e-4)
    assert losses[0] == pytest.approx(metrics["loss/policy_avg"] + 0.5 * metrics["loss/kl_avg"], rel=1e-5)
    assert metrics["objective/non_score_reward"] == pytest.approx(-0.5 * k3.sum(1).mean().item(), rel=1e-4)

    # the advantages are the group advantages of the scores alone
    trainer = make_trainer(tokenizer, tmp_path / "b", cfg, critic=False, model_seed=1)
    seen = capture_optimize(trainer, monkeypatch)
    _, ro = trainer.step()
    expected = torch.where(ro.action_mask, group_advantages(ro.env_rewards, 4, "grpo")[:, None], 0.0)
    torch.testing.assert_close(seen["batch"].advantages, expected)


def test_kl_in_loss_pulls_the_policy_back_when_the_scores_carry_no_signal(tokenizer, tmp_path):
    """Equal scores in every group: zero advantages, so only the KL term of the loss can move the policy."""

    class FlatEnv(ToyEnv):
        def _step(self, action):
            return "", 0.5, True, {}

    def run(kl_coef, path):
        cfg = replace(
            BASE, advantage="rloo", num_generations=4, total_episodes=32, kl_coef=kl_coef, kl_in="loss"
        )
        trainer = make_trainer(
            tokenizer, path, replace(cfg, kl_estimator="k3"), env=FlatEnv, critic=False, model_seed=1
        )
        before = params(trainer.unwrapped_policy)
        trainer.train()
        after = params(trainer.unwrapped_policy)
        return sum((before[k] != after[k]).sum().item() for k in before), history(path)

    changed, _ = run(0.0, tmp_path / "a")
    assert changed == 0
    changed, rows = run(1.0, tmp_path / "b")
    assert changed > 0
    assert rows[-1]["loss/kl_avg"] < rows[0]["loss/kl_avg"]


def test_gae_with_kl_in_loss_rewards_the_score_alone(tokenizer, tmp_path, monkeypatch):
    import rlhf.ppo.advantages as advantages_module

    seen = {}

    def recording_gae(rewards, values, mask, gamma, lam):
        seen["rewards"] = rewards.clone()
        return gae(rewards, values, mask, gamma, lam)

    gae = advantages_module.gae
    monkeypatch.setattr(advantages_module, "gae", recording_gae)
    cfg = replace(BASE, kl_in="loss", kl_estimator="k2", total_episodes=16, kl_coef=0.5)
    trainer = make_trainer(tokenizer, tmp_path, cfg, model_seed=1)
    metrics, ro = trainer.step()
    torch.testing.assert_close(seen["rewards"], ro.turn_rewards)
    assert metrics["loss/kl_avg"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kl_estimator": "k3"}, "use ppo.kl_estimator=k1 or set ppo.kl_in=loss"),
        ({"kl_estimator": "k2"}, "use ppo.kl_estimator=k1 or set ppo.kl_in=loss"),
        ({"kl_in": "loss"}, "use ppo.kl_estimator=k3"),
        ({"kl_in": "advantage"}, "ppo.kl_in='advantage' is not one of reward, loss"),
        ({"kl_estimator": "k4"}, "ppo.kl_estimator='k4' is not one of"),
        ({"weight_decay": -0.1}, "ppo.weight_decay"),
    ],
)
def test_kl_estimator_and_placement_are_checked(tokenizer, tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as info:
        make_trainer(tokenizer, tmp_path, replace(BASE, **change))
    assert "\n" not in str(info.value)


def test_weight_decay_reaches_both_optimizers(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path)
    assert PPOConfig().weight_decay == 0.0
    for opt in (trainer.policy_opt, trainer.critic.optimizer):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0]
    trainer = make_trainer(tokenizer, tmp_path / "b", replace(BASE, weight_decay=0.1))
    for opt in (trainer.policy_opt, trainer.critic.optimizer):
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1]


def test_nan_loss_stops_training_before_any_update(tokenizer, tmp_path, monkeypatch):
    import rlhf.ppo.trainer as trainer_module

    trainer = make_trainer(tokenizer, tmp_path)
    advantages_and_returns = trainer_module.advantages_and_returns

    def nan_advantages(token_scores, kl_reward, values, mask, **settings):
        adv, ret = advantages_and_returns(token_scores, kl_reward, values, mask, **settings)
        return adv.masked_fill(mask, float("nan")), ret

    monkeypatch.setattr(trainer_module, "advantages_and_returns", nan_advantages)
    before = params(trainer.unwrapped_policy)
    with pytest.raises(
        FloatingPointError, match=r"PPO loss became nan at update 1 \(process 0 of 1\)"
    ) as info:
        trainer.train()
    assert "\n" not in str(info.value)
    after = params(trainer.unwrapped_policy)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("poisoned_call", "what"), [(1, "rewards"), (2, "loss")])
def test_a_nan_on_another_process_stops_this_one_too(tokenizer, tmp_path, monkeypatch, poisoned_call, what):
    """Simulated second process: its finiteness check reports NaN while every local value here is finite."""
    trainer = make_trainer(tokenizer, tmp_path)
    gather = trainer.acc.gather
    calls = []

    def gather_with_a_nan_elsewhere(t):
        if t.numel() == 1 and t.is_floating_point():
            calls.append(t)
            if len(calls) == poisoned_call:
                return torch.cat([gather(t), torch.full_like(t, float("nan"))])
        return gather(t)

    monkeypatch.setattr(trainer.acc, "gather", gather_with_a_nan_elsewhere)
    before = params(trainer.unwrapped_policy)
    with pytest.raises(FloatingPointError, match=rf"PPO {what} became nan at update 1 \(process 1 of 2\)"):
        trainer.train()
    after = params(trainer.unwrapped_policy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_success_rate_is_the_mean_over_the_episodes_that_report_it(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, replace(BASE, total_episodes=16), env=SometimesSuccessEnv)
    metrics, ro = trainer.step()
    reported = [float(info["success"]) for info in ro.infos if "success" in info]
    assert 0 < len(reported) < len(ro)
    assert metrics["env/success_rate"] == pytest.approx(sum(reported) / len(reported))
    assert metrics["env/gold"] == pytest.approx(ro.env_rewards.mean().item())
    metrics, _ = make_trainer(tokenizer, tmp_path / "b", replace(BASE, total_episodes=16)).step()
    assert "env/success_rate" not in metrics  # no episode reports it


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(("mixed_precision", "dtype"), [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_trains_float32_weights_that_small_updates_move(
    tokenizer, tmp_path, fresh_accelerator_state, monkeypatch, mixed_precision, dtype
):
    """Models handed over in model.dtype (bf16: frozen reference too); lr 1e-5 moves almost every float32 weight.
    The rollout samples under the update's autocast: the sampler's matmul weights are copies in bf16."""
    from accelerate import Accelerator

    import rlhf.ppo.sampler as sampler_module

    make_decoder, built = sampler_module.make_decoder, []

    def recording_make_decoder(model):
        built.append(make_decoder(model))
        return built[-1]

    monkeypatch.setattr(sampler_module, "make_decoder", recording_make_decoder)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    policy = tiny_llama(tokenizer).to(dtype)
    cfg = replace(BASE, learning_rate=1e-5, total_episodes=32)
    trainer = PPOTrainer(
        cfg,
        policy,
        tokenizer,
        ToyEnv,
        output_dir=tmp_path,
        ref_policy=tiny_llama(tokenizer).to(dtype),
        critic=critic_from(tiny_llama(tokenizer)).to(dtype),
        accelerator=accelerator,
        seed=0,
    )
    before = {k: v.detach().float().clone() for k, v in trainer.unwrapped_policy.named_parameters()}
    metrics = trainer.train()
    assert torch.isfinite(torch.tensor(metrics["loss/policy_avg"]))
    after = dict(trainer.unwrapped_policy.named_parameters())
    changed = sum((after[k].detach().float() != before[k]).sum().item() for k in before)
    total = sum(v.numel() for v in before.values())
    assert changed / total > 0.9, f"only {changed}/{total} weights changed"
    assert all(p.dtype == torch.float32 for p in trainer.unwrapped_policy.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.critic.model.parameters())
    assert all(p.dtype == dtype for p in trainer.ref_policy.parameters())  # frozen: left as handed over
    state = trainer.policy_opt.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert built and all(
        d.autocast_dtype == (torch.bfloat16 if mixed_precision == "bf16" else None) for d in built
    )
    assert all(d.head[0].dtype == dtype and d.keys[0].dtype == dtype for d in built)


# ---------------------------------------------------------------- branches: score normalisation, whitening, ...


def test_normalize_scores_standardises_episode_scores(tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, replace(BASE, normalize_scores=True, total_episodes=16))
    ro = trainer.rollout()
    assert ro.env_rewards.std() > 0
    scored = trainer.score(ro)
    raw = ro.env_rewards
    expected = (raw - raw.mean()) / raw.std(unbiased=False)  # the running moments hold this batch alone
    torch.testing.assert_close(scored.scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(scored.token_scores.sum(1), scored.scores)
    assert trainer.score_moments.count == 16


def test_whiten_rewards_whitens_the_rewards_gae_sees(tokenizer, tmp_path, monkeypatch):
    import rlhf.ppo.advantages as advantages_module
    from rlhf.ppo.ops import masked_whiten

    gae = advantages_module.gae
    seen = []

    def recording_gae(rewards, values, mask, gamma, lam):
        seen.append((rewards.clone(), mask.clone()))
        return gae(rewards, values, mask, gamma, lam)

    monkeypatch.setattr(advantages_module, "gae", recording_gae)
    for whiten in (False, True):  # same seeds and models: the same rollout
        make_trainer(tokenizer, tmp_path / str(whiten), replace(BASE, whiten_rewards=whiten)).step()
    (plain, mask), (whitened, mask2) = seen
    assert torch.equal(mask, mask2)
    torch.testing.assert_close(whitened, masked_whiten(plain, mask, shift_mean=False))
    assert not torch.allclose(whitened, plain)


def test_adaptive_kl_moves_kl_coef_over_updates(tokenizer, tmp_path):
    cfg = replace(BASE, adaptive_kl=True, kl_target=0.01, kl_horizon=100)
    make_trainer(tokenizer, tmp_path, cfg, model_seed=1).train()
    rows = history(tmp_path)
    coef = BASE.kl_coef
    for row in rows:  # Ziegler et al.: coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon
        error = min(max(row["objective/kl"] / 0.01 - 1, -0.2), 0.2)
        coef *= 1 + error * cfg.batch_size / cfg.kl_horizon
        assert row["objective/kl_coef"] == pytest.approx(coef, rel=1e-6)
    assert len({row["objective/kl_coef"] for row in rows}) == len(rows)


@pytest.mark.parametrize("ent_coef", [0.0, 0.1])
def test_ent_coef_adds_an_entropy_bonus_to_the_loss(tokenizer, tmp_path, monkeypatch, ent_coef):
    cfg = replace(BASE, advantage="grpo", num_generations=4, total_episodes=16, ent_coef=ent_coef)
    trainer = make_trainer(tokenizer, tmp_path, cfg, critic=False)
    losses, outs = [], []
    backward, minibatch_step = trainer.acc.backward, trainer.optimiser.minibatch_step
    monkeypatch.setattr(trainer.acc, "backward", lambda loss: (losses.append(loss.item()), backward(loss)))
    monkeypatch.setattr(
        trainer.optimiser, "minibatch_step", lambda *a, **k: outs.append(minibatch_step(*a, **k)) or outs[-1]
    )
    trainer.step()
    assert len(losses) == len(outs) == cfg.num_ppo_epochs * cfg.num_mini_batches
    for loss, out in zip(losses, outs):
        assert out["policy/entropy_avg"] > 0.1
        expected = out["loss/policy_avg"] - ent_coef * out["policy/entropy_avg"]
        assert loss == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize(("target_kl", "early_stop", "epochs_run"), [(1e-12, 1.0, 1), (None, 0.0, 4)])
def test_target_kl_stops_the_epochs_early(
    tokenizer, tmp_path, monkeypatch, target_kl, early_stop, epochs_run
):
    cfg = replace(BASE, num_ppo_epochs=4, target_kl=target_kl, total_episodes=16)
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    calls = []
    minibatch_step = trainer.optimiser.minibatch_step
    monkeypatch.setattr(
        trainer.optimiser, "minibatch_step", lambda *a, **k: calls.append(1) or minibatch_step(*a, **k)
    )
    metrics, _ = trainer.step()
    assert metrics["policy/early_stop"] == early_stop
    assert len(calls) == epochs_run * cfg.num_mini_batches


def test_reward_source_both_adds_the_weighted_parts(tokenizer, tmp_path):
    policy = tiny_llama(tokenizer)
    reward_model = critic_from(policy, seed=3)
    cfg = replace(
        BASE, reward_source="both", env_reward_weight=0.3, model_reward_weight=2.0, total_episodes=16
    )
    trainer = make_trainer(tokenizer, tmp_path, cfg, env=DialogueEnv, reward_model=reward_model)
    ro = trainer.rollout()
    scored = trainer.score(ro)
    assert ro.env_rewards.abs().sum() > 0 and scored.model_scores.abs().sum() > 0
    torch.testing.assert_close(scored.scores, 0.3 * ro.env_rewards + 2.0 * scored.model_scores)
    torch.testing.assert_close(scored.token_scores.sum(1), scored.scores)


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_first_minibatch_ratio_is_one_at_any_temperature(tokenizer, tmp_path, temperature):
    cfg = replace(BASE, temperature=temperature, num_ppo_epochs=1, num_mini_batches=1, total_episodes=16)
    metrics, _ = make_trainer(tokenizer, tmp_path, cfg).step()
    assert metrics["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)


def test_the_sampler_mismatch_is_logged_near_zero_and_shows_a_gap_between_sampler_and_update(
    tokenizer, tmp_path, monkeypatch
):
    cfg = replace(BASE, num_ppo_epochs=2, num_mini_batches=2, total_episodes=16)
    trainer = make_trainer(tokenizer, tmp_path, cfg)
    metrics, _ = trainer.step()
    assert metrics["rollout/logprob_mismatch"] < 1e-5 and abs(metrics["rollout/logprob_mismatch_kl"]) < 1e-8

    rollout = trainer.rollout

    def shifted():  # a sampler that computes another distribution: every sampled token 0.1 nats likelier
        ro = rollout()
        ro.logprobs = torch.where(ro.action_mask, ro.logprobs + 0.1, ro.logprobs)
        return ro

    monkeypatch.setattr(trainer, "rollout", shifted)
    metrics, _ = trainer.step()
    assert metrics["rollout/logprob_mismatch"] == pytest.approx(0.1, abs=1e-4)
    assert metrics["rollout/logprob_mismatch_kl"] == pytest.approx(math.expm1(-0.1) + 0.1, rel=1e-3)
