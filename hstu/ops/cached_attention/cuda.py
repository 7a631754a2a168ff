"""Binding of the CUDA cached-attention forward (csrc/hstu_attention/cached.h, ``hstu_attn_fwd_cached``).

The kernel is the sm80-style (mma.sync) forward of the fused HSTU attention with a compile-time cached mode; it runs
on every architecture the extension is built for (Hopper included). Its query tiles are tiles of the new rows, and
the keys / values of sequence b are read from two places: the cached rows (``cached_k`` / ``cached_v``, jagged by
``cache_offsets``, or pages of a pool listed by ``page_table``) followed by the new rows (``k`` / ``v``, jagged by
``delta_offsets``). Nothing is concatenated
per call: the cache is read where it lies, once per query tile (M-FALCON's candidates share one or two tiles). The
masks apply at absolute positions (new row i of b is row c_b + i), so outputs equal those rows of a full causal
``hstu_attention`` over ``cache_b ++ delta_b``.

Supported (``unsupported_reason``): CUDA tensors of bfloat16 / float16, Dqk == Dv in the build's
``cached_forward_head_dims`` (32, 64, 128, 256 unless pruned), compute capability 8.0+, no rab or a dense rab
(B, 1 or H, >= max new rows, >= max whole length; read in q's dtype). Anything else runs the PyTorch reference.
Inputs that are not contiguous (or 16-byte aligned) are copied; the int32 offsets and counts are converted here.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from hstu.ops._extension import load_extension
from hstu.ops.hstu_attention.cuda import _aligned, _new_like, _rab_for_kernel, build_info

_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=64)
def _unsupported(device: torch.device, dtype: torch.dtype, dqk: int, dv: int, has_rab: bool) -> Optional[str]:
    ext = load_extension()
    if ext is None or not hasattr(ext, "hstu_attn_fwd_cached"):
        return "the hstu CUDA extension with the cached forward is not built"
    if device.type != "cuda":
        return "inputs are not on a CUDA device"
    if torch.cuda.get_device_capability(device)[0] < 8:
        return "the cached kernel needs compute capability 8.0 or newer"
    if dtype not in _DTYPES:
        return f"dtype {dtype} is not supported by the cached kernel (bfloat16 / float16)"
    info = build_info()
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
    if names[dtype] not in info.get("dtypes", []):
        return f"dtype {dtype} is not compiled in"
    if dqk != dv:
        return "the cached kernel needs Dqk == Dv"
    if dqk not in info.get("cached_forward_head_dims", []):
        return f"head dim {dqk} has no cached kernel (built: {info.get('cached_forward_head_dims')})"
    if has_rab and not info.get("rab", False):
        return "this build has no rab kernels (HSTU_DISABLE_RAB)"
    return None


def unsupported_reason(q: torch.Tensor, v: torch.Tensor, rab: Optional[torch.Tensor]) -> Optional[str]:
    """None when the cached kernel runs this call (q / v: the new rows), else a short reason."""
    return _unsupported(q.device, q.dtype, int(q.shape[-1]), int(v.shape[-1]), rab is not None)


def _int32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def forward(
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
    """The cached kernel; the arguments as ``cached_hstu_attention`` takes them once it has checked them (this does
    not check values: offsets must be non-decreasing, counts within the rules of the reference, page table entries
    inside the pool)."""
    ext = load_extension()
    delta_offsets, cache_offsets = _int32(delta_offsets), _int32(cache_offsets)
    batch = delta_offsets.numel() - 1
    if batch <= 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    delta_lengths = delta_offsets[1:] - delta_offsets[:-1]
    whole = delta_lengths + (cache_offsets[1:] - cache_offsets[:-1])
    max_new, max_whole = torch.stack([delta_lengths.max(), whole.max()]).tolist()  # one device sync
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    cached_k, cached_v = _aligned(cached_k), _aligned(cached_v)
    out = _new_like(q)
    return ext.hstu_attn_fwd_cached(
        q, k, v, delta_offsets, int(max_new), cached_k, cached_v, cache_offsets, int(max_whole), float(alpha),
        int(scaling_seqlen), int(window_size), _int32(num_contexts), _int32(num_targets), int(target_group_size),
        _rab_for_kernel(rab, q.dtype), out, _int32(page_table), int(page_size) if page_table is not None else 0,
    )  # fmt: skip
