"""PPO under FSDP2 through accelerate: two CPU processes (gloo), checkpoint, resume, against DDP.

What the stack does on CPU (torch 2.13, accelerate 1.15):
- torch runs FSDP2 (`fully_shard`) on CPU with gloo: forward, backward, optimizer step, `unshard()`/`reshard()`,
  full and sharded state dicts (`torch.distributed.checkpoint`). FSDP1 (`FullyShardedDataParallel`) needs
  `device_id=torch.device("cpu")`; without it: "FSDP needs a non-CPU accelerator device, but no accelerator device
  is detected." Its full state dict with `offload_to_cpu=True` (what accelerate's `get_state_dict` asks for)
  segfaults on CPU.
- accelerate never chooses FSDP on CPU: `Accelerator(cpu=True, fsdp_plugin=...)` (or `ACCELERATE_USE_FSDP=true`,
  as `accelerate launch --use_fsdp` sets it) silently trains with DDP (`DistributedType.MULTI_CPU`, the plugin
  dropped), and `accelerate launch --cpu --use_fsdp` refuses: "You can only use one of `--cpu`, `--multi_gpu`,
  `--tpu`, `--use_deepspeed`, `--use_fsdp` at a time."

So the CPU test sets accelerate's state to FSDP the way `AcceleratorState` does on a GPU (`cpu_fsdp_accelerator`);
from there on everything is accelerate's own FSDP2 path (`prepare`, `backward`, `clip_grad_norm_`, `save_state`,
`load_state`, `get_state_dict`). The refusal tests fail when a future accelerate drives FSDP on CPU by itself: then
drop the shim. On GPUs the same worker runs under `accelerate launch --use_fsdp` (`benchmarks/fsdp_gpu_check.sh`).

This file is also the worker: `python tests/ppo/test_fsdp.py {fsdp|ddp} OUTPUT_DIR --results DIR [options]` under
torchrun or `accelerate launch`; each process writes DIR/result-<rank>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMING = ("eps", "time/rollout", "time/score", "time/update", "tokens_per_second")
FSDP_REFUSED_ON_CPU = "FSDP needs a non-CPU accelerator device, but no accelerator device is detected."
LAUNCH_REFUSES = (
    "You can only use one of `--cpu`, `--multi_gpu`, `--tpu`, `--use_deepspeed`, `--use_fsdp` at a time."
)


# ---------------------------------------------------------------- the worker (one per process)


def cpu_fsdp_accelerator(plugin):
    """An Accelerator on CPU whose state says FSDP with `plugin`, and the distributed type accelerate chose itself.

    accelerate 1.15 sets `distributed_type = FSDP` and `fsdp_plugin` only for accelerator devices
    (`AcceleratorState.__init__`); on CPU it keeps MULTI_CPU (DDP) and drops the plugin. Setting the two fields
    as it does on a GPU routes `prepare`, `save_state`, `load_state` and `get_state_dict` through its FSDP code.
    PartialState's copy is set too: every `AcceleratorState()` re-reads it.
    """
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    chosen = acc.distributed_type
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc, chosen


def digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's float32 bytes, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        # a copy: numpy would pin the storage that FSDP frees when it reshards
        h.update(p.detach().to("cpu", torch.float32, copy=True).numpy().tobytes())
    return h.hexdigest()


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements this process holds (its shards under FSDP2)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["fsdp", "ddp"])
    parser.add_argument("output_dir")
    parser.add_argument("--cpu", action="store_true", help="FSDP on CPU through cpu_fsdp_accelerator")
    parser.add_argument("--state-dict-type", default="SHARDED_STATE_DICT")
    parser.add_argument("--max-updates", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the policy's q/v projections")
    parser.add_argument("--results", required=True, help="directory for result-<rank>.json")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(1)
    if torch.cuda.is_available():  # resume must equal the uninterrupted run exactly: deterministic kernels
        torch.use_deterministic_algorithms(True, warn_only=True)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from test_trainer import BASE, critic_from

    from rlhf.models.tokenizer import build_tokenizer
    from rlhf.ppo.sharding import fsdp_version, gathered
    from rlhf.ppo.trainer import PPOTrainer
    from tests.helpers import WORDS, ToyEnv, tiny_llama

    chosen = None
    if args.engine == "ddp":
        acc = Accelerator(cpu=not torch.cuda.is_available())
    elif args.cpu:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
            state_dict_type=args.state_dict_type,
        )
        acc, chosen = cpu_fsdp_accelerator(plugin)
    else:  # accelerate launch --use_fsdp ...: the plugin from the environment
        acc = Accelerator()
    tok = build_tokenizer(WORDS)
    reference = tiny_llama(tok, seed=0)
    policy = tiny_llama(tok, seed=args.model_seed)
    full_numel = {"policy": sum(p.numel() for p in policy.parameters())}
    critic = critic_from(policy)
    full_numel["critic"] = sum(p.numel() for p in critic.parameters())
    reward_model = critic_from(reference, seed=3)  # frozen, like the reference: sharded too under FSDP2
    full_numel["reference"] = sum(p.numel() for p in reference.parameters())
    full_numel["reward"] = sum(p.numel() for p in reward_model.parameters())
    if args.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        full_numel["policy"] = sum(p.numel() for p in policy.parameters())
    # the score: the environment's reward plus the reward model's (its forward runs sharded under FSDP2)
    cfg = replace(BASE, save_every=args.save_every, reward_source="both", model_reward_weight=0.1)
    trainer = PPOTrainer(
        cfg,
        policy,
        tok,
        ToyEnv,
        output_dir=args.output_dir,
        ref_policy=reference,
        reward_model=reward_model,
        critic=critic,
        accelerator=acc,
    )
    trainer.train(max_updates=args.max_updates)
    trainer.export(Path(args.output_dir) / "final")  # what the PPO stage writes for the user
    with gathered(acc, trainer.policy) as p:
        policy_digest = digest(p)
    with gathered(acc, trainer.critic.module) as v:
        critic_digest = digest(v.model)
    out = {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "chosen": str(chosen),
        "distributed_type": str(acc.distributed_type),
        "fsdp_version": fsdp_version(acc),
        "prepared": [type(trainer.policy).__name__, type(trainer.critic.module).__name__],
        "local_numel": {
            "policy": local_numel(trainer.policy),
            "critic": local_numel(trainer.critic.model),
            "reference": local_numel(trainer.ref_policy),
            "reward": local_numel(trainer.reward_scorer.model),
        },
        "full_numel": full_numel,
        "digest": {"policy": policy_digest, "critic": critic_digest},
        "update": trainer.update,
        "checkpoint": str(trainer.last_checkpoint),
    }
    (Path(args.results) / f"result-{acc.process_index}.json").write_text(json.dumps(out))


# ---------------------------------------------------------------- launching and checking (the test process)


def launch(launcher: list[str], *args: str, timeout: int = 600) -> list[dict]:
    """Run the worker under `launcher` (torchrun or accelerate launch); its results, sorted by rank."""
    results_dir = Path(tempfile.mkdtemp(prefix="fsdp-results-"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }
    proc = subprocess.run(
        [*launcher, str(Path(__file__).resolve()), *args, "--results", str(results_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in results_dir.glob("result-*.json")]
    shutil.rmtree(results_dir)
    return sorted(results, key=lambda r: r["rank"])


def torchrun() -> list[str]:
    return [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]


def history(stage_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (stage_dir / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def weights(checkpoint: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The whole weights the checkpoint's save_pretrained directory holds (plain safetensors, no FSDP)."""
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / name / "model.safetensors"))


def assert_sharded_and_replicated(results: list[dict], world: int) -> None:
    """Each process held ~1/world of every model, frozen ones included; the gathered weights of the trained ones are
    the same on every process."""
    assert [r["rank"] for r in results] == list(range(world))
    for r in results:
        assert r["fsdp_version"] == 2 and r["distributed_type"] == "DistributedType.FSDP", r
        assert r["prepared"] == ["FSDPLlamaForCausalLM", "FSDPValueHead"], r["prepared"]
    for model in ("policy", "critic", "reference", "reward"):
        full = results[0]["full_numel"][model]
        local = [r["local_numel"][model] for r in results]
        assert sum(local) == full and max(local) <= full // world + 64, (model, local, full)
    for model in ("policy", "critic"):
        assert len({r["digest"][model] for r in results}) == 1, f"{model}: processes disagree"


def assert_same_run(a: Path, b: Path, atol: float) -> None:
    """Two stage directories: the final checkpoint's policy and critic weights and the history rows agree."""
    ca, cb = sorted((a / "checkpoints").iterdir())[-1], sorted((b / "checkpoints").iterdir())[-1]
    assert ca.name == cb.name
    for name in ("policy", "critic"):
        wa, wb = weights(ca, name), weights(cb, name)
        assert wa.keys() == wb.keys(), name
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=f"{name}.{k}")
    ha, hb = history(a), history(b)
    assert [r["update"] for r in ha] == [r["update"] for r in hb]
    for ra, rb in zip(ha, hb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], abs=max(atol, 1e-6)), (ra["update"], key)


def tiny_weights() -> dict[str, torch.Tensor]:
    """The worker's initial policy weights (seed 0), as `save_pretrained` writes them."""
    sys.path.insert(0, str(HERE))
    from rlhf.models.tokenizer import build_tokenizer
    from tests.helpers import WORDS, tiny_llama

    with tempfile.TemporaryDirectory() as d:
        tiny_llama(build_tokenizer(WORDS), seed=0).save_pretrained(d)
        return weights(d, "")


def assert_exported_whole(stage_dir: Path, checkpoint: str) -> None:
    """`PPOTrainer.export` under FSDP wrote the whole weights (not a rank's shards): equal to the final checkpoint's
    gathered ones, and plain `transformers` loads them."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for name, sub, auto in (
        ("policy", "", AutoModelForCausalLM),
        ("critic", "critic", AutoModelForSequenceClassification),
    ):
        exported, saved = weights(stage_dir / "final", sub), weights(checkpoint, name)
        assert exported.keys() == saved.keys(), name
        for k in saved:
            torch.testing.assert_close(exported[k], saved[k], atol=0, rtol=0, msg=f"{name}.{k}")
        model = auto.from_pretrained(stage_dir / "final" / sub)
        assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in saved.values())


def test_accelerate_does_not_drive_fsdp_on_cpu():
    """The refusals the CPU test works around; when one of these fails, accelerate may run FSDP on CPU itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--cpu", "--use_fsdp", "--num_processes", "2", "x.py"])
    with pytest.raises(ValueError) as refused:
        _validate_launch_command(args)
    assert str(refused.value) == LAUNCH_REFUSES


@pytest.mark.slow
def test_ppo_under_fsdp2_on_two_cpu_processes_checkpoints_resumes_and_matches_ddp(tmp_path):
    # torch's FSDP1 without a device_id refuses a CPU-only machine (FSDP2 and FSDP1 with device_id=cpu run)
    script = tmp_path / "fsdp1_refusal.py"
    script.write_text(
        "import pathlib, sys, torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import FullyShardedDataParallel as FSDP\n"
        "dist.init_process_group('gloo')\n"
        "try:\n"
        "    FSDP(torch.nn.Linear(2, 2))\n"
        "except RuntimeError as e:\n"
        "    pathlib.Path(sys.argv[1], f'refusal-{dist.get_rank()}.txt').write_text(str(e))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*torchrun(), str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    errors = [(tmp_path / f"refusal-{r}.txt").read_text() for r in (0, 1)]
    assert errors == [FSDP_REFUSED_ON_CPU] * 2, proc.stderr[-2000:]

    # an uninterrupted FSDP2 run of 4 updates (one checkpoint, at the end)
    straight = launch(torchrun(), "fsdp", str(tmp_path / "a"), "--cpu")
    assert all(r["chosen"] == "DistributedType.MULTI_CPU" for r in straight), (
        "accelerate chose FSDP on CPU itself"
    )
    assert_sharded_and_replicated(straight, 2)
    assert all(r["update"] == 4 for r in straight)
    assert_exported_whole(tmp_path / "a", straight[0]["checkpoint"])
    # the same run stopped after 2 updates (checkpoint 2), then resumed in fresh processes from other initial weights
    first = launch(
        torchrun(), "fsdp", str(tmp_path / "b"), "--cpu", "--save-every", "2", "--max-updates", "2"
    )
    assert [r["update"] for r in first] == [2, 2]
    ckpt = Path(first[0]["checkpoint"])
    assert ckpt.name == "checkpoint-000002"
    state = sorted(p.name for p in (ckpt / "accelerate").iterdir())
    assert {"pytorch_model_fsdp_0", "pytorch_model_fsdp_1", "optimizer_0", "optimizer_1"} <= set(state), state
    resumed = launch(
        torchrun(), "fsdp", str(tmp_path / "b"), "--cpu", "--save-every", "2", "--model-seed", "7"
    )
    assert_sharded_and_replicated(resumed, 2)
    assert [r["digest"] for r in resumed] == [r["digest"] for r in straight], "resumed != uninterrupted"
    assert_same_run(tmp_path / "a", tmp_path / "b", atol=0.0)
    # DDP on the same global batch: the same run up to float summation order
    ddp = launch(torchrun(), "ddp", str(tmp_path / "c"))
    assert [r["distributed_type"] for r in ddp] == ["DistributedType.MULTI_CPU"] * 2
    assert_same_run(tmp_path / "a", tmp_path / "c", atol=1e-5)
    # LoRA: the FSDP export merges the adapters from the gathered state dict (`merged_state_dict`), the DDP export
    # with peft's own `merge_and_unload`: two implementations, one result
    fsdp_lora = launch(torchrun(), "fsdp", str(tmp_path / "d"), "--cpu", "--lora", "--max-updates", "2")
    assert [(r["fsdp_version"], r["distributed_type"]) for r in fsdp_lora] == [
        (2, "DistributedType.FSDP")
    ] * 2
    assert len({r["digest"]["policy"] for r in fsdp_lora}) == 1
    launch(torchrun(), "ddp", str(tmp_path / "e"), "--lora", "--max-updates", "2")
    merged_fsdp, merged_ddp = weights(tmp_path / "d" / "final", ""), weights(tmp_path / "e" / "final", "")
    assert merged_fsdp.keys() == merged_ddp.keys() and not any("lora" in k for k in merged_fsdp)
    for k in merged_ddp:
        torch.testing.assert_close(merged_fsdp[k], merged_ddp[k], atol=1e-5, rtol=0, msg=k)
    initial = tiny_weights()
    adapted = [k for k in merged_fsdp if not torch.equal(merged_fsdp[k], initial[k])]
    assert adapted and all("q_proj" in k or "v_proj" in k for k in adapted), (
        adapted
    )  # only the adapted layers moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/fsdp_gpu_check.sh)")
def test_ppo_under_fsdp2_on_gpus_through_accelerate_launch(tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` on every visible GPU (1 GPU: FSDP without sharding)."""
    world = torch.cuda.device_count()
    accelerate = str(Path(sys.executable).parent / "accelerate")
    common = f"--num_processes {world} --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    fsdp = [
        *(accelerate, "launch", "--use_fsdp", "--fsdp_version", "2", *common, "--main_process_port", "29551"),
        *("--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"),
        *("--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"),
        *("--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_reshard_after_forward", "true"),
        *("--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_sync_module_states", "false"),  # as on CPU
    ]
    straight = launch(fsdp, "fsdp", str(tmp_path / "a"))
    assert_sharded_and_replicated(straight, world)
    launch(fsdp, "fsdp", str(tmp_path / "b"), "--save-every", "2", "--max-updates", "2")
    resumed = launch(fsdp, "fsdp", str(tmp_path / "b"), "--save-every", "2", "--model-seed", "7")
    assert [r["digest"] for r in resumed] == [r["digest"] for r in straight], "resumed != uninterrupted"
    assert_same_run(tmp_path / "a", tmp_path / "b", atol=0.0)
    multi = ["--multi_gpu"] if world > 1 else []
    ddp = [accelerate, "launch", *multi, *common, "--main_process_port", "29552"]
    launch(ddp, "ddp", str(tmp_path / "c"))
    assert_same_run(tmp_path / "a", tmp_path / "c", atol=1e-5)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(sys.argv[1:])
