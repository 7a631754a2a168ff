"""Pure-PyTorch HSTU attention: the CPU implementation and the ground truth for the CUDA kernels.

Math (per sequence b of length L, head h):
    O_i = sum_j visible(i, j) * SiLU(alpha * (q_i . k_j + rab[b, h, i, j])) / N * v_j
with N = scaling_seqlen (or max_seqlen); the visibility rules are in ``attention_mask``.
The computation runs on a padded (B, H, N, N) score tensor, processed a few sequences at a time so that the
memory stays bounded for long sequences.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hstu.ops.jagged.reference import pad_to_slots, padded_slots, unpad_from_slots

# Score elements materialised at once (B_chunk * H * N * N); keeps the reference usable at L = 8192.
_MAX_SCORE_ELEMENTS = 1 << 27


def attention_mask(
    lengths: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
) -> torch.Tensor:
    """Boolean (B, max_seqlen, max_seqlen) matrix: entry [b, i, j] says whether row i of sequence b sees key j."""
    device = lengths.device
    batch = lengths.numel()
    i = torch.arange(max_seqlen, device=device).view(1, -1, 1)
    j = torch.arange(max_seqlen, device=device).view(1, 1, -1)
    seq_len = lengths.view(batch, 1, 1).to(torch.int64)
    # Terms of the rules below that are constant for absent features are left out: every op is a kernel launch.
    if not causal:
        inside = (i < seq_len) & (j < seq_len)
        return inside & ((i - j).abs() <= window_size) if window_size >= 0 else inside
    if num_contexts is None and num_targets is None:
        # Plain causal attention: j <= i < L already implies j < L.
        visible = (j <= i) & (i < seq_len)
        return visible & (i - j <= window_size) if window_size >= 0 else visible
    inside = (i < seq_len) & (j < seq_len)

    def zeros_or(t: Optional[torch.Tensor]) -> torch.Tensor:
        if t is None:
            return torch.zeros(batch, 1, 1, dtype=torch.int64, device=device)
        return t.view(batch, 1, 1).to(device=device, dtype=torch.int64)

    contexts = zeros_or(num_contexts)
    history_end = seq_len - zeros_or(num_targets)

    def within_window(distance: torch.Tensor) -> torch.Tensor:
        return distance <= window_size if window_size >= 0 else torch.ones_like(distance, dtype=torch.bool)

    is_context_key = j < contexts
    context_rows = (i < contexts) & (j < history_end)
    history_rows = (i >= contexts) & (i < history_end) & (j <= i) & (within_window(i - j) | is_context_key)
    group_start = history_end + torch.div(i - history_end, target_group_size, rounding_mode="floor") * target_group_size
    target_rows = (i >= history_end) & (
        ((j < history_end) & (within_window(history_end - j) | is_context_key)) | ((j >= group_start) & (j <= i))
    )
    return inside & (context_rows | history_rows | target_rows)


def dropout_keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """The reference's dropout pattern: a pure function of (shape, p, seed), so backward can rebuild it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def _padded_problem(q, k, v, seq_offsets, max_seqlen, causal, window_size, num_contexts, num_targets,
                    target_group_size, dropout_p, dropout_seed, dropout_mask, compute_dtype):  # fmt: skip
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    slots = padded_slots(seq_offsets, q.shape[0], max_seqlen)
    padded = [pad_to_slots(t.to(compute_dtype), slots, lengths.numel(), max_seqlen) for t in (q, k, v)]
    visible = attention_mask(
        lengths,
        max_seqlen,
        causal=causal,
        window_size=window_size,
        num_contexts=num_contexts,
        num_targets=num_targets,
        target_group_size=target_group_size,
    )
    batch, num_heads = seq_offsets.numel() - 1, q.shape[1]
    if dropout_p > 0.0 and dropout_mask is None:
        dropout_mask = dropout_keep_mask((batch, num_heads, max_seqlen, max_seqlen), dropout_p, dropout_seed, q.device)
    return padded, visible, dropout_mask, slots


def _batch_chunks(batch: int, num_heads: int, n: int):
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads * n * n))
    for start in range(0, batch, chunk):
        yield slice(start, min(batch, start + chunk))


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    *,
    alpha: float = 1.0,
    scaling_seqlen: Optional[int] = None,
    causal: bool = True,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
    rab: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """HSTU attention without argument checks (``hstu.ops.hstu_attention`` validates). Differentiable.

    upcast: compute in float32 (float64 stays float64); False computes in the inputs' dtype, which is the
        "same-dtype torch" baseline of the parity rule.
    dropout_mask: (B, H, max_seqlen, max_seqlen) bool keep-mask to apply instead of drawing one from dropout_seed
        (used to compare against a kernel's own mask).
    """
    compute_dtype = _compute_dtype(q.dtype, upcast)
    batch, n = seq_offsets.numel() - 1, max_seqlen
    num_heads, dim_v = v.shape[1], v.shape[2]
    scale = 1.0 / float(scaling_seqlen if scaling_seqlen is not None else max_seqlen)
    if batch == 0 or n == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], num_heads, dim_v) + 0 * v.sum()
    (q_pad, k_pad, v_pad), visible, dropout_mask, slots = _padded_problem(
        q, k, v, seq_offsets, n, causal, window_size, num_contexts, num_targets, target_group_size, dropout_p,
        dropout_seed, dropout_mask, compute_dtype,
    )  # fmt: skip
    outputs = []
    for rows in _batch_chunks(batch, num_heads, n):
        scores = torch.einsum("bihd,bjhd->bhij", q_pad[rows], k_pad[rows])
        if rab is not None:
            scores = scores + rab[rows, :, :n, :n].to(compute_dtype)
        weights = F.silu(alpha * scores) * scale
        weights = weights * visible[rows].unsqueeze(1).to(weights.dtype)
        if dropout_p > 0.0:
            weights = weights * dropout_mask[rows].to(weights.dtype) / (1.0 - dropout_p)
        outputs.append(torch.einsum("bhij,bjhd->bihd", weights, v_pad[rows]))
    return unpad_from_slots(torch.cat(outputs, dim=0), slots).to(q.dtype)


def hstu_attention_reference_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    *,
    alpha: float = 1.0,
    scaling_seqlen: Optional[int] = None,
    causal: bool = True,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
    rab: Optional[torch.Tensor] = None,
    rab_needs_grad: bool = False,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Closed-form gradients of ``hstu_attention_reference``: (dq, dk, dv, drab or None).

    With S = alpha (q k^T + rab) and W = m * SiLU(S) / N (m: visibility times dropout keep / (1-p)):
    dv = W^T dO, dW = dO v^T, dS = dW * m / N * SiLU'(S), dq = alpha dS k, dk = alpha dS^T q, drab = alpha dS.
    Written out (not autograd) because custom-op kernels run below the autograd dispatch key.
    """
    compute_dtype = _compute_dtype(q.dtype, upcast)
    batch, n = seq_offsets.numel() - 1, max_seqlen
    num_heads = q.shape[1]
    scale = 1.0 / float(scaling_seqlen if scaling_seqlen is not None else max_seqlen)
    drab = torch.zeros_like(rab) if rab is not None and rab_needs_grad else None
    if batch == 0 or n == 0 or q.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), drab
    (q_pad, k_pad, v_pad), visible, dropout_mask, slots = _padded_problem(
        q, k, v, seq_offsets, n, causal, window_size, num_contexts, num_targets, target_group_size, dropout_p,
        dropout_seed, dropout_mask, compute_dtype,
    )  # fmt: skip
    do_pad = pad_to_slots(grad_out.to(compute_dtype), slots, batch, n)
    dq_pad, dk_pad, dv_pad = torch.zeros_like(q_pad), torch.zeros_like(k_pad), torch.zeros_like(v_pad)
    for rows in _batch_chunks(batch, num_heads, n):
        scores = torch.einsum("bihd,bjhd->bhij", q_pad[rows], k_pad[rows])
        if rab is not None:
            scores = scores + rab[rows, :, :n, :n].to(compute_dtype)
        s = alpha * scores
        sig = torch.sigmoid(s)
        keep = visible[rows].unsqueeze(1).to(s.dtype) * scale
        if dropout_p > 0.0:
            keep = keep * dropout_mask[rows].to(s.dtype) / (1.0 - dropout_p)
        weights = s * sig * keep
        dv_pad[rows] = torch.einsum("bhij,bihd->bjhd", weights, do_pad[rows])
        dweights = torch.einsum("bihd,bjhd->bhij", do_pad[rows], v_pad[rows])
        dscores = dweights * keep * sig * (1.0 + s * (1.0 - sig)) * alpha
        dq_pad[rows] = torch.einsum("bhij,bjhd->bihd", dscores, k_pad[rows])
        dk_pad[rows] = torch.einsum("bhij,bihd->bjhd", dscores, q_pad[rows])
        if drab is not None:
            per_head = dscores if rab.shape[1] == num_heads else dscores.sum(dim=1, keepdim=True)
            drab[rows, :, :n, :n] = per_head.to(drab.dtype)
    grads = [unpad_from_slots(g, slots).to(t.dtype) for g, t in ((dq_pad, q), (dk_pad, k), (dv_pad, v))]
    return grads[0], grads[1], grads[2], drab
