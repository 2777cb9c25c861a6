"""peak (a section of benchmarks/real_model.py): sustained FLOP/s of 2048^3 matmuls (torch.mm) in float32 and
bfloat16: the best 1-second window (total FLOPs / time) of `--peak-seconds`, and the mean over all of them; the
same thread count as everything else. Plus copy bandwidth (GB/s read + written of a 256 MiB tensor), the bound of
a memory-bound decode step.
"""

from __future__ import annotations

from measure import Stopwatch, cpu_share, load_1min, timed


def matmul_peak(n: int, dtype_name: str, seconds: float, window: float = 1.0) -> dict[str, float]:
    """Sustained FLOP/s of (n, n) @ (n, n) in `dtype_name` over `seconds`, in windows of `window` seconds: the best
    window's rate (other processes only ever slow a window down) and the mean over all of them. One warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, pages
    load = load_1min()
    flops = 2 * n**3
    rates, shares, total_flops, start = [], [], 0, Stopwatch()
    while len(rates) < 3 or start.wall_s < seconds:
        laps = timed(lambda: torch.mm(a, b, out=out), seconds=window)
        wall, cpu = sum(lap.wall_s for lap in laps), sum(lap.cpu_s for lap in laps)
        rates.append(flops * len(laps) / wall)
        shares.append(cpu_share(cpu, wall))
        total_flops += flops * len(laps)
    best = rates.index(max(rates))
    return {
        "dtype": dtype_name,
        "n": n,
        "gflops": rates[best] / 1e9,
        "mean_gflops": total_flops / start.wall_s / 1e9,
        "cpu_share": shares[best],
        "load": load,
    }


def copy_bandwidth(mib: int, seconds: float) -> dict[str, float]:
    """GB/s moved (read + written) by copying a `mib` MiB float32 tensor: the ceiling of a memory-bound op."""
    import torch

    a = torch.randn(mib * 2**18)
    b = torch.empty_like(a)
    b.copy_(a)
    load = load_1min()
    fastest = min(lap.wall_s for lap in timed(lambda: b.copy_(a), runs=3, seconds=seconds))
    return {"gbps": 2 * a.numel() * 4 / fastest / 1e9, "load": load}
