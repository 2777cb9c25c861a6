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


def _fused_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the chunk matmul: the autocast dtype where autocast is on, else the inputs' promoted dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


# Clamp for log-probabilities of -inf logits (banned tokens): exp(-1e4) is exactly 0 in float32 and float64, so
# a clamped entry still has p = 0 and adds exactly 0 to p * log p, but no longer makes 0 * -inf = NaN.
_LOGP_FLOOR = -1e4


def _fused_chunk_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    math_dtype: torch.dtype,
) -> torch.Tensor:
    """Scaled logits (x @ W^T + b) / T of one chunk of rows, in ``math_dtype`` (a fresh tensor, safe to modify).

    x: (n, H) and weight: (V, H), both already in the matmul dtype; bias: (V,) or None -> (n, V).
    """
    inv_t = 1.0 / temperature
    if x.dtype == math_dtype:  # one fused op: bias, matmul and 1 / T
        if bias is None:
            z = x @ weight.T
            return z.mul_(inv_t) if temperature != 1.0 else z
        return torch.addmm(bias.to(math_dtype), x, weight.T, beta=inv_t, alpha=inv_t)
    z = (x @ weight.T).to(math_dtype)  # (n, V): low-precision matmul, float32 softmax math
    if bias is not None:
        z.add_(bias.to(math_dtype))
    return z.mul_(inv_t) if temperature != 1.0 else z


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) for (n, V) tensors without the (n, V) product: a batch of (1, V) @ (V, 1) -> (n,)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


class _FusedLogprobsEntropy(torch.autograd.Function):
    """Log-probabilities and entropy of softmax((hidden @ W^T + b) / T), chunked over rows for backward too.

    Forward keeps hidden (N, H), weight (V, H), bias (V,), targets (N,), the per-row logsumexp (N,) and the
    entropy (N,); backward recomputes each chunk's logits. No (N, V) tensor is ever saved or allocated: at most
    two (chunk_rows, V) float32 buffers (plus the low-precision matmul output under autocast) live at once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows):
        # hidden: (N, H), weight: (V, H), bias: (V,) or None, targets: (N,) long
        compute_dtype = _fused_compute_dtype(hidden, weight)
        math_dtype = torch.promote_types(compute_dtype, torch.float32)
        n_rows = hidden.shape[0]
        logprobs = torch.empty(n_rows, dtype=math_dtype, device=hidden.device)  # (N,)
        entropy = torch.empty(n_rows, dtype=math_dtype, device=hidden.device)  # (N,)
        lse = torch.empty(n_rows, dtype=math_dtype, device=hidden.device)  # (N,)
        with torch.autocast(hidden.device.type, enabled=False):
            x_all = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logp = _fused_chunk_logits(x_all[rows], w, bias, temperature, math_dtype)  # (n, V)
                row_max = logp.amax(-1, keepdim=True)  # (n, 1)
                logp.sub_(row_max)
                p = logp.exp()  # (n, V), unnormalised
                log_sum = p.sum(-1, keepdim=True).log_()  # (n, 1)
                p.div_(log_sum.exp())
                logp.sub_(log_sum)  # now log softmax
                logprobs[rows] = logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
                entropy[rows] = -_rowwise_dot(p, logp.clamp_(min=_LOGP_FLOOR))
                lse[rows] = (row_max + log_sum).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        ctx.set_materialize_grads(False)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        # grad_logprobs, grad_entropy: (N,) or None (an output that did not reach the loss)
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_rows, compute_dtype = ctx.temperature, ctx.chunk_rows, ctx.compute_dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None
        math_dtype = lse.dtype
        n_rows = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.promote_types(bias.dtype, torch.float32), device=bias.device)
            if need_bias
            else None
        )
        # With z = logits / T, p = softmax(z): d logp[y] / dz = onehot(y) - p and d H / dz = -p * (log p + H).
        # So d/d(logits) = (g_lp * onehot + p * (c - g_ent * log p)) / T with c = -g_lp - g_ent * H, per row.
        with torch.autocast(hidden.device.type, enabled=False):
            x_all = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            for start in range(0, n_rows, chunk_rows):
                rows = slice(start, start + chunk_rows)
                x = x_all[rows]  # (n, H)
                logp = _fused_chunk_logits(x, w, bias, temperature, math_dtype)  # (n, V)
                logp.sub_(lse[rows].unsqueeze(-1))  # log softmax
                p = logp.exp()  # (n, V)
                g_lp = None if grad_logprobs is None else grad_logprobs[rows].to(math_dtype).unsqueeze(-1)
                if grad_entropy is not None:
                    g_ent = grad_entropy[rows].to(math_dtype).unsqueeze(-1) / temperature  # (n, 1)
                    c = -g_ent * entropy[rows].unsqueeze(-1)  # (n, 1)
                    if g_lp is not None:
                        c = c - g_lp / temperature
                    grad_z = logp.clamp_(min=_LOGP_FLOOR).mul_(-g_ent).add_(c).mul_(p)  # p = 0 where clamped
                else:
                    grad_z = p.mul_(-g_lp / temperature)
                if g_lp is not None:
                    grad_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g_lp / temperature)
                # grad_z is now d loss / d logits, (n, V)
                if need_bias:
                    grad_bias += grad_z.sum(0)
                g = grad_z.to(compute_dtype)
                if need_hidden:
                    grad_hidden[rows] = (g @ w).to(hidden.dtype)  # (n, H)
                if need_weight:
                    if g.dtype == acc_dtype:
                        grad_weight.addmm_(g.T, x)  # (V, H)
                    else:
                        grad_weight += (g.T @ x).to(acc_dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def fused_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target and entropy under softmax((hidden @ W^T + b) / temperature), LM head fused.

    hidden: (B, T, H) (any leading shape ``S + (H,)``, any float dtype): the hidden states that predict each
    target; weight: (V, H), the LM head / output embedding (may be tied, frozen or trainable); bias: (V,) or
    None; targets: (B, T) (shape ``S``, long). Returns (logprobs, entropy), each (B, T) (shape ``S``),
    float32 (float64 if the matmul runs in float64). The caller aligns them: hidden[:, t] must be the state
    whose logits produced targets[:, t] (for a causal LM, the state at position t - 1).

    Memory: logits exist only one chunk of ``chunk_rows`` rows at a time (default ``_CHUNK_ELEMENTS // V``),
    in forward and in backward, which recomputes them; what is kept for backward is O(N * H + V * H), never
    O(N * V). Gradients flow to hidden, weight (accumulated over chunks in float32) and bias, from either or
    both outputs; inputs without ``requires_grad`` get none (e.g. a frozen head). Under ``torch.autocast``
    the chunk matmul runs in the autocast dtype and the softmax math in float32. Entries whose logit is -inf
    (e.g. a bias banning a token) contribute 0, not NaN, to the entropy and every gradient.
    """
    _check_temperature(temperature)
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must end in the hidden size of weight {tuple(weight.shape)} (V, H)"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} plus a hidden dim"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be ({weight.shape[0]},), one entry per vocab row")
    if chunk_rows is None:
        chunk_rows = _rows_per_chunk(weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    flat_targets = targets.reshape(-1).long()  # (N,)
    logprobs, entropy = _FusedLogprobsEntropy.apply(
        flat_hidden, weight, bias, flat_targets, float(temperature), int(chunk_rows)
    )
    return logprobs.reshape(targets.shape), entropy.reshape(targets.shape)


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
