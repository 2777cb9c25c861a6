"""Training precision that fits the hardware: `model.dtype=auto` resolved from what the device reports.

bf16 mixed precision pays only where the hardware multiplies bf16 natively: a CUDA GPU with bf16 support, or a CPU
with AMX or AVX512-BF16 whose instructions torch's kernels are allowed to use. On a CPU without them (AVX2 only, or
AVX-512 without BF16) oneDNN emulates bf16 and a matmul runs many times slower than in float32 (BENCHMARKS.md,
"Right on the user's machine"). The choice is made from the device's reported features, never by timing,
so it is the same on every run of one machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class CPUFeatures:
    """What decides bf16's speed on a CPU."""

    name: str
    """The CPU's model name (as torch reports it)."""
    capability: str
    """The ISA torch's kernels dispatch to (`torch.backends.cpu.get_cpu_capability()`: DEFAULT, AVX2, AVX512...)."""
    amx_bf16: bool
    avx512_bf16: bool
    onednn_bf16: bool
    """oneDNN may use bf16 instructions (False when `ONEDNN_MAX_CPU_ISA` caps it below AVX-512)."""


def cpu_features() -> CPUFeatures:
    """This machine's CPU as torch sees it (flags from /proc/cpuinfo where torch has no `get_capabilities`)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else _proc_cpuinfo_flags()
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    return CPUFeatures(
        name=str(caps.get("cpu_name", "unknown CPU")),
        capability=capability,
        amx_bf16=bool(caps.get("amx_bf16")),
        avx512_bf16=bool(caps.get("avx512_bf16")),
        onednn_bf16=onednn_bf16,
    )


def _proc_cpuinfo_flags() -> dict[str, object]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    name = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    return {"cpu_name": name, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def cpu_bf16_verdict(cpu: CPUFeatures) -> tuple[bool, str]:
    """(bf16 runs faster than float32 on this CPU, why) - a pure function of the reported features."""
    native = "AMX" if cpu.amx_bf16 else "AVX512-BF16" if cpu.avx512_bf16 else None
    if native is None:
        return False, f"{cpu.name} ({cpu.capability}) has neither AMX nor AVX512-BF16: bf16 would be emulated"
    if not cpu.capability.startswith("AVX512") or not cpu.onednn_bf16:
        return False, f"{cpu.name} has {native}, but torch's kernels are capped at {cpu.capability}"
    return True, f"{cpu.name} ({cpu.capability}) multiplies bf16 natively ({native})"


def bf16_verdict(device_type: str) -> tuple[bool, str]:
    """(bf16 mixed precision runs faster than float32 on this device, why)."""
    import torch

    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} supports bf16"
        return False, f"{torch.cuda.get_device_name()} has no bf16"
    return cpu_bf16_verdict(cpu_features())


def resolve_dtype(requested: str, device_type: str) -> tuple[str, str]:
    """`model.dtype` as a concrete dtype name and the reason: auto -> bfloat16 where it is faster, else float32;
    any other value unchanged."""
    if requested != AUTO:
        return requested, "set explicitly"
    fast, why = bf16_verdict(device_type)
    return ("bfloat16" if fast else "float32"), why


def slow_bf16_warning(dtype: str, device_type: str) -> str | None:
    """One line when an explicit bfloat16 will run slower than float32 here, else None."""
    if dtype != "bfloat16" or device_type == "cuda":
        return None
    fast, why = bf16_verdict(device_type)
    if fast:
        return None
    return f"model.dtype=bfloat16 on this CPU is slower than float32 ({why}); model.dtype=auto picks float32 here"
