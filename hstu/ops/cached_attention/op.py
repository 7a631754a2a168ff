"""``cached_hstu_attention``: argument checks and the dispatcher of the cached (incremental) HSTU attention.

Implementations: the CUDA kernel (``cuda.py``: the sm80-style fused forward in its cached mode, on every
architecture, with a contiguous or a paged cache) for the calls it supports (CUDA tensors of bfloat16 / float16,
Dqk == Dv at a built head dim, no rab or a dense rab), and the PyTorch reference (``reference.py``) for everything else, on every device. ``_kernel_for``
is the one place that choice is made; it picks the kernel only when ``USE_CUDA_KERNELS`` is on, which it is not
until tests/ops/test_cached_attention_cuda.py has passed on a GPU. Inference only: the op has no backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from hstu.ops._validation import (
    check_attention_extras,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_offsets,
    check_same_device,
    check_tensor,
    to_host,
    values_are_concrete,
)
from hstu.ops.cached_attention.reference import cached_attention_reference

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# The CUDA kernel for supported CUDA calls; False: the reference everywhere (the kernel has not yet run on a GPU).
USE_CUDA_KERNELS = False


def _kernel_for(q: torch.Tensor, v: torch.Tensor, rab: Optional[torch.Tensor]) -> Optional[Callable[..., torch.Tensor]]:
    """The CUDA kernel's forward for this call (q / v: the new rows), or None for the reference."""
    if not USE_CUDA_KERNELS or q.device.type != "cuda":
        return None
    from hstu.ops.cached_attention import cuda

    return cuda.forward if cuda.unsupported_reason(q, v, rab) is None else None


def _check_shapes(q, k, v, cached_k, cached_v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("cached_k", cached_k), ("cached_v", cached_v)):
        check_float_tensor(name, t, 3, SUPPORTED_DTYPES)
    for name, t in (("k", k), ("v", v), ("cached_k", cached_k), ("cached_v", cached_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}, q has "
                            f"{str(q.dtype).replace('torch.', '')}: use one dtype")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must have q's rows and heads {tuple(q.shape[:2])}, got {tuple(v.shape)}")
    if cached_k.shape[1:] != k.shape[1:]:
        raise ValueError(f"cached_k must have k's heads and head dim {tuple(k.shape[1:])}, got {tuple(cached_k.shape)}")
    if cached_v.shape[1:] != v.shape[1:] or cached_v.shape[0] != cached_k.shape[0]:
        raise ValueError(f"cached_v must have cached_k's rows and v's heads and head dim "
                         f"({cached_k.shape[0]}, {v.shape[1]}, {v.shape[2]}), got {tuple(cached_v.shape)}")


def _check_counts(name: str, counts: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
    if counts is None:
        return None
    counts = check_index_tensor(name, counts, batch)
    if values_are_concrete(counts) and batch and bool((counts < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {counts.tolist()}")
    return counts


def _check_pages(page_table: Optional[torch.Tensor], page_size: object, cached_k: torch.Tensor,
                 cache_offsets: torch.Tensor) -> tuple[Optional[torch.Tensor], int]:
    """(page_table, page_size) of a paged call, checked against the pool (cached_k's rows) and the cached lengths;
    (None, 0) for a contiguous cache. One host copy of the page table and the offsets when the values are concrete."""
    if page_table is None:
        if page_size not in (None, 0):
            raise ValueError(f"page_size={page_size!r} is given without a page_table")
        return None, 0
    page_size = check_int("page_size", page_size, minimum=1, maximum=1 << 20)
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    page_table = check_tensor("page_table", page_table)
    if page_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"page_table must be int32 or int64, got {str(page_table.dtype).replace('torch.', '')}")
    batch = cache_offsets.numel() - 1
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must be (B={batch}, max_pages), got {tuple(page_table.shape)}")
    pool_rows = cached_k.shape[0]
    if pool_rows % page_size:
        raise ValueError(f"cached_k / cached_v must hold whole pages of {page_size} rows, got {pool_rows} rows")
    if batch and values_are_concrete(page_table, cache_offsets):
        table, offsets = to_host(page_table, cache_offsets)
        table = table.view(page_table.shape)
        lengths = offsets[1:] - offsets[:-1]
        used = (lengths + page_size - 1) // page_size  # pages each sequence reads
        if int(used.max()) > page_table.shape[1]:
            b = int(used.argmax())
            raise ValueError(f"page_table has {page_table.shape[1]} pages per sequence, sequence {b} has "
                             f"{int(lengths[b])} cached rows ({int(used[b])} pages of {page_size})")
        in_use = torch.arange(page_table.shape[1]).view(1, -1) < used.view(-1, 1)
        bad = in_use & ((table < 0) | (table >= pool_rows // page_size))
        if bool(bad.any()):
            b, i = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(f"page_table[{b}, {i}]={int(table[b, i])} is outside the pool's "
                             f"{pool_rows // page_size} pages")
    return page_table, page_size


def cached_hstu_attention(
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
    page_size: Optional[int] = None,
) -> torch.Tensor:
    """Outputs (T_new, H, Dv) of the new rows q/k/v (jagged by ``delta_offsets``) attending to the cached keys /
    values (jagged by ``cache_offsets``, one sequence per user, same B) plus themselves; the rows equal those of a
    causal ``hstu_attention`` over each ``cache_b ++ delta_b`` (see ``hstu.ops.cached_attention.reference``).

    num_contexts / num_targets: (B,) counts of the whole sequences (targets are the last num_targets[b] new rows;
    target_group_size 1 is M-FALCON). rab: (B, 1 or H, >= max new rows, >= max whole length), rows = new rows,
    columns = keys of the whole sequence. scaling_seqlen: N of the 1/N scale (the model's, not a batch maximum).

    Paged cache: with ``page_table`` (B, max_pages) int32/int64 and ``page_size`` (a power of two), cached_k /
    cached_v are pools of pages and cached row r of user b is pool row ``page_table[b, r // page_size] * page_size
    + r % page_size``; ``cache_offsets`` then give only the cached lengths (their total need not match the pool).
    """
    _check_shapes(q, k, v, cached_k, cached_v)
    check_same_device("q", q, k=k, v=v, cached_k=cached_k, cached_v=cached_v, delta_offsets=delta_offsets,
                      cache_offsets=cache_offsets, num_contexts=num_contexts, num_targets=num_targets, rab=rab,
                      page_table=page_table if isinstance(page_table, torch.Tensor) else None)
    window_size = check_int("window_size", window_size)
    check_attention_extras(q, window_size, alpha, False)
    scaling_seqlen = check_int("scaling_seqlen", scaling_seqlen, minimum=1)
    target_group_size = check_int("target_group_size", target_group_size, minimum=1)
    delta_offsets = check_offsets("delta_offsets", delta_offsets, q.shape[0])
    paged = page_table is not None
    cache_offsets = check_offsets("cache_offsets", cache_offsets, None if paged else cached_k.shape[0])
    batch = delta_offsets.numel() - 1
    if cache_offsets.numel() != batch + 1:
        raise ValueError(f"cache_offsets must have delta_offsets' {batch + 1} entries (one sequence per user), got "
                         f"{cache_offsets.numel()}")
    page_table, page_size = _check_pages(page_table, page_size, cached_k, cache_offsets)
    num_contexts = _check_counts("num_contexts", num_contexts, batch)
    num_targets = _check_counts("num_targets", num_targets, batch)
    delta_lengths = delta_offsets[1:] - delta_offsets[:-1]
    cache_lengths = cache_offsets[1:] - cache_offsets[:-1]
    if num_targets is not None and values_are_concrete(num_targets, delta_offsets) and \
            bool((num_targets > delta_lengths).any()):
        raise ValueError(f"num_targets must be at most the new rows of each sequence {delta_lengths.tolist()} "
                         f"(cached rows are final, they cannot be targets), got {num_targets.tolist()}")
    if num_contexts is not None and values_are_concrete(num_contexts, delta_offsets, cache_offsets) and \
            bool((num_contexts > delta_lengths + cache_lengths).any()):
        raise ValueError(f"num_contexts must be at most each sequence's length "
                         f"{(delta_lengths + cache_lengths).tolist()}, got {num_contexts.tolist()}")
    if rab is not None:
        check_float_tensor("rab", rab, 4, SUPPORTED_DTYPES)
        if batch and values_are_concrete(delta_offsets, cache_offsets):
            n_q = int(delta_lengths.max())
            n_k = int((delta_lengths + cache_lengths).max())
            if rab.shape[0] != batch or rab.shape[1] not in (1, q.shape[1]) or rab.shape[2] < n_q or \
                    rab.shape[3] < n_k:
                raise ValueError(f"rab must be (B={batch}, 1 or H={q.shape[1]}, >= {n_q} new rows, >= {n_k} keys), "
                                 f"got {tuple(rab.shape)}")
    kernel = _kernel_for(q, v, rab)
    implementation = kernel if kernel is not None else cached_attention_reference
    return implementation(q, k, v, delta_offsets, cached_k, cached_v, cache_offsets, alpha=float(alpha),
                          scaling_seqlen=scaling_seqlen, window_size=window_size, num_contexts=num_contexts,
                          num_targets=num_targets, target_group_size=target_group_size, rab=rab,
                          page_table=page_table, page_size=page_size)
