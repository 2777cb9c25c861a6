"""Masked reductions and per-token quantities from logits: pure tensor functions.

Mask convention (every function here and in advantages.py / losses.py): a mask has the same shape as the
tensor it selects from; it may be bool or 0/1 numbers, and any nonzero entry counts as selected (a mask is a
selection, never a weight). Masked-out entries never reach the result, not even as NaN or inf: reductions use
``torch.where`` rather than ``x * mask``, so garbage on padding (e.g. NaN log-probabilities) cannot leak into
sums or gradients.

Empty selections: a sum over nothing is 0, a mean over nothing is 0, a variance over fewer than two elements
falls back to the biased estimate (0 for one element, 0 for none). Nothing here returns NaN for a small mask.
"""

from __future__ import annotations

import torch

# Rows of (rows, V) logits processed at once by logprobs_from_logits / entropy_from_logits: bounds the
# float32 temporaries to about this many elements (64 MiB) whatever the batch, sequence and vocabulary size.
_CHUNK_ELEMENTS = 1 << 24


def _as_bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mask as bool, checked to have the shape of ``like`` (broadcasting would silently change the meaning)."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal tensor shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the selected entries; over all dims (a 0-dim tensor) or along ``dim``.

    x, mask: same shape, e.g. (B, T). Returns () or x's shape without ``dim``.
    """
    m = _as_bool(mask, x)
    selected = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Number of selected entries (long), over all dims or along ``dim``."""
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the selected entries; 0 where nothing is selected (not NaN).

    x, mask: same shape, e.g. (B, T). Returns () or x's shape without ``dim``.
    """
    total = masked_sum(x, mask, dim)
    count = masked_count(mask, dim).clamp(min=1).to(total.dtype)
    return total / count


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, dim: int | None = None
) -> torch.Tensor:
    """Variance of ``x`` over the selected entries, centred on their masked mean (two-pass, no E[x^2]-E[x]^2).

    x, mask: same shape, e.g. (B, T). Returns () or x's shape without ``dim``.
    ``unbiased`` applies Bessel's correction n / (n - 1) where n >= 2; with one selected element the result is
    the biased variance 0 (not NaN), with none it is 0.
    """
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    var = masked_mean(centred.square(), mask, dim)
    if unbiased:
        n = masked_count(mask, dim).to(var.dtype)
        var = torch.where(n >= 2, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise the selected entries to unit variance: (x - mean) / sqrt(var + eps); 0 outside the mask.

    x, mask: same shape, e.g. (B, T) -> (B, T). Statistics are over all selected entries of the whole tensor
    (unbiased variance, see ``masked_var``). ``shift_mean=False`` keeps the original mean (the deviations are
    scaled, then the mean is added back), as TRL does when whitening rewards, whose sign carries meaning.
    One selected element whitens to 0 (shift_mean) or to itself (not shift_mean); no NaN for small masks.
    """
    m = _as_bool(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _log_softmax_chunks(flat_logits: torch.Tensor, temperature: float, dtype: torch.dtype):
    """Yield (row slice, log_softmax of those rows / temperature) over (N, V) logits, a bounded chunk at a time."""
    step = _rows_per_chunk(flat_logits.shape[-1])
    for start in range(0, flat_logits.shape[0], step):
        rows = slice(start, start + step)
        chunk = flat_logits[rows].to(dtype)
        if temperature != 1.0:
            chunk = chunk / temperature
        yield rows, torch.log_softmax(chunk, dim=-1)  # (n, V)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each token under softmax(logits / temperature).

    logits: (B, T, V) (any leading shape ``S + (V,)``), tokens: (B, T) (shape ``S``, integer ids) -> (B, T).
    The caller aligns them: logits[:, t] must be the distribution that produced tokens[:, t] (for a causal LM,
    the logits at position t - 1). ``temperature`` must be the one used when sampling, or the PPO ratio is off.

    Memory: log_softmax + gather over chunks of rows, so the (B, T, V) float32 temporaries of a full
    log_softmax never exist at once. Computed in float32 (float64 if the logits are) even for bf16 logits:
    the result is float32/float64 and differentiable with respect to ``logits``.
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocab dim"
        )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    flat_tokens = tokens.reshape(-1, 1).long()  # (N, 1)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = [
        logp.gather(-1, flat_tokens[rows]).squeeze(-1)  # (n,)
        for rows, logp in _log_softmax_chunks(flat_logits, temperature, out_dtype)
    ]
    if not parts:
        return torch.zeros(tokens.shape, dtype=out_dtype, device=logits.device)
    return torch.cat(parts).reshape(tokens.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of softmax(logits / temperature) at each position.

    logits: (B, T, V) (any leading shape ``S + (V,)``) -> (B, T) (shape ``S``), float32 or float64.
    Chunked like ``logprobs_from_logits``. Vocabulary entries with logit -inf (banned tokens) contribute 0,
    not NaN, to the value and the gradient.
    """
    _check_temperature(temperature)
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    parts = []
    for _, logp in _log_softmax_chunks(flat_logits, temperature, out_dtype):
        p = logp.exp()
        logp = logp.masked_fill(torch.isneginf(logp), 0.0)  # 0 * -inf would be NaN
        parts.append(-(p * logp).sum(-1))  # (n,)
    if not parts:
        return torch.zeros(logits.shape[:-1], dtype=out_dtype, device=logits.device)
    return torch.cat(parts).reshape(logits.shape[:-1])


def first_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first nonzero entry in each row; T where a row has none (e.g. no EOS was generated).

    mask: (B, T) -> (B,) long. Typical use: ``first_true_index(responses == eos_id)``.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    T = m.shape[-1]
    positions = torch.arange(T, device=m.device).expand_as(m)  # (B, T)
    if T == 0:
        return torch.zeros(m.shape[:-1], dtype=torch.long, device=m.device)
    return torch.where(m, positions, torch.full_like(positions, T)).amin(dim=-1)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry in each row; -1 where a row has none.

    mask: (B, T) -> (B,) long. Typical use: the last action token of each sequence, where a sparse
    sequence-level score is placed (``rewards[arange(B), idx] += score`` for rows with idx >= 0).
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    T = m.shape[-1]
    positions = torch.arange(T, device=m.device).expand_as(m)  # (B, T)
    if T == 0:
        return torch.full(m.shape[:-1], -1, dtype=torch.long, device=m.device)
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(dim=-1)
