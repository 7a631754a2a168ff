"""Pure-PyTorch cached HSTU attention: new query rows ("delta" rows) against cached keys/values plus their own.

Sequence b is the concatenation ``cache_b ++ delta_b`` of c_b cached rows and n_b new rows (L_b = c_b + n_b); delta
row i of b is row c_b + i of that sequence. Every delta row gets what ``hstu_attention`` (causal) gives that row of
the whole sequence:

    O_i = sum over the keys j that row (c_b + i) sees of SiLU(alpha * (q_i . k_j + rab[b, h, i, j])) / N * v_j

with the visibility rules of the attention contract, written here for absolute rows r = c_b + i and keys j < L_b
(C = num_contexts[b], E = L_b - num_targets[b] the end of the history, g = target_group_size, w = window_size):

* context rows (r < C) see every history key (j < E);
* history rows (C <= r < E) see j <= r within the window, and every context key;
* target rows (r >= E) see the history (within the window measured from E, and every context key) and the targets
  of their own group: E + g * floor((r - E) / g) <= j <= r. With g = 1 that is M-FALCON: candidates see the history
  and themselves, not each other.

Cached rows are final (their outputs do not change when rows are appended), so targets must be delta rows
(num_targets[b] <= n_b). ``rab`` rows are (B, 1 or H, >= max n_b, >= max L_b): row i is delta row i, column j is key
j of the whole sequence. Accumulation is float32 (float64 stays float64); the output has q's dtype.

Masks select (torch.where), they never multiply: a key, value or rab entry that a row does not see changes nothing
in that row's output, even when it is NaN or infinite.

Paged caches (``page_table`` given): ``cached_k`` / ``cached_v`` are pools of pages of ``page_size`` rows, and cached
row r of sequence b is pool row ``page_table[b, r // page_size] * page_size + r % page_size``; ``cache_offsets``
still give the cached lengths. :func:`gather_pages` turns that into the jagged layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Score elements materialised at once (users_chunk * H * n_q * n_k).
_MAX_SCORE_ELEMENTS = 1 << 26


def cached_attention_mask(
    cache_lengths: torch.Tensor,
    delta_lengths: torch.Tensor,
    n_q: int,
    n_k: int,
    *,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
) -> torch.Tensor:
    """Bool (B, n_q, n_k): entry [b, i, j] says whether delta row i of sequence b sees key j of ``cache_b ++
    delta_b`` (the rules of the module docstring)."""
    batch = cache_lengths.numel()
    device = cache_lengths.device

    def column(t: Optional[torch.Tensor]) -> torch.Tensor:
        if t is None:
            return torch.zeros(batch, 1, 1, dtype=torch.int64, device=device)
        return t.to(device=device, dtype=torch.int64).view(batch, 1, 1)

    cached, fresh = column(cache_lengths), column(delta_lengths)
    local = torch.arange(n_q, device=device).view(1, -1, 1)
    row = cached + local  # the row's index in the whole sequence
    key = torch.arange(n_k, device=device).view(1, 1, -1)
    length = cached + fresh
    contexts = column(num_contexts)
    history_end = length - column(num_targets)

    def within_window(distance: torch.Tensor) -> torch.Tensor:
        if window_size < 0:
            return torch.ones_like(distance, dtype=torch.bool)
        return distance <= window_size

    context_key = key < contexts
    is_context_row = row < contexts
    is_target_row = row >= history_end
    context_rows = is_context_row & (key < history_end)
    history_rows = ~is_context_row & ~is_target_row & (key <= row) & (within_window(row - key) | context_key)
    group_start = history_end + torch.div(row - history_end, target_group_size, rounding_mode="floor") * target_group_size
    target_rows = is_target_row & (
        ((key < history_end) & (within_window(history_end - key) | context_key)) | ((key >= group_start) & (key <= row))
    )
    inside = (local < fresh) & (key < length)
    return inside & (context_rows | history_rows | target_rows)


def page_rows(page_table: torch.Tensor, cache_offsets: torch.Tensor, page_size: int) -> torch.Tensor:
    """(T_cache,) int64 pool rows of the cached rows of every sequence, in the jagged order of ``cache_offsets``
    (row r of sequence b: ``page_table[b, r // page_size] * page_size + r % page_size``)."""
    offsets = cache_offsets.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    total = int(offsets[-1]) if offsets.numel() else 0
    device = page_table.device
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.to(device),
                                  output_size=total)
    row = torch.arange(total, device=device) - offsets[:-1].to(device)[seq]
    pages = page_table.to(torch.int64)[seq, torch.div(row, page_size, rounding_mode="floor")]
    return pages * page_size + row % page_size


def gather_pages(pool: torch.Tensor, page_table: torch.Tensor, cache_offsets: torch.Tensor,
                 page_size: int) -> torch.Tensor:
    """The cached rows of a paged pool (P_rows, H, D) as one jagged tensor (T_cache, H, D) by ``cache_offsets``."""
    return pool[page_rows(page_table, cache_offsets, page_size)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weighted_values(weights: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """sum_j weights[b, h, i, j] * values[b, j, h, :] over the visible (b, i, j) only.

    weights is exactly zero where not visible; with finite values that makes those terms exact zeros and one einsum
    is the answer. A non-finite value would turn 0 * value into NaN, so then every term is selected on its own."""
    if bool(torch.isfinite(values).all()):
        return torch.einsum("bhij,bjhd->bihd", weights, values)
    terms = weights.permute(0, 2, 3, 1).unsqueeze(-1) * values.unsqueeze(1)  # (b, i, j, h, d)
    terms = torch.where(visible.view(*visible.shape, 1, 1), terms, torch.zeros_like(terms))
    return terms.sum(dim=2)


def cached_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    delta_offsets: torch.Tensor,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    cache_offsets: torch.Tensor,
    *,
    alpha: float,
    scaling_seqlen: int,
    window_size: int = -1,
    num_contexts: Optional[torch.Tensor] = None,
    num_targets: Optional[torch.Tensor] = None,
    target_group_size: int = 1,
    rab: Optional[torch.Tensor] = None,
    page_table: Optional[torch.Tensor] = None,
    page_size: int = 0,
) -> torch.Tensor:
    """The cached attention of the module docstring without argument checks (``cached_hstu_attention`` checks).

    q, k: (T_new, H, Dqk), v: (T_new, H, Dv) jagged by ``delta_offsets`` (B+1); cached_k (T_cache, H, Dqk) and
    cached_v (T_cache, H, Dv) jagged by ``cache_offsets`` (B+1), or, with ``page_table`` (B, max_pages), pools of
    pages of ``page_size`` rows. Returns (T_new, H, Dv) in q's dtype.
    """
    if page_table is not None:
        rows = page_rows(page_table, cache_offsets, page_size)
        cached_k, cached_v = cached_k[rows], cached_v[rows]
    dtype = _compute_dtype(q.dtype)
    num_heads, dim_v = v.shape[1], v.shape[2]
    delta_lengths = (delta_offsets[1:] - delta_offsets[:-1]).to(torch.int64)
    cache_lengths = (cache_offsets[1:] - cache_offsets[:-1]).to(torch.int64)
    batch = delta_lengths.numel()
    host_delta, host_cache = torch.stack([delta_lengths, cache_lengths]).cpu()
    if batch == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], num_heads, dim_v)
    n_q = int(host_delta.max())
    n_k = int((host_delta + host_cache).max())
    device = q.device
    # Padded slot of every delta row (b * n_q + i) and of every key (b * n_k + j) of the whole sequences.
    delta_seq = torch.repeat_interleave(torch.arange(batch, device=device), delta_lengths, output_size=q.shape[0])
    delta_pos = torch.arange(q.shape[0], device=device) - delta_offsets[:-1].to(torch.int64)[delta_seq]
    cache_seq = torch.repeat_interleave(torch.arange(batch, device=device), cache_lengths,
                                        output_size=cached_k.shape[0])
    cache_pos = torch.arange(cached_k.shape[0], device=device) - cache_offsets[:-1].to(torch.int64)[cache_seq]
    query_slots = delta_seq * n_q + delta_pos
    key_slots_new = delta_seq * n_k + cache_lengths[delta_seq] + delta_pos
    key_slots_cached = cache_seq * n_k + cache_pos

    def padded(rows: int, width: int, slots_and_values) -> torch.Tensor:
        out = torch.zeros(batch * rows, num_heads, width, dtype=dtype, device=device)
        for slots, values in slots_and_values:
            out[slots] = values.to(dtype)
        return out.view(batch, rows, num_heads, width)

    q_pad = padded(n_q, q.shape[2], [(query_slots, q)])
    k_pad = padded(n_k, k.shape[2], [(key_slots_cached, cached_k), (key_slots_new, k)])
    v_pad = padded(n_k, dim_v, [(key_slots_cached, cached_v), (key_slots_new, v)])
    visible = cached_attention_mask(cache_lengths, delta_lengths, n_q, n_k, window_size=window_size,
                                    num_contexts=num_contexts, num_targets=num_targets,
                                    target_group_size=target_group_size)  # fmt: skip
    scale = 1.0 / float(scaling_seqlen)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_heads * n_q * n_k))
    outputs = []
    for start in range(0, batch, chunk):
        rows = slice(start, min(batch, start + chunk))
        seen = visible[rows].unsqueeze(1)  # (b, 1, n_q, n_k)
        scores = torch.einsum("bihd,bjhd->bhij", q_pad[rows], k_pad[rows])
        if rab is not None:
            scores = scores + rab[rows, :, :n_q, :n_k].to(dtype)
        scores = torch.where(seen, alpha * scores, torch.zeros_like(scores))
        weights = F.silu(scores) * scale  # exactly zero where not seen
        outputs.append(_weighted_values(weights, v_pad[rows], seen.squeeze(1)))
    out = torch.cat(outputs, dim=0).reshape(batch * n_q, num_heads, dim_v)
    return out[query_slots].to(q.dtype)
