"""The trained models' optimizers: float32 master weights, fused AdamW, a linear learning-rate decay per update."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def upcast_trainable(model: nn.Module, name: str) -> None:
    """Trainable float16/bfloat16 parameters -> float32, in place (frozen ones, e.g. a LoRA base, stay low).

    bf16 keeps 8 significant bits: an AdamW step of ~lr (1e-5) on a weight of ~0.02 rounds away. Training keeps
    float32 master weights and optimizer state; the accelerator's autocast runs the forward in low precision
    (Accelerator(mixed_precision="bf16"|"fp16")).
    """
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)]
    if low:
        log.info("%s: %d trainable low-precision tensors kept in float32 for training", name, len(low))
        for p in low:
            p.data = p.data.float()


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel (one op per step, not ~10 per tensor) on CPU/CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params) or None
    return torch.optim.AdamW(params, lr=lr, eps=1e-5, weight_decay=weight_decay, fused=fused)


def linear_decay(optimizer: torch.optim.Optimizer, num_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate decayed linearly to 0 over `num_updates`, stepped once per update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: max(0.0, 1.0 - update / num_updates))
