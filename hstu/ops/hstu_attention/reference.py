"""Pure-PyTorch HSTU attention: the CPU implementation and the ground truth for the CUDA kernels.

Math (per sequence b of length L, head h):
    O_i = sum over the keys j that row i sees of SiLU(alpha * (q_i . k_j + rab[b, h, i, j])) / N * v_j
with N = scaling_seqlen (or max_seqlen); the visibility rules are in ``attention_mask``.
The computation runs on a padded (B, H, n, n) score tensor (n: the longest sequence, at most max_seqlen),
processed a few sequences at a time so that the memory stays bounded for long sequences.

Masks select, they never multiply: a key, value or rab entry that row i does not see (masked by causality, the
window, contexts / targets, dropout, or outside the sequence) changes neither row i's output nor any gradient row i
contributes to, even when it is NaN or infinite. Entries a row sees propagate as IEEE arithmetic says (a visible NaN
gives NaN). Scores and their gradients are selected (``_Select``: torch.where's result); the products over keys
(P V, and dS K, dS^T Q, P^T dO in the backward) go through ``_MaskedProduct``, which adds the non-finite terms back
for the selected entries only, and only when the summed tensor holds a non-finite value.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from hstu.ops._validation import values_are_concrete
from hstu.ops.hstu_attention.args import AttentionArgs
from hstu.ops.hstu_attention.rab_tables import RelativeBiasTables, TableGrads, TablePlan
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


def _values_readable(*tensors: torch.Tensor) -> bool:
    """Whether the tensors' values may be read on the host now: not while tracing with fake tensors, compiling, or
    capturing a CUDA graph (where a device-to-host copy is not allowed)."""
    capturing = any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()
    return values_are_concrete(*tensors) and not capturing


def _may_be_nonfinite(tensors: list[torch.Tensor], readable: bool) -> list[bool]:
    """For each tensor, whether it may hold a NaN or an infinity: the exact answer when values can be read, else True
    (the products then take their exact non-finite path unconditionally). A finite sum proves every element finite (a
    NaN or an infinity makes any sum non-finite); the sums are one vectorized pass each and one host copy for all,
    far cheaper than isfinite (CPU, float32: 0.02 against 1.1 ms for 2^17 elements), which only runs for a tensor
    whose sum is not finite (possibly an overflow)."""
    if not readable:
        return [True] * len(tensors)
    sums = torch.stack([t.detach().sum().to(torch.float64) for t in tensors]).tolist()
    return [not math.isfinite(total) and not bool(torch.isfinite(t).all()) for total, t in zip(sums, tensors)]


_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keep_bits(select: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The bool mask `select` as integer words of dtype's width: all bits set where True, zero where False."""
    return select.to(_BITS_DTYPES[dtype.itemsize]).neg_()


class _Select(torch.autograd.Function):
    """torch.where(select, x, 0) with the mask given as ``_keep_bits(select, x.dtype)``: a bitwise AND of x's bits,
    which gives bit for bit what torch.where gives (x where selected, +0.0 elsewhere, whatever x holds there). On CPU
    torch.where is not vectorized and the AND is (2^19 float32 elements, 1 thread: where 5.3 ms, AND 0.13 ms, the
    multiplication by a float mask this replaces 1.1 ms). The gradient is the same select of the incoming one."""

    @staticmethod
    def forward(ctx, x, bits):
        ctx.save_for_backward(bits)
        return _and_bits(x, bits)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return _select(grad, bits), None


def _and_bits(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return (x.view(bits.dtype) & bits).view(x.dtype)


def _recorded(*tensors: torch.Tensor) -> bool:
    """Whether autograd records operations on these tensors now. Where it does not (the op's own calls: its forward
    runs without grad, its backward is closed-form), the autograd Functions below run as plain functions, which
    saves their host overhead (a few tens of µs per call, most of a short sequence's time)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _select(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    return _Select.apply(x, bits) if _recorded(x) else _and_bits(x, bits)


def _nonfinite_terms(weights: torch.Tensor, values: torch.Tensor, select: torch.Tensor, weights_bad: torch.Tensor,
                     values_bad: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The sum, over the selected j, of the terms weights[b, h, i, j] * values[b, j, h, d] with a non-finite factor,
    as IEEE arithmetic gives it: NaN if any such term is NaN (a NaN factor, or 0 times an infinity) or if there are
    infinite terms of both signs, else +inf or -inf, else 0 (no such term). The products themselves are never formed:
    each class of terms is counted with a product of 0/1 matrices, in which nothing is non-finite."""
    if _values_readable(values):
        # Only the keys with a non-finite value or a non-finite selected weight take part (few in practice).
        keys = (values_bad.flatten(2).any(dim=2).any(dim=0) | weights_bad.any(dim=2).flatten(0, 1).any(dim=0))
        keys = keys.nonzero().squeeze(1)
        weights, values, select = weights[..., keys], values[:, keys], select[..., keys]
    dtype = weights.dtype
    select = select.expand(weights.shape)
    positive, negative, zero = select & (weights > 0), select & (weights < 0), select & (weights == 0)
    plus_inf, minus_inf = select & (weights == float("inf")), select & (weights == float("-inf"))
    x_pos, x_neg, x_zero = values > 0, values < 0, values == 0
    x_plus_inf, x_minus_inf = values == float("inf"), values == float("-inf")

    def count(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhij,bjhd->bihd", rows.to(dtype), cols.to(dtype))

    up = count(plus_inf, x_pos) + count(minus_inf, x_neg) + count(positive, x_plus_inf) + count(negative, x_minus_inf)
    down = count(plus_inf, x_neg) + count(minus_inf, x_pos) + count(positive, x_minus_inf) + count(negative, x_plus_inf)
    undefined = (count(select & torch.isnan(weights), torch.ones_like(x_zero)) + count(select, torch.isnan(values))
                 + count(plus_inf | minus_inf, x_zero) + count(zero, x_plus_inf | x_minus_inf))  # fmt: skip
    terms = torch.zeros_like(up).masked_fill(down > 0, float("-inf")).masked_fill(up > 0, float("inf"))
    return terms.masked_fill((undefined > 0) | ((up > 0) & (down > 0)), float("nan"))


def _masked_product(weights: torch.Tensor, values: torch.Tensor, select: torch.Tensor,
                    values_nonfinite: Optional[bool]) -> torch.Tensor:  # fmt: skip
    if values_nonfinite is None:
        (values_nonfinite,) = _may_be_nonfinite([values], _values_readable(values))
    if not values_nonfinite:
        # Unselected weights are exact zeros times finite values: exactly zero terms.
        return torch.einsum("bhij,bjhd->bihd", weights, values)
    # The terms with finite factors, then the others (zeroing only the values would turn an infinite weight times a
    # non-finite value into inf * 0 = NaN).
    weights_bad, values_bad = ~torch.isfinite(weights), ~torch.isfinite(values)
    finite = torch.einsum("bhij,bjhd->bihd", weights.masked_fill(weights_bad, 0), values.masked_fill(values_bad, 0))
    return finite + _nonfinite_terms(weights, values, select, weights_bad, values_bad)


class _MaskedProduct(torch.autograd.Function):
    """out[b, i, h] = sum_j weights[b, h, i, j] * values[b, j, h] over the entries `select` keeps.

    `weights` must be exactly zero where `select` (broadcastable to it) is False; those terms contribute exactly
    zero even where `values` is NaN or infinite (a plain product would give 0 * NaN = NaN). values_nonfinite: whether
    `values` may hold a non-finite entry (None: find out). Differentiable to any order: its backward is itself made
    of einsum and _MaskedProduct (through _product)."""

    @staticmethod
    def forward(ctx, weights, values, select, values_nonfinite):
        ctx.save_for_backward(weights, values, select)
        return _masked_product(weights, values, select, values_nonfinite)

    @staticmethod
    def backward(ctx, grad):
        weights, values, select = ctx.saved_tensors
        grad_weights = grad_values = None
        if ctx.needs_input_grad[0]:
            # Non-finite values reach the unselected entries here; the caller's select drops them.
            grad_weights = torch.einsum("bihd,bjhd->bhij", grad, values)
        if ctx.needs_input_grad[1]:
            grad_values = _product(weights.transpose(-1, -2), grad, select.transpose(-1, -2), None)
        return grad_weights, grad_values, None, None


def _product(weights: torch.Tensor, values: torch.Tensor, select: torch.Tensor,
             values_nonfinite: Optional[bool]) -> torch.Tensor:  # fmt: skip
    if _recorded(weights, values):
        return _MaskedProduct.apply(weights, values, select, values_nonfinite)
    return _masked_product(weights, values, select, values_nonfinite)


class _Scores(torch.autograd.Function):
    """scores[b, h, i, j] = q[b, i, h] . k[b, j, h]. The caller selects the scores with `select`, so the incoming
    gradient is zero where `select` is False; the gradients of q and k are _MaskedProduct sums, which keep a
    non-finite key (query) that row i (key j) does not see out of dq_i (dk_j)."""

    @staticmethod
    def forward(ctx, q, k, select):
        ctx.save_for_backward(q, k, select)
        return torch.einsum("bihd,bjhd->bhij", q, k)

    @staticmethod
    def backward(ctx, grad):
        q, k, select = ctx.saved_tensors
        grad_q = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_q = _product(grad, k, select, None)
        if ctx.needs_input_grad[1]:
            grad_k = _product(grad.transpose(-1, -2), q, select.transpose(-1, -2), None)
        return grad_q, grad_k, None


class _Padded(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    visible: torch.Tensor  # (B, n, n) bool
    keep: Optional[torch.Tensor]  # (B, H, n, n) bool dropout keep mask, or None
    slots: torch.Tensor
    n: int
    tables: Optional[TablePlan]  # the relative bias tables' padded inputs, or None

    def select(self, rows: slice) -> torch.Tensor:
        """The entries that count, for the sequences `rows`: visible and (with dropout) kept; (b, 1 or H, n, n)."""
        select = self.visible[rows].unsqueeze(1)
        return select if self.keep is None else select & self.keep[rows]


def _padded_width(lengths: torch.Tensor, max_seqlen: int, dropout_p: float, readable: bool) -> int:
    """The padded width n: the longest sequence when it can be read, else max_seqlen (a loose max_seqlen then costs
    no work). With dropout it stays max_seqlen: the keep mask is drawn for that shape."""
    if dropout_p > 0.0 or lengths.numel() == 0 or not readable:
        return max_seqlen
    return min(max_seqlen, int(lengths.max()))


def _padded_problem(args: AttentionArgs, dropout_mask: Optional[torch.Tensor], compute_dtype: torch.dtype,
                    readable: bool) -> _Padded:  # fmt: skip
    q, seq_offsets, max_seqlen, dropout_p = args.q, args.seq_offsets, args.max_seqlen, args.dropout_p
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    batch, num_heads = lengths.numel(), q.shape[1]
    n = _padded_width(lengths, max_seqlen, dropout_p, readable)
    slots = padded_slots(seq_offsets, q.shape[0], n)
    padded = [pad_to_slots(t.to(compute_dtype), slots, batch, n) for t in (q, args.k, args.v)]
    visible = attention_mask(
        lengths,
        n,
        causal=args.causal,
        window_size=args.window_size,
        num_contexts=args.num_contexts,
        num_targets=args.num_targets,
        target_group_size=args.target_group_size,
    )
    keep = None
    if dropout_p > 0.0:
        keep = dropout_mask
        if keep is None:
            keep = dropout_keep_mask((batch, num_heads, max_seqlen, max_seqlen), dropout_p, args.dropout_seed,
                                     q.device)  # fmt: skip
        keep = keep[:, :, :n, :n]
    tables = args.tables()
    plan = None if tables is None else TablePlan.build(tables, lengths, slots, n)
    return _Padded(*padded, visible, keep, slots, n, plan)


def _batch_chunks(batch: int, num_heads: int, n: int):
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads * n * n))
    for start in range(0, batch, chunk):
        yield slice(start, min(batch, start + chunk))


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and dtype in (torch.float16, torch.bfloat16) else dtype


def _chunk_bias(p: _Padded, rows: slice, rab: Optional[torch.Tensor], index=None) -> Optional[torch.Tensor]:
    """The bias of the sequences `rows`: the dense rab's block, or the tables' gather (``index``: the chunk's table
    ids when the caller has them)."""
    if rab is not None:
        return rab[rows, :, : p.n, : p.n]
    if p.tables is None:
        return None
    return p.tables.bias(index if index is not None else p.tables.index(rows, p.n, p.q.device))


def _scaled_scores(p: _Padded, rows: slice, select: torch.Tensor, bias: Optional[torch.Tensor],
                   alpha: float) -> torch.Tensor:  # fmt: skip
    """alpha * (q k^T + bias) for the sequences `rows` (bias: their block, or None), zero where `select` is False (so
    a non-finite score there reaches neither SiLU nor, through autograd, any gradient)."""
    q, k = p.q[rows], p.k[rows]
    scores = _Scores.apply(q, k, select) if _recorded(q, k) else torch.einsum("bihd,bjhd->bhij", q, k)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    return _select(alpha * scores, _keep_bits(select, scores.dtype))


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
    rab_tables: Optional[RelativeBiasTables] = None,
) -> torch.Tensor:
    """HSTU attention without argument checks (``hstu.ops.hstu_attention`` validates). Differentiable.

    upcast: compute in float32 (float64 stays float64); False computes in the inputs' dtype, which is the
        "same-dtype torch" baseline of the parity rule.
    dropout_mask: (B, H, max_seqlen, max_seqlen) bool keep-mask to apply instead of drawing one from dropout_seed
        (used to compare against a kernel's own mask).
    rab_tables: the relative bias as weight tables (``hstu.ops.hstu_attention.rab_tables``), instead of rab;
        differentiable in both tables (through the reference's own autograd).
    """
    t = rab_tables if rab_tables is not None else RelativeBiasTables()
    args = AttentionArgs(q, k, v, seq_offsets, max_seqlen, alpha, scaling_seqlen, causal, window_size, num_contexts,
                         num_targets, target_group_size, rab, dropout_p, dropout_seed, False, t.position_weights,
                         t.time_weights, t.timestamps, t.next_timestamps, t.shared_positions, t.time_reference,
                         t.time_divisor)  # fmt: skip
    return forward(args, dropout_mask=dropout_mask, upcast=upcast)


def forward(args: AttentionArgs, *, dropout_mask: Optional[torch.Tensor] = None, upcast: bool = True) -> torch.Tensor:
    """``hstu_attention_reference`` of one call's arguments (``args.deterministic`` does not apply)."""
    q, v, seq_offsets, max_seqlen, dropout_p = args.q, args.v, args.seq_offsets, args.max_seqlen, args.dropout_p
    compute_dtype = _compute_dtype(q.dtype, upcast)
    batch = seq_offsets.numel() - 1
    num_heads, dim_v = v.shape[1], v.shape[2]
    scale = 1.0 / float(args.scaling_seqlen if args.scaling_seqlen is not None else max_seqlen)
    if batch == 0 or max_seqlen == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], num_heads, dim_v) + 0 * v.sum()
    readable = _values_readable(v, seq_offsets)
    p = _padded_problem(args, dropout_mask, compute_dtype, readable)
    (v_nonfinite,) = _may_be_nonfinite([v], readable)
    outputs = []
    for rows in _batch_chunks(batch, num_heads, p.n):
        select = p.select(rows)
        bias = _chunk_bias(p, rows, args.rab)
        weights = F.silu(_scaled_scores(p, rows, select, bias, args.alpha)) * scale  # exactly 0 where not selected
        if dropout_p > 0.0:
            weights = weights / (1.0 - dropout_p)
        outputs.append(_product(weights, p.v[rows], select, v_nonfinite))
    return unpad_from_slots(torch.cat(outputs, dim=0), p.slots).to(q.dtype)


def backward(
    grad_out: torch.Tensor,
    args: AttentionArgs,
    rab_needs_grad: bool,
    *,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:  # fmt: skip
    """Closed-form gradients of ``forward``: (dq, dk, dv, drab, d position_weights, d time_weights); each bias
    gradient is None unless its tensor is given and rab_needs_grad (which covers the dense rab and the tables).

    With S = alpha (q k^T + rab), m the selected entries (visible, and kept by dropout) and c = 1 / (N (1 - p)):
    W = select(m, SiLU(S) c), dv = W^T dO, dW = dO v^T, dS = select(m, dW c SiLU'(S)), dq = alpha dS k,
    dk = alpha dS^T q, drab = alpha dS; the three products over keys / rows are _MaskedProduct sums. A table's
    gradient is alpha dS summed over the entries that read each weight (``rab_tables.TableGrads``).
    Written out (not autograd) because custom-op kernels run below the autograd dispatch key.
    """
    q, k, seq_offsets, max_seqlen, rab, alpha = args.q, args.k, args.seq_offsets, args.max_seqlen, args.rab, args.alpha
    dropout_p = args.dropout_p
    compute_dtype = _compute_dtype(q.dtype, upcast)
    batch = seq_offsets.numel() - 1
    num_heads = q.shape[1]
    scale = 1.0 / float(args.scaling_seqlen if args.scaling_seqlen is not None else max_seqlen)
    drab = torch.zeros_like(rab) if rab is not None and rab_needs_grad else None
    tables = args.tables() if rab_needs_grad else None
    table_grads = TableGrads(tables) if tables is not None else None
    if batch == 0 or max_seqlen == 0 or q.shape[0] == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(args.v), drab,
                *_table_results(table_grads))  # fmt: skip
    readable = _values_readable(q, k, grad_out, seq_offsets)
    p = _padded_problem(args, dropout_mask, compute_dtype, readable)
    n = p.n
    do_pad = pad_to_slots(grad_out.to(compute_dtype), p.slots, batch, n)
    q_nonfinite, k_nonfinite, do_nonfinite = _may_be_nonfinite([q, k, grad_out], readable)
    factor = scale / (1.0 - dropout_p) if dropout_p > 0.0 else scale
    dq_pad, dk_pad, dv_pad = torch.zeros_like(p.q), torch.zeros_like(p.k), torch.zeros_like(p.v)
    for rows in _batch_chunks(batch, num_heads, n):
        select = p.select(rows)
        s = torch.einsum("bihd,bjhd->bhij", p.q[rows], p.k[rows])
        index = p.tables.index(rows, n, q.device) if p.tables is not None else None
        bias = _chunk_bias(p, rows, rab, index)
        if bias is not None:
            s = s + bias.to(compute_dtype)
        s = alpha * s
        sig = torch.sigmoid(s)
        bits = _keep_bits(select, s.dtype)
        weights = _select(s * sig * factor, bits)
        select_t = select.transpose(-1, -2)
        dv_pad[rows] = _product(weights.transpose(-1, -2), do_pad[rows], select_t, do_nonfinite)
        dweights = torch.einsum("bihd,bjhd->bhij", do_pad[rows], p.v[rows])
        dscores = _select(dweights * factor * sig * (1.0 + s * (1.0 - sig)) * alpha, bits)
        dq_pad[rows] = _product(dscores, p.k[rows], select, k_nonfinite)
        dk_pad[rows] = _product(dscores.transpose(-1, -2), p.q[rows], select_t, q_nonfinite)
        if drab is not None:
            per_head = dscores if rab.shape[1] == num_heads else dscores.sum(dim=1, keepdim=True)
            drab[rows, :, :n, :n] = per_head.to(drab.dtype)
        if table_grads is not None:
            table_grads.add(index, dscores)
    grads = [unpad_from_slots(g, p.slots).to(t.dtype) for g, t in ((dq_pad, q), (dk_pad, k), (dv_pad, args.v))]
    return (grads[0], grads[1], grads[2], drab, *_table_results(table_grads))


def _table_results(table_grads: Optional[TableGrads]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    return table_grads.result() if table_grads is not None else (None, None)
