"""fused_logprobs_entropy against a plain reference: full logits, torch.log_softmax, autograd through both."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlhf.ppo import ops


def _reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full (..., V) logits: log_softmax, gather the target, entropy = -sum p log p."""
    logits = hidden @ weight.T  # (..., V)
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def _case(n=13, v=37, h=5, dtype=torch.float64, bias=True, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=dtype) * scale).requires_grad_(True)
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = (torch.randn(n, generator=g, dtype=dtype), torch.randn(n, generator=g, dtype=dtype))
    return hidden, weight, b, targets, upstream


def _grads(outputs, upstream, which, inputs):
    """Gradients of sum(u_lp * logprobs) (+ sum(u_ent * entropy)) w.r.t. inputs; ``which`` picks the outputs."""
    logprobs, entropy = outputs
    loss = 0
    if which in ("both", "logprobs"):
        loss = loss + (upstream[0].to(logprobs.dtype) * logprobs).sum()
    if which in ("both", "entropy"):
        loss = loss + (upstream[1].to(entropy.dtype) * entropy).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("which", ["both", "logprobs", "entropy"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.9])
@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 5, 100])  # 13 rows: 5 and 4 leave a partial chunk
def test_values_and_grads_match_full_logits(which, dtype, tol, temperature, chunk_rows) -> None:
    hidden, weight, bias, targets, upstream = _case(dtype=dtype)
    inputs = (hidden, weight, bias)
    got = ops.fused_logprobs_entropy(hidden, weight, targets, temperature, bias=bias, chunk_rows=chunk_rows)
    want = _reference(hidden, weight, targets, temperature, bias)
    assert got[0].dtype == got[1].dtype == dtype  # float32 stays float32, float64 stays float64
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    for g, w in zip(_grads(got, upstream, which, inputs), _grads(want, upstream, which, inputs)):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


def test_gradcheck_double() -> None:
    hidden, weight, bias, targets, _ = _case(n=6, v=9, h=3, scale=1.0)

    def f(x, w, b):
        return ops.fused_logprobs_entropy(x, w, targets, temperature=0.8, bias=b, chunk_rows=4)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_entropy_gradient_alone_matches_finite_difference_direction() -> None:
    """The entropy term alone (the one easiest to get wrong in sign): gradcheck with the logprob output unused."""
    hidden, weight, bias, targets, _ = _case(n=5, v=7, h=3, seed=3, scale=1.0)

    def ent(x, w, b):
        return ops.fused_logprobs_entropy(x, w, targets, temperature=1.3, bias=b, chunk_rows=2)[1]

    assert torch.autograd.gradcheck(ent, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_leading_batch_dims_match_flat() -> None:
    hidden, weight, bias, targets, upstream = _case(n=12)
    got = ops.fused_logprobs_entropy(hidden.reshape(3, 4, -1), weight, targets.reshape(3, 4), bias=bias)
    assert got[0].shape == got[1].shape == (3, 4)
    want = _reference(hidden, weight, targets, bias=bias)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.reshape(-1), w)
    flat_got = tuple(t.reshape(-1) for t in got)
    for g, w in zip(_grads(flat_got, upstream, "both", (hidden,)), _grads(want, upstream, "both", (hidden,))):
        torch.testing.assert_close(g, w)


def test_frozen_weight_gets_no_grad_and_hidden_grad_is_right() -> None:
    hidden, weight, bias, targets, upstream = _case()
    frozen = weight.detach()  # requires_grad False, like a frozen / tied-and-frozen head
    got = ops.fused_logprobs_entropy(hidden, frozen, targets, 0.9, bias=None, chunk_rows=3)
    want = _reference(hidden, frozen, targets, 0.9)
    (got[0] * upstream[0] + got[1] * upstream[1]).sum().backward()
    assert frozen.grad is None
    (g_want,) = _grads(want, upstream, "both", (hidden,))
    torch.testing.assert_close(hidden.grad, g_want)


def test_only_weight_needs_grad() -> None:
    hidden, weight, bias, targets, upstream = _case()
    x = hidden.detach()
    got = ops.fused_logprobs_entropy(x, weight, targets, bias=bias.detach(), chunk_rows=6)
    want = _reference(x, weight, targets, bias=bias.detach())
    for g, w in zip(_grads(got, upstream, "both", (weight,)), _grads(want, upstream, "both", (weight,))):
        torch.testing.assert_close(g, w)


def test_float32_weight_grad_accumulates_in_float32() -> None:
    hidden, weight, bias, targets, upstream = _case(n=50, v=31, h=4, dtype=torch.float32)
    got = ops.fused_logprobs_entropy(hidden, weight, targets, bias=bias, chunk_rows=7)
    grads = _grads(got, upstream, "both", (hidden, weight, bias))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    want = _reference(hidden, weight, targets, bias=bias)
    for g, w in zip(grads, _grads(want, upstream, "both", (hidden, weight, bias))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_banned_tokens_with_minus_inf_bias_give_no_nan() -> None:
    """A -inf bias bans a token: same values and grads as dropping its vocab row; its own grads are 0."""
    hidden, weight, bias, targets, upstream = _case(dtype=torch.float64)
    banned = torch.tensor([0, 3])
    with torch.no_grad():
        bias[banned] = float("-inf")
        targets[torch.isin(targets, banned)] = 1
    got = ops.fused_logprobs_entropy(hidden, weight, targets, bias=bias, chunk_rows=4)
    grads = _grads(got, upstream, "both", (hidden, weight, bias))
    assert all(torch.isfinite(g).all() for g in grads)
    kept = torch.ones(weight.shape[0], dtype=torch.bool)
    kept[banned] = False
    new_ids = torch.cumsum(kept.long(), 0) - 1  # old vocab id -> id among the kept rows
    want = _reference(hidden, weight[kept], new_ids[targets], bias=bias[kept])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    want_grads = _grads(want, upstream, "both", (hidden, weight, bias))
    for g, w in zip(grads, want_grads):  # the reference never uses the banned rows: their grads are 0
        torch.testing.assert_close(g, w)
    assert (grads[1][banned] == 0).all() and (grads[2][banned] == 0).all()


def test_autocast_bf16_matmul_with_float32_softmax() -> None:
    hidden, weight, bias, targets, upstream = _case(n=40, v=300, h=16, dtype=torch.float32, scale=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.fused_logprobs_entropy(hidden, weight, targets, bias=bias, chunk_rows=9)
    assert got[0].dtype == got[1].dtype == torch.float32
    # the same computation by hand: bf16 logits, float32 softmax
    logits_bf16 = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float() + bias
    want = _reference(logits_bf16, torch.eye(300), targets)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    grads = _grads(got, upstream, "both", (hidden, weight, bias))
    ref_grads = _grads(
        _reference(hidden, weight, targets, bias=bias), upstream, "both", (hidden, weight, bias)
    )
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for g, w in zip(grads, ref_grads):  # bf16 matmuls: close to the float32 gradient, not equal
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05 * w.abs().max().item())


def test_bad_arguments_raise_value_error() -> None:
    hidden, weight, bias, targets, _ = _case()
    with pytest.raises(ValueError, match="temperature"):
        ops.fused_logprobs_entropy(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        ops.fused_logprobs_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="hidden size"):
        ops.fused_logprobs_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="bias"):
        ops.fused_logprobs_entropy(hidden, weight, targets, bias=bias[:-1])
    with pytest.raises(ValueError, match="chunk_rows"):
        ops.fused_logprobs_entropy(hidden, weight, targets, chunk_rows=0)


def test_empty_input() -> None:
    hidden, weight, bias, targets, _ = _case(n=0)
    logprobs, entropy = ops.fused_logprobs_entropy(hidden.reshape(0, 0, 5), weight, targets.reshape(0, 0))
    assert logprobs.shape == entropy.shape == (0, 0)
    (logprobs.sum() + entropy.sum()).backward()
    assert weight.grad is not None and (weight.grad == 0).all()


# --- memory: nothing (N, V)-sized is saved for backward or allocated, in forward or backward ---------------

N, V, H, CHUNK = 64, 50_000, 16, 8


def _big_case():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_(True)
    bias = torch.zeros(V).requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, bias, targets


def _largest_saved(fn) -> int:
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs, entropy = fn()
    (logprobs.sum() + entropy.sum()).backward()
    return max(sizes)


class _LargestAllocation(TorchDispatchMode):
    """Records the numel of every tensor an aten op returns (forward and backward ops alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_v_tensor_is_saved_for_backward() -> None:
    hidden, weight, bias, targets = _big_case()
    fused = _largest_saved(lambda: ops.fused_logprobs_entropy(hidden, weight, targets, 0.8, bias, CHUNK))
    assert fused < N * V
    assert fused <= max(N * H, V * H)  # hidden, weight: nothing per (token, vocab) pair
    # the check itself sees the problem in the plain path
    plain = _largest_saved(lambda: _reference(hidden, weight, targets, 0.8, bias))
    assert plain >= N * V


def test_largest_temporary_is_one_chunk() -> None:
    hidden, weight, bias, targets = _big_case()
    with _LargestAllocation() as probe:
        logprobs, entropy = ops.fused_logprobs_entropy(hidden, weight, targets, 0.8, bias, CHUNK)
        (logprobs.sum() + 2 * entropy.sum()).backward()
    assert probe.largest <= max(CHUNK * V, V * H, N * H)
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    with _LargestAllocation() as probe:  # the probe does see the full logits of the plain path
        logprobs, entropy = _reference(hidden, weight, targets, 0.8, bias)
        (logprobs.sum() + 2 * entropy.sum()).backward()
    assert probe.largest >= N * V
