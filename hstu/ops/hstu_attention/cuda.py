"""Binding of the fused CUDA HSTU attention kernels (csrc/hstu_attention) to the dispatcher.

The dispatcher (``hstu.ops.hstu_attention.op``) has already validated and normalised every argument:
q, k, v contiguous (T, H, D) of one dtype on one CUDA device; seq_offsets contiguous int32 (B+1,);
num_contexts / num_targets None or contiguous int32 (B,); rab None or (B, H or 1, >=max_seqlen, >=max_seqlen)
with unit stride in the last dim. ``scaling_seqlen`` is already resolved (never None).

Kernels: forward on Hopper (sm_90, head dims 64/128/256, no dropout) by the wgmma kernel
(csrc/hstu_attention/fwd_kernel_sm90.h; ``HSTU_SM90_FWD=0`` switches it off), otherwise by the sm80 tensor-core
(mma.sync) kernel; backward (sm80 path everywhere) in one of two ways, picked by ``deterministic``:
  * atomic dq (``deterministic=False``, the default; ``HSTU_ATOMIC_DQ=0`` turns it off): one dk/dv kernel also computes dq = dS K for its key tile and adds
    it with float32 atomics into a zeroed (T, H, D) float32 workspace, which a small kernel scales and casts to
    q's dtype. S and dP are computed once (D = 256 too: one pass with two warps per key block, each owning half
    the head dim). dq meets the same tolerance, but its float32 summation order varies between runs, so dq is not
    bitwise reproducible.
  * split (``deterministic=True``, or every backward with ``HSTU_ATOMIC_DQ=0``): a dk/dv kernel plus a separate
    dq kernel, no atomics anywhere; bitwise reproducible. Both paths pass the CUDA test file and compute-sanitizer
    memcheck/racecheck on an H200 (benchmarks/RESULTS.md, v7); the atomic one is 1.2-1.5x faster in the backward.
dk, dv and drab never use atomics (drab of a 1-head rab is summed over heads in a fixed order), so they are
reproducible either way. rab is read in q's dtype (cast here when it differs); its gradient is accumulated in
float32 and returned in rab's dtype.

Attention dropout (dropout_p > 0): the kernels drop weight W_ij when a Philox4x32-10 word keyed by
``dropout_seed`` and counted by (batch, head, row, column) falls below ceil(p * 2^32) (csrc/hstu_attention/dropout.h),
and scale the kept ones by 1 / (1 - p). The mask is a pure function of (seed, b, h, i, j), so the forward, dk/dv and
dq kernels regenerate the same bits independently of their tiling, and no mask is stored between forward and
backward. ``dropout_keep_mask`` returns the kernels' mask (a small debug kernel evaluating the same device function)
and ``dropout_keep_mask_reference`` computes it in PyTorch; the reference applied with that mask
(``hstu_attention_reference(..., dropout_p=p, dropout_mask=mask)``) is what the kernels must match.
The dispatcher draws ``dropout_seed`` (an int in [0, 2**62)) per call. The PyTorch reference path uses the same seed
with its own generator (``torch.rand``), i.e. a different mask for the same seed: each path is self-consistent
between its forward and backward (the dispatcher makes the same kernel/reference choice for both), but the kernel
and the reference do not drop the same elements for one seed.

Debugging: HSTU_POISON_OUTPUTS=1 fills every output buffer with NaN before the kernels run, so elements a kernel
fails to write show up in comparisons (the CUDA parity tests set it).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch

from hstu.ops._extension import load_extension

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the compiled extension holds: dtypes, head dims, rab/backward/dropout/atomic-dq support ({} if none)."""
    ext = load_extension()
    if ext is None or not hasattr(ext, "build_info"):
        return {}
    return dict(ext.build_info())


def sm90_forward_enabled() -> bool:
    """Whether forwards without dropout at head dims 64/128/256 run the Hopper wgmma kernel: built in (9.0a
    targeted), on an sm_90 device, and not switched off with HSTU_SM90_FWD=0 (the launcher reads it at every call)."""
    return (bool(build_info().get("sm90_forward")) and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0) and os.environ.get("HSTU_SM90_FWD", "1") != "0")


def sm90_backward_enabled() -> bool:
    """Whether atomic-dq backwards (deterministic=False) without dropout or rab gradient at head dims 64/128/256 run
    the Hopper wgmma kernel: built in, on an sm_90 device, and not switched off with HSTU_SM90_BWD=0."""
    return (bool(build_info().get("sm90_backward")) and torch.cuda.is_available()
            and torch.cuda.get_device_capability() == (9, 0) and os.environ.get("HSTU_SM90_BWD", "1") != "0")


def _poison() -> bool:
    return os.environ.get("HSTU_POISON_OUTPUTS", "0") not in ("", "0")


def _atomic_dq_enabled() -> bool:
    """deterministic=False backwards take the atomic-dq path unless HSTU_ATOMIC_DQ=0 (e.g. to compare the paths)."""
    return os.environ.get("HSTU_ATOMIC_DQ", "1").lower() not in ("0", "false", "off", "no")


def _new_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if _poison():
        out.fill_(float("nan"))
    return out


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: Optional[torch.Tensor], dropout_p: float
) -> Optional[str]:
    """None when the fused kernel handles this configuration, else a short human-readable reason."""
    needs_grad = q.requires_grad or k.requires_grad or v.requires_grad or (rab is not None and rab.requires_grad)
    return _unsupported_reason(q.device, q.dtype, q.shape[-1], k.shape[-1], v.shape[-1], rab is not None,
                               dropout_p > 0.0, needs_grad)  # fmt: skip


# Cached: the answer depends only on these properties and the (loaded once) extension, and the checks behind it
# (device capability, build info) cost several µs of host time on every call of the op.
@functools.lru_cache(maxsize=256)
def _unsupported_reason(device: torch.device, dtype: torch.dtype, dqk: int, dk: int, dv: int, has_rab: bool,
                        dropout: bool, needs_grad: bool) -> Optional[str]:  # fmt: skip
    if load_extension() is None:
        return "the hstu CUDA extension is not built"
    info = build_info()
    if device.type != "cuda":
        return "inputs are not on a CUDA device"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return "the fused kernel needs compute capability 8.0 or newer"
    name = _DTYPE_NAMES.get(dtype)
    if name is None or name not in info.get("dtypes", []):
        return f"dtype {dtype} is not supported by the fused kernel (bfloat16/float16 builds only)"
    if dk != dqk or dv != dqk:
        return "the fused kernel needs Dqk == Dv"
    if dqk not in info.get("head_dims", []):
        return f"head dim {dqk} is not compiled in (supported: {info.get('head_dims')})"
    if has_rab and not info.get("rab", False):
        return "this build has no rab kernels (HSTU_DISABLE_RAB)"
    if dropout and not info.get("dropout", False):
        return "this build of the fused kernel has no attention dropout (rebuild the extension)"
    if needs_grad and not info.get("backward", False):
        return "this build has no backward kernels (HSTU_DISABLE_BACKWARD)"
    return None


_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def dropout_threshold(dropout_p: float) -> int:
    """The kernels' keep threshold: a Philox word w keeps its weight when w >= min(ceil(p * 2^32), 2^32 - 1)."""
    return min(math.ceil(float(dropout_p) * 4294967296.0), _MASK32)


def _seed_arg(seed: int) -> int:
    """Any Python int as the signed 64-bit value whose bits key the Philox generator."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s - (1 << 64) if s >= (1 << 63) else s


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # a (int64 holding uint32 values) * m (uint32) as (high, low) 32-bit words, without int64 overflow.
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    mid = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 counters (Random123 / cuRAND constants)."""
    for r in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < 9:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_keep_mask_reference(
    seed: int, batch: int, heads: int, max_seqlen: int, dropout_p: float, device="cpu"
) -> torch.Tensor:
    """The kernels' keep mask computed in PyTorch: bool (batch, heads, max_seqlen, max_seqlen).

    Position (b, h, i, j): Philox4x32-10 with key (seed low 32 bits, seed high 32 bits) and counter
    (key16(j & ~8), key16(i & ~8), b * heads + h, 0), key16(x) = (x >> 4) * 8 + (x & 7); word 2 * bit3(i) + bit3(j)
    of the result; kept when that word >= dropout_threshold(p).
    """
    n = int(max_seqlen)
    seed = _seed_arg(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    idx = torch.arange(n, device=device, dtype=torch.int64)
    base = idx & ~8
    key16 = ((base >> 4) << 3) | (base & 7)
    bh = torch.arange(batch * heads, device=device, dtype=torch.int64).view(-1, 1, 1)
    c0 = key16.view(1, 1, n).expand(batch * heads, n, n)
    c1 = key16.view(1, n, 1).expand(batch * heads, n, n)
    c2 = bh.expand(batch * heads, n, n)
    words = philox4x32_10(c0, c1, c2, torch.zeros_like(c0), k0, k1)
    word = ((idx >> 3) & 1).view(1, n, 1) * 2 + ((idx >> 3) & 1).view(1, 1, n)
    low = torch.where(word == 0, words[0], words[1])
    chosen = torch.where(word < 2, low, torch.where(word == 2, words[2], words[3]))
    return (chosen >= dropout_threshold(dropout_p)).view(batch, heads, n, n)


def dropout_keep_mask(
    seed: int, batch: int, heads: int, max_seqlen: int, dropout_p: float, device="cuda"
) -> torch.Tensor:
    """Debug: the fused kernels' dropout keep mask, bool (batch, heads, max_seqlen, max_seqlen) on ``device``.

    Evaluated by a small CUDA kernel with the same device function the attention kernels use; entry [b, h, i, j]
    says whether weight (row i, key j) of sequence b, head h survives dropout with this seed and p.
    """
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if min(batch, heads, max_seqlen) < 0:
        raise ValueError("batch, heads and max_seqlen must be non-negative")
    ext = load_extension()
    if ext is None or not hasattr(ext, "hstu_dropout_keep_mask"):
        raise RuntimeError("the hstu CUDA extension with attention dropout is not built")
    out = torch.empty((batch, heads, max_seqlen, max_seqlen), dtype=torch.bool, device=device)
    if out.numel() > 0:
        ext.hstu_dropout_keep_mask(_seed_arg(seed), float(dropout_p), out)
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned (the kernels move 16-byte chunks); a view whose start is not is copied."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


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
    ext = load_extension()
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = _new_like(q)
    ext.hstu_attn_fwd(
        q, k, v, seq_offsets, int(max_seqlen), float(alpha), int(scaling_seqlen), bool(causal), int(window_size),
        num_contexts, num_targets, int(target_group_size), _rab_for_kernel(rab, q.dtype), out,
        dropout_p=float(dropout_p), dropout_seed=_seed_arg(dropout_seed),
    )  # fmt: skip
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
    """Returns dq, dk, dv and drab (shaped like rab, or None when rab_needs_grad is False).

    dropout_p / dropout_seed must be the forward's: the kernels regenerate its keep mask from them.
    deterministic=False takes the faster atomic-dq path (dq not bitwise reproducible) unless HSTU_ATOMIC_DQ=0;
    deterministic=True the split, atomic-free path (bitwise reproducible).
    """
    ext = load_extension()
    grad_out, q, k, v = _aligned(grad_out), _aligned(q), _aligned(k), _aligned(v)
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    rab_k = _rab_for_kernel(rab, q.dtype)
    drab = None
    if rab is not None and rab_needs_grad:
        drab = torch.zeros(rab.shape, dtype=torch.float32, device=q.device)
    ext.hstu_attn_bwd(
        grad_out, q, k, v, seq_offsets, int(max_seqlen), float(alpha), int(scaling_seqlen), bool(causal),
        int(window_size), num_contexts, num_targets, int(target_group_size), rab_k, dq, dk, dv, drab,
        dropout_p=float(dropout_p), dropout_seed=_seed_arg(dropout_seed),
        deterministic=bool(deterministic) or not _atomic_dq_enabled(),
    )  # fmt: skip
    if drab is not None and drab.dtype != rab.dtype:
        drab = drab.to(rab.dtype)
    return dq, dk, dv, drab
