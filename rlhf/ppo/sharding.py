"""Sharded (FSDP) models in the PPO loop: full parameters for the no-grad passes, full weights for saving.

Under FSDP (`Accelerator(fsdp_plugin=...)`, or `accelerate launch --use_fsdp`) each process holds a shard of every
prepared model. A training forward gathers the shards layer by layer and frees them again, a collective that every
process must run the same number of times. Generation is not like that: processes stop generating at different
steps (their episodes end when they end), so a forward per token through FSDP's hooks would leave the processes in
different collectives. `gathered` therefore gathers the whole model once, on every process at the same point, and
keeps it whole (no collectives) until the block ends; the rollout, the reference pass (the LoRA policy with its
adapters disabled) and the critic's value pass run inside it. This is what `deepspeed.zero.GatheredParameters`
does for ZeRO-3 in TRL's `unwrap_model_for_generation`.

The policy and the critic are two prepared models of one Accelerator (one plugin, one device mesh, one
`save_state`): accelerate's FSDP2 `prepare` takes one model (with its optimizer) per call ("Only one model is
supported when using FSDP2"). The frozen reference and reward model are not prepared (a checkpoint does not need
them): under FSDP2 `shard_frozen` shards them with torch's `fully_shard` directly, so each process holds 1/N of them
too, and their scoring forwards gather a block at a time. Under FSDP1 each process holds them whole.

Without FSDP (single process, DDP) both functions do nothing: `gathered` yields the unwrapped model and
`full_state_dict` returns None (the model's own `state_dict` is already whole).

accelerate 1.15 enables FSDP only on accelerator devices: with `Accelerator(cpu=True, fsdp_plugin=...)`, or
`ACCELERATE_USE_FSDP=true` on a machine without a GPU, it silently trains with DDP instead (`tests/ppo/test_fsdp.py`
records this and runs FSDP2 on CPU by setting accelerate's state the way it does on a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn


def fsdp_version(acc: Accelerator) -> int:
    """1 or 2 when the accelerator shards prepared models with FSDP, else 0."""
    if acc.distributed_type != DistributedType.FSDP:
        return 0
    return int(acc.state.fsdp_plugin.fsdp_version)


@contextmanager
def gathered(acc: Accelerator, model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped `model` with its full parameters on every process, for no-grad passes that may differ in length
    between processes (generation). Every process must enter and leave together (entering all-gathers); the block
    itself runs no collective. Parameters are read-only inside: changes are not written back to the shards.
    """
    version = fsdp_version(acc)
    if version == 2:
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in modules:  # FSDPModule.unshard is not recursive: one all-gather per sharded module
            m.unshard()
        for m in modules:  # forwards inside the block find the parameters whole and leave them whole
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield acc.unwrap_model(model)
        finally:
            reshard = acc.state.fsdp_plugin.reshard_after_forward  # what accelerate passed to `fully_shard`
            for m in modules:
                m.set_reshard_after_forward(bool(reshard), recurse=False)
                m.reshard()
    elif version == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield acc.unwrap_model(model)
    else:
        yield acc.unwrap_model(model)


def shard_frozen(acc: Accelerator, model: nn.Module) -> nn.Module:
    """Under FSDP2, a frozen model sharded across the processes like the prepared ones: each transformer block (the
    model's `_no_split_modules`) and the rest, on one mesh of every process. Its forwards then all-gather one block
    at a time, so every process must run the same number of them: the reference and reward passes split the equal
    local batches into equal chunks. Without FSDP2 the model is returned as it is."""
    if fsdp_version(acc) != 2:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP2 leaves the root's own parameters (embeddings, final norm, head) whole after a forward, for the backward
    # that a frozen model never runs: free them after every forward
    model.register_forward_hook(lambda module, args, output: module.reshard())
    return model


def full_state_dict(acc: Accelerator, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole (unsharded) state dict of a prepared FSDP model, on the main process (CPU tensors; other processes
    get an empty dict). Every process must call it (it all-gathers). None without FSDP: use `model.state_dict()`."""
    if not fsdp_version(acc):
        return None
    state = acc.get_state_dict(model)
    # a tied parameter (one tensor under two names, e.g. embeddings and LM head) arrives as two copies: share them
    # again, so that `save_pretrained` drops the tied name as it does for the unsharded model
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        original = first.setdefault(id(p), name)
        if original != name and original in state and name in state:
            state[name] = state[original]
    return state
