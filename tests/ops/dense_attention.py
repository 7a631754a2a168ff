"""An independent, deliberately naive HSTU attention: explicit per-element mask, one sequence at a time.

It follows the contract's wording literally (row kinds, window, groups) so that it shares no code or vectorised
trick with ``hstu.ops.hstu_attention.reference``. Every term w_ij * v_j is formed on its own and the terms a row does
not see (or dropout drops) are selected away before the sum, so a NaN or infinity there cannot reach the row, while
the terms it sees follow IEEE arithmetic (this is also the oracle for non-finite inputs).
"""

from __future__ import annotations

import torch


def visible(i: int, j: int, L: int, c: int, t: int, g: int, w: int, causal: bool) -> bool:
    if not (i < L and j < L):
        return False
    if not causal:
        return w < 0 or abs(i - j) <= w
    h = L - t
    if i < c:
        return j < h
    if i < h:
        return j <= i and (w < 0 or i - j <= w or j < c)
    group_start = h + ((i - h) // g) * g
    return (j < h and (w < 0 or h - j <= w or j < c)) or (group_start <= j <= i)


def mask_matrix(L: int, c: int, t: int, g: int, w: int, causal: bool) -> torch.Tensor:
    m = torch.zeros(L, L, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            if visible(i, j, L, c, t, g, w, causal):
                m[i, j] = 1.0
    return m


def dense_hstu_attention(q, k, v, offsets, max_seqlen, *, alpha=1.0, scaling_seqlen=None, causal=True,
                         window_size=-1, num_contexts=None, num_targets=None, target_group_size=1, rab=None,
                         keep_mask=None, dropout_p=0.0):  # fmt: skip
    n = float(scaling_seqlen or max_seqlen)
    outs = []
    for b in range(offsets.numel() - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        L = e - s
        c = int(num_contexts[b]) if num_contexts is not None else 0
        t = int(num_targets[b]) if num_targets is not None else 0
        m = mask_matrix(L, c, t, target_group_size, window_size, causal)
        per_head = []
        for h in range(q.shape[1]):
            scores = q[s:e, h].double() @ k[s:e, h].double().T
            if rab is not None:
                scores = scores + rab[b, h if rab.shape[1] > 1 else 0, :L, :L].double()
            counted = m.bool()
            w = torch.nn.functional.silu(alpha * scores) / n
            if keep_mask is not None:
                counted = counted & keep_mask[b, h, :L, :L]
                w = w / (1.0 - dropout_p)
            terms = w.unsqueeze(-1) * v[s:e, h].double().unsqueeze(0)  # (row i, key j, feature)
            per_head.append(torch.where(counted.unsqueeze(-1), terms, 0.0).sum(dim=1))
        outs.append(torch.stack(per_head, dim=1) if per_head else v.new_zeros(L, 0, v.shape[2]).double())
    return torch.cat(outs, dim=0) if outs else v.new_zeros(0, v.shape[1], v.shape[2]).double()
