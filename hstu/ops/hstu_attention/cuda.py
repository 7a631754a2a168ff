"""Binding of the fused CUDA HSTU attention kernels (csrc/hstu_attention) to the dispatcher.

The dispatcher (``hstu.ops.hstu_attention.op``) has already validated and normalised every argument:
q, k, v contiguous (T, H, D) of one dtype on one CUDA device; seq_offsets contiguous int32 (B+1,);
num_contexts / num_targets None or contiguous int32 (B,); rab None or (B, H or 1, >=max_seqlen, >=max_seqlen)
with unit stride in the last dim. ``scaling_seqlen`` is already resolved (never None).

Kernels (sm80 tensor-core path, also used on sm90): forward; backward as a dk/dv kernel plus a dq kernel with no
atomics, so the backward is deterministic whatever ``deterministic`` says. rab is read in q's dtype (cast here
when it differs); its gradient is accumulated in float32 and returned in rab's dtype.

Debugging: HSTU_POISON_OUTPUTS=1 fills every output buffer with NaN before the kernels run, so elements a kernel
fails to write show up in comparisons (the CUDA parity tests set it).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from hstu.ops._extension import load_extension

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=None)
def _build_info() -> dict:
    ext = load_extension()
    if ext is None or not hasattr(ext, "build_info"):
        return {}
    return dict(ext.build_info())


def _poison() -> bool:
    return os.environ.get("HSTU_POISON_OUTPUTS", "0") not in ("", "0")


def _new_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if _poison():
        out.fill_(float("nan"))
    return out


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: Optional[torch.Tensor], dropout_p: float
) -> Optional[str]:
    """None when the fused kernel handles this configuration, else a short human-readable reason."""
    if load_extension() is None:
        return "the hstu CUDA extension is not built"
    info = _build_info()
    if not q.is_cuda:
        return "inputs are not on a CUDA device"
    major, _ = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return "the fused kernel needs compute capability 8.0 or newer"
    name = _DTYPE_NAMES.get(q.dtype)
    if name is None or name not in info.get("dtypes", []):
        return f"dtype {q.dtype} is not supported by the fused kernel (bfloat16/float16 builds only)"
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return "the fused kernel needs Dqk == Dv"
    if q.shape[-1] not in info.get("head_dims", []):
        return f"head dim {q.shape[-1]} is not compiled in (supported: {info.get('head_dims')})"
    if rab is not None and not info.get("rab", False):
        return "this build has no rab kernels (HSTU_DISABLE_RAB)"
    if dropout_p > 0.0 and not info.get("dropout", False):
        return "attention dropout is not implemented in the fused kernel yet"
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or (rab is not None and rab.requires_grad)
    if needs_grad and not info.get("backward", False):
        return "this build has no backward kernels (HSTU_DISABLE_BACKWARD)"
    return None


def _rab_for_kernel(rab: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if rab is None:
        return None
    r = rab.detach()
    if r.dtype != dtype:
        r = r.to(dtype)
    if r.stride(-1) != 1:
        r = r.contiguous()
    return r


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    dropout_p: float,
    dropout_seed: int,
) -> torch.Tensor:
    if dropout_p > 0.0:
        raise NotImplementedError("attention dropout is not implemented in the fused kernel")
    ext = load_extension()
    out = _new_like(q)
    ext.hstu_attn_fwd(
        q, k, v, seq_offsets, int(max_seqlen), float(alpha), int(scaling_seqlen), bool(causal), int(window_size),
        num_contexts, num_targets, int(target_group_size), _rab_for_kernel(rab, q.dtype), out,
    )
    return out


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    causal: bool,
    window_size: int,
    num_contexts: Optional[torch.Tensor],
    num_targets: Optional[torch.Tensor],
    target_group_size: int,
    rab: Optional[torch.Tensor],
    rab_needs_grad: bool,
    dropout_p: float,
    dropout_seed: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Returns dq, dk, dv and drab (shaped like rab, or None when rab_needs_grad is False)."""
    if dropout_p > 0.0:
        raise NotImplementedError("attention dropout is not implemented in the fused kernel")
    ext = load_extension()
    grad_out = grad_out.contiguous()
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    rab_k = _rab_for_kernel(rab, q.dtype)
    drab = None
    if rab is not None and rab_needs_grad:
        drab = torch.zeros(rab.shape, dtype=torch.float32, device=q.device)
    ext.hstu_attn_bwd(
        grad_out, q, k, v, seq_offsets, int(max_seqlen), float(alpha), int(scaling_seqlen), bool(causal),
        int(window_size), num_contexts, num_targets, int(target_group_size), rab_k, dq, dk, dv, drab,
    )
    if drab is not None and drab.dtype != rab.dtype:
        drab = drab.to(rab.dtype)
    return dq, dk, dv, drab
