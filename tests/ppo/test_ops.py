"""Masked reductions against slicing out the selected elements; per-token logits functions against torch.distributions."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import ops


def _case(seed: int = 0, shape: tuple[int, int] = (4, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.rand(shape, generator=g) > 0.4
    mask[0, 0] = True  # at least one selected element
    return x, mask


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.long])
def test_masked_sum_and_mean_match_slicing(mask_dtype: torch.dtype) -> None:
    x, mask = _case()
    m = mask.to(mask_dtype)
    torch.testing.assert_close(ops.masked_sum(x, m), x[mask].sum())
    torch.testing.assert_close(ops.masked_mean(x, m), x[mask].mean())
    for dim in (0, 1, -1):
        kept = 1 - dim % 2  # reducing along dim leaves one entry per index of the other dim
        rows = [x.select(kept, i)[mask.select(kept, i)] for i in range(x.shape[kept])]
        torch.testing.assert_close(ops.masked_sum(x, m, dim=dim), torch.stack([r.sum() for r in rows]))
        means = torch.stack([r.mean() if r.numel() else torch.zeros((), dtype=x.dtype) for r in rows])
        torch.testing.assert_close(ops.masked_mean(x, m, dim=dim), means)


def test_masked_mean_of_empty_selection_is_zero_not_nan() -> None:
    x = torch.randn(2, 3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    assert ops.masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    per_row = ops.masked_mean(x, mask, dim=1)
    assert per_row[0].item() == 0.0 and per_row[1].item() == pytest.approx(x[1, 2].item())


def test_masked_entries_never_leak_even_as_nan() -> None:
    x, mask = _case()
    dirty = x.clone().requires_grad_(True)
    with torch.no_grad():
        dirty[~mask] = float("nan")
    mean = ops.masked_mean(dirty, mask)
    torch.testing.assert_close(mean, x[mask].mean())
    mean.backward()
    assert torch.isfinite(dirty.grad).all()
    assert (dirty.grad[~mask] == 0).all()
    torch.testing.assert_close(ops.masked_var(dirty.detach(), mask), x[mask].var())


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_var_matches_slicing(unbiased: bool, seed: int) -> None:
    x, mask = _case(seed)
    torch.testing.assert_close(ops.masked_var(x, mask, unbiased=unbiased), x[mask].var(unbiased=unbiased))
    per_row = ops.masked_var(x, mask, unbiased=unbiased, dim=1)
    for i in range(x.shape[0]):
        row = x[i][mask[i]]
        expected = row.var(unbiased=unbiased) if row.numel() >= 2 else torch.zeros((), dtype=x.dtype)
        torch.testing.assert_close(per_row[i], expected)


def test_masked_var_is_accurate_for_large_offsets() -> None:
    """Two-pass centring: E[x^2] - E[x]^2 would lose every digit here in float32."""
    x = torch.tensor([1e4 + 0.1, 1e4 - 0.1, 1e4 + 0.2, 1e4], dtype=torch.float32)
    mask = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(ops.masked_var(x, mask), x.double().var().float(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_with_one_or_no_element_is_zero_not_nan(unbiased: bool) -> None:
    x = torch.tensor([[3.0, -1.0, 7.0]])
    one = torch.tensor([[False, True, False]])
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert ops.masked_var(x, one, unbiased=unbiased).item() == 0.0
    assert ops.masked_var(x, none, unbiased=unbiased).item() == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_whiten_matches_slicing(seed: int) -> None:
    x, mask = _case(seed)
    out = ops.masked_whiten(x, mask)
    sel = x[mask]
    expected = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8)
    torch.testing.assert_close(out[mask], expected)
    assert (out[~mask] == 0).all()
    assert abs(out[mask].mean().item()) < 1e-9
    assert out[mask].var().item() == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_without_mean_shift_keeps_the_mean() -> None:
    x, mask = _case(3)
    out = ops.masked_whiten(x, mask, shift_mean=False)
    sel = x[mask]
    expected = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + sel.mean()
    torch.testing.assert_close(out[mask], expected)
    torch.testing.assert_close(out[mask].mean(), sel.mean())
    assert (out[~mask] == 0).all()


def test_masked_whiten_small_masks() -> None:
    x = torch.tensor([[5.0, 2.0, -4.0]])
    one = torch.tensor([[False, True, False]])
    assert torch.equal(ops.masked_whiten(x, one), torch.zeros(1, 3))
    torch.testing.assert_close(ops.masked_whiten(x, one, shift_mean=False), torch.tensor([[0.0, 2.0, 0.0]]))
    assert torch.equal(ops.masked_whiten(x, torch.zeros_like(one)), torch.zeros(1, 3))
    constant = torch.full((2, 3), 4.0)
    assert torch.equal(ops.masked_whiten(constant, torch.ones(2, 3)), torch.zeros(2, 3))


def test_mask_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        ops.masked_mean(torch.zeros(2, 3), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
def test_logprobs_from_logits_matches_categorical(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 2
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    out = ops.logprobs_from_logits(logits, tokens, temperature=temperature)
    expected = torch.distributions.Categorical(logits=logits / temperature).log_prob(tokens)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)


def test_logprobs_from_logits_chunked_gradient_and_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 20)  # 2 rows of V=10 per chunk: exercises the chunk loop
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 10, (2, 7), generator=g)
    out = ops.logprobs_from_logits(logits, tokens, temperature=0.9)
    expected = torch.log_softmax(logits / 0.9, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(grad, grad_expected)

    bf16 = logits.detach().to(torch.bfloat16)
    out_bf16 = ops.logprobs_from_logits(bf16, tokens)
    assert out_bf16.dtype == torch.float32  # computed in float32, not in bf16
    torch.testing.assert_close(
        out_bf16, torch.log_softmax(bf16.float(), -1).gather(-1, tokens[..., None])[..., 0]
    )


def test_logprobs_from_logits_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="vocab"):
        ops.logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_from_logits_matches_categorical(temperature: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "_CHUNK_ELEMENTS", 26)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 13, generator=g) * 3
    out = ops.entropy_from_logits(logits, temperature=temperature)
    expected = torch.distributions.Categorical(logits=logits / temperature).entropy()
    torch.testing.assert_close(out, expected)
    uniform = ops.entropy_from_logits(torch.zeros(1, 1, 13))
    assert uniform.item() == pytest.approx(torch.log(torch.tensor(13.0)).item(), rel=1e-6)


def test_entropy_with_banned_tokens_has_no_nan() -> None:
    logits = torch.randn(2, 3, 6, requires_grad=True)
    banned = torch.zeros(2, 3, 6, dtype=torch.bool)
    banned[..., :2] = True
    masked_logits = logits.masked_fill(banned, float("-inf"))
    out = ops.entropy_from_logits(masked_logits)
    expected = torch.distributions.Categorical(logits=logits[..., 2:]).entropy()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[banned] == 0).all()


def test_first_and_last_true_index() -> None:
    mask = torch.tensor(
        [
            [0, 0, 1, 0, 1],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    assert ops.first_true_index(mask).tolist() == [2, 0, 5, 4]
    assert ops.last_true_index(mask).tolist() == [4, 0, -1, 4]
    tokens = torch.tensor([[5, 2, 9, 2], [5, 5, 5, 5]])
    assert ops.first_true_index(tokens == 2).tolist() == [1, 4]
