"""Tolerances for tests that compare two computations of the same math, derived from the dtype and the operation.

Two kernels that compute the same expression on a CPU need not agree to the bit. What changes the bits, measured on
this stack (AVX-512 against `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`):

- the vector width of the ISA (8 floats on AVX2, 16 on AVX-512): it decides how a reduction is split into lanes
  and, in the CPU flash-attention kernel behind `F.scaled_dot_product_attention`, which columns of a key block go
  through the vectorised approximate exp (`exp_u20`) and which through the scalar `exp` of the block's tail;
- the layout of the operands: left padding, masked columns or another sequence length move the real keys within
  those blocks; in bf16 the same kernel also rounds the softmax weights to bf16 block by block;
- the thread count: a float32 flash attention at 1 thread and at 2 threads differs in the last bit here, from the
  MKL sgemm it calls per block (with MKL's reproducibility mode, `MKL_CBWR=COMPATIBLE`, the difference goes);
- the library: bf16 matmuls run on oneDNN with AVX512-BF16 or AMX, on ATen's own fallback without.

So a test asserts bit-equality only between runs of the *same* computation (a rerun, a resume in the same mode, the
same thread count), and compares *different* computations of the same math at a tolerance from here. Tests whose
results depend on such kernels carry the `numerics` marker: `make test-avx2` (and CI, after `make test`) runs them
again with the kernels of an AVX2-only CPU.

The derivation. A result rounded to `dtype` from a float32 accumulator: the kernels above change the accumulator by
about K * 2**-24 * sum|terms| (K terms summed, float32 unit roundoff), far below one rounding step of bf16 or fp16,
so the rounded results either agree or land on neighbouring `dtype` values: one ulp apart, where
ulp(x) = eps(dtype) * 2**floor(log2|x|) (bf16: eps = 2**-7, 8 significant bits). Inside a network such a flip
changes one intermediate by one ulp of its scale; RMS normalisation keeps hidden states at unit scale and the tiny
test models' weights shrink rather than amplify, so the flip reaches the output as at most about one ulp of the
*output's* scale. The comparison therefore allows `flips` ulps at the scale of the outputs (their largest
magnitude), as an absolute tolerance: an output smaller than the terms it was summed from (cancellation) carries
their ulp, not its own, so a relative tolerance per element would be wrong. Where the two computations also round
at different places (one merges LoRA weights before rounding, the other rounds each adapter product), each extra
rounding adds one more ulp.
"""

from __future__ import annotations

import math

import torch


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype` numbers at `magnitude` (> 0): eps * 2**floor(log2 magnitude)."""
    if magnitude <= 0:
        raise ValueError(f"magnitude must be positive, got {magnitude}")
    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(magnitude))


def kernel_tolerance(dtype: torch.dtype, outputs: torch.Tensor, flips: int = 2) -> float:
    """Absolute tolerance between two kernels' results of the same math rounded to `dtype`: `flips` ulps of `dtype`
    at the scale of `outputs` (their largest magnitude). See the module docstring for the derivation."""
    scale = float(outputs.detach().abs().max())
    return flips * ulp(dtype, scale) if scale > 0 else 0.0
