"""Binding of the fused CUDA HSTU attention kernels (csrc/hstu_attention) to the dispatcher.

``forward`` and ``backward`` take one call's ``AttentionArgs`` (``hstu.ops.hstu_attention.args``), which the
dispatcher (``hstu.ops.hstu_attention.op``) has already validated and normalised: q, k, v contiguous (T, H, D)
of one dtype on one CUDA device; seq_offsets contiguous int32 (B+1,); num_contexts / num_targets None or contiguous
int32 (B,); rab None or (B, H or 1, >=max_seqlen, >=max_seqlen) with unit stride in the last dim.
``scaling_seqlen`` is already resolved (never None).

Relative bias tables (``AttentionArgs.rab_*``, ``rab_tables.py``): ``forward`` / ``backward`` hand them to the binding
(hstu_api.cpp checks them and fills AttnParams' table fields) and the sm80-style kernels compute the bias of every
entry from the tables and the tokens' timestamps / positions (csrc/hstu_attention/rab_tables.h; table calls run
those kernels on Hopper too): nothing of size L x L is stored. The backward sums the tables' gradients into float32
workspaces shaped like the tables: with ``deterministic=False`` a shared-memory histogram per block, then float32
atomics (their summation order varies); with ``deterministic=True`` a histogram per warp (16 keys) whose lanes add
in a fixed order, written to its own slot of a float32 workspace of B x H x ceil(max_seqlen / 16) x (K + 1 + 2M - 1)
floats that the binding allocates for the call, and summed slot after slot in a fixed order by the dq kernel:
bitwise reproducible. ``reads_rab_tables()`` says whether table calls take these kernels: the build has them and the
call's ``KernelVariant.table_kernels`` asks for them (off by default; otherwise the dispatcher writes the tables out
as a dense rab for the dense-rab kernels).

Kernels: which ones a call runs is decided in C++ (csrc/hstu_attention/heuristics.h) from the problem and a
``KernelVariant`` (its defaults are what the op runs; tests and benchmarks name others, and ``kernel_plan`` tells
which kernels a call would run). On Hopper (sm_90, built with 9.0a) the forward at head dims 64/128/256 without
dropout runs the wgmma kernels (fwd_kernel_sm90.h), and so does the atomic-dq backward without dropout or rab
gradient (bwd_kernel_sm90.h); everything else, and every launch on Ampere, runs the sm80-style mma.sync kernels.
The backward takes one of two paths, picked by ``deterministic``:
  * atomic dq (``deterministic=False``, the default): one dk/dv kernel also computes dq = dS K for its key tile and
    adds it with float32 atomics into a zeroed (T, H, D) float32 workspace, which a small kernel scales and casts to
    q's dtype. S and dP are computed once. dq meets the same tolerance, but its float32 summation order varies
    between runs, so dq is not bitwise reproducible.
  * split (``deterministic=True``): a dk/dv kernel plus a separate dq kernel, no atomics anywhere; bitwise
    reproducible. The atomic one is 1.2-1.5x faster in the backward (benchmarks/RESULTS.md).
User overrides, read once per process: ``HSTU_SM90_FWD=0`` / ``HSTU_SM90_BWD=0`` run the Ampere-style forward /
backward on Hopper too.
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

import contextlib
import contextvars
import dataclasses
import functools
import math
import os
from typing import Optional

import torch

from hstu.ops._extension import load_extension
from hstu.ops.hstu_attention.args import AttentionArgs

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the compiled extension holds: dtypes, head dims, rab/backward/dropout/atomic-dq support ({} if none)."""
    ext = load_extension()
    if ext is None or not hasattr(ext, "build_info"):
        return {}
    return dict(ext.build_info())


def reads_rab_tables(variant: Optional[KernelVariant] = None) -> bool:
    """Whether table calls go to the kernels that compute the relative bias from the weight tables: the build has them
    (``build_info()['rab_tables']``: builds with the rab units) and ``variant`` (resolved as ``forward`` does) asks for
    them (``KernelVariant.table_kernels``). Otherwise the dispatcher writes the tables out as a dense rab for the
    dense-rab kernels. Both backward paths take them (deterministic=True: table gradients in a fixed order)."""
    return bool(build_info().get("rab_tables", False)) and _resolve(variant).table_kernels


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """Which kernels a call may run (csrc/hstu_attention/hstu.h's KernelOptions); the defaults are the op's own
    choice, per call, by csrc/hstu_attention/heuristics.h. Tests and benchmarks pass other values to run a given
    kernel: ``forward(..., variant=...)`` or ``with kernel_variant(...)`` around op calls. A field that does not apply
    to a call (e.g. the Hopper forward on an Ampere device) leaves it to the kernels that do.

    sm90_forward / sm90_backward: the Hopper wgmma kernels where they apply (False: the sm80-style ones).
    forward_warp_specialized: the Hopper forward with a producer warpgroup (False: the single-role kernel).
    forward_two_per_sm: True / False force the two-blocks-per-SM forward shape (head dims 64 / 128) on / off; None:
    sequences of at most 256 tokens take it. forward_persistent: the warp-specialized forward at head dims 64 / 128
    as one wave of blocks (False: one block per query tile). grouped_schedule: True / False force the Hopper kernels'
    grouped launch order on / off (None: chosen per call).
    bench_bwd_warps (0 or 8), bench_d256_two_pass: benchmark-only sm80-style backward variants, in builds with
    HSTU_BENCH_VARIANTS=1 only (the extension refuses them otherwise).
    table_kernels: bias-table calls run the sm80-style kernels that read the tables (no L x L bias in memory);
    False, the default, writes the tables out as a dense rab and runs the dense-rab kernels, the path verified on a
    GPU so far (benchmarks/RESULTS.md).
    """

    sm90_forward: bool = True
    sm90_backward: bool = True
    forward_warp_specialized: bool = True
    forward_two_per_sm: Optional[bool] = None
    forward_persistent: bool = True
    grouped_schedule: Optional[bool] = None
    bench_bwd_warps: int = 0
    bench_d256_two_pass: bool = False
    table_kernels: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "bench_bwd_warps":
                if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 8):
                    raise ValueError(f"KernelVariant.bench_bwd_warps must be 0 or 8, got {value!r}")
            elif f.name in ("forward_two_per_sm", "grouped_schedule"):
                if value is not None and not isinstance(value, bool):
                    raise TypeError(f"KernelVariant.{f.name} must be None, True or False, got {value!r}")
            elif not isinstance(value, bool):
                raise TypeError(f"KernelVariant.{f.name} must be a bool, got {value!r}")


def _env_off(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "off", "no")


@functools.lru_cache(maxsize=None)
def default_variant() -> KernelVariant:
    """The variant calls run without an explicit one: the defaults, except for the two documented user overrides
    HSTU_SM90_FWD=0 / HSTU_SM90_BWD=0 (the Ampere-style forward / backward on Hopper too), read once per process."""
    return KernelVariant(sm90_forward=not _env_off("HSTU_SM90_FWD"), sm90_backward=not _env_off("HSTU_SM90_BWD"))


_variant: contextvars.ContextVar[Optional[KernelVariant]] = contextvars.ContextVar("hstu_kernel_variant", default=None)


@contextlib.contextmanager
def kernel_variant(variant: Optional[KernelVariant] = None, **fields):
    """Runs the kernel calls inside the block (also those made through ``hstu.ops.hstu_attention``) with ``variant``,
    or with ``default_variant()`` changed in ``fields``; for tests and benchmarks."""
    if variant is None:
        variant = dataclasses.replace(default_variant(), **fields)
    elif fields:
        raise TypeError("pass either a KernelVariant or its fields, not both")
    if not isinstance(variant, KernelVariant):
        raise TypeError(f"variant must be a KernelVariant, got {type(variant).__name__}")
    token = _variant.set(variant)
    try:
        yield variant
    finally:
        _variant.reset(token)


def _resolve(variant: Optional[KernelVariant]) -> KernelVariant:
    if variant is None:
        variant = _variant.get() or default_variant()
    elif not isinstance(variant, KernelVariant):
        raise TypeError(f"variant must be a KernelVariant or None, got {type(variant).__name__}")
    return variant


# Cached per (variant, deterministic): the binding's options object is built once, not at every call (host time).
@functools.lru_cache(maxsize=64)
def _ext_options(variant: KernelVariant, deterministic: bool):
    return load_extension().KernelOptions(
        deterministic=deterministic, sm90_forward=variant.sm90_forward, sm90_backward=variant.sm90_backward,
        fwd_warp_specialized=variant.forward_warp_specialized, fwd_two_per_sm=variant.forward_two_per_sm,
        fwd_persistent=variant.forward_persistent, grouped_schedule=variant.grouped_schedule,
        bench_bwd_warps=variant.bench_bwd_warps, bench_d256_two_pass=variant.bench_d256_two_pass,
    )  # fmt: skip


def kernel_plan(direction: str, *, head_dim: int, batch: int, heads: int, max_seqlen: int,
                dtype: torch.dtype = torch.bfloat16, rab: bool = False, rab_grad: bool = False, dropout: bool = False,
                deterministic: bool = False, variant: Optional[KernelVariant] = None,
                rab_tables: bool = False) -> dict:  # fmt: skip
    """Which kernels ``forward`` (direction "forward") or ``backward`` ("backward") would launch on the current CUDA
    device for a call with these properties and ``variant`` (default: as ``forward`` / ``backward`` resolve it).

    The answer comes from the same C++ function the launchers follow (heuristics.h): a dict with "kernel" (forward:
    "sm80", "sm90_single_role", "sm90_ping_pong" or "sm90_two_per_sm"; backward: "sm80" or "sm90"), "kernels" (the
    names of the __global__ functions launched), "sched_group" (the Hopper launch order's pairs per group, 1: pair
    after pair); forward: "persistent", "consumer_warpgroups"; backward: "atomic_dq", "dkdv" (the sm80-style dk/dv
    launch: "one_pass", "split_head_dim", "two_pass", "eight_warps"; None on the Hopper kernel). ``rab_tables``: the
    bias comes from weight tables (a relative bias: implies ``rab``; ``rab_grad`` concerns a dense rab only).
    """
    ext = load_extension()
    if ext is None or not hasattr(ext, "kernel_plan"):
        raise RuntimeError("the hstu CUDA extension is not built")
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    options = _ext_options(_resolve(variant), bool(deterministic))
    return dict(ext.kernel_plan(direction, name, int(head_dim), int(batch), int(heads), int(max_seqlen),
                                bool(rab) or bool(rab_tables), bool(rab_grad), bool(dropout), options,
                                rab_tables=bool(rab_tables)))  # fmt: skip


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


def _table_kwargs(args: AttentionArgs) -> dict:
    """The binding's bias-table keywords (none without tables, so a call without them passes nothing new)."""
    if not args.has_tables():
        return {}
    return dict(rab_position_weights=args.rab_position_weights, rab_time_weights=args.rab_time_weights,
                rab_timestamps=args.rab_timestamps, rab_next_timestamps=args.rab_next_timestamps,
                rab_shared_positions=args.rab_shared_positions, rab_time_next=args.rab_time_reference == "next",
                rab_time_divisor=float(args.rab_time_divisor))  # fmt: skip


def forward(args: AttentionArgs, variant: Optional[KernelVariant] = None) -> torch.Tensor:
    """The forward kernels (the dispatcher has validated ``args``; ``args.deterministic`` concerns the backward
    only); ``variant``: see ``KernelVariant``."""
    ext = load_extension()
    q, k, v = _aligned(args.q), _aligned(args.k), _aligned(args.v)
    out = _new_like(q)
    ext.hstu_attn_fwd(
        q, k, v, args.seq_offsets, int(args.max_seqlen), float(args.alpha), int(args.scaling_seqlen), bool(args.causal),
        int(args.window_size), args.num_contexts, args.num_targets, int(args.target_group_size),
        _rab_for_kernel(args.rab, q.dtype), out, dropout_p=float(args.dropout_p),
        dropout_seed=_seed_arg(args.dropout_seed), options=_ext_options(_resolve(variant), False),
        **_table_kwargs(args),
    )  # fmt: skip
    return out


def backward(
    grad_out: torch.Tensor, args: AttentionArgs, rab_needs_grad: bool = False, variant: Optional[KernelVariant] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:  # fmt: skip
    """Returns dq, dk, dv, drab (shaped like rab, or None when rab_needs_grad is False) and the bias tables'
    gradients (float32 workspaces shaped like the tables, cast to their dtype; None without tables or
    rab_needs_grad).

    ``args`` must be the forward's (its dropout_p / dropout_seed too: the kernels regenerate its keep mask from them).
    args.deterministic=False takes the faster atomic-dq path (dq not bitwise reproducible), True the split,
    atomic-free path (bitwise reproducible). ``variant``: see ``KernelVariant``.
    """
    ext = load_extension()
    rab = args.rab
    grad_out, q, k, v = _aligned(grad_out), _aligned(args.q), _aligned(args.k), _aligned(args.v)
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    rab_k = _rab_for_kernel(rab, q.dtype)
    drab = None
    if rab is not None and rab_needs_grad:
        drab = torch.zeros(rab.shape, dtype=torch.float32, device=q.device)
    tables = _table_kwargs(args)
    table_grads = [None, None]
    if tables and rab_needs_grad:
        table_grads = [None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=q.device)
                       for t in (args.rab_position_weights, args.rab_time_weights)]  # fmt: skip
        tables.update(drab_position=table_grads[0], drab_time=table_grads[1])
    ext.hstu_attn_bwd(
        grad_out, q, k, v, args.seq_offsets, int(args.max_seqlen), float(args.alpha), int(args.scaling_seqlen),
        bool(args.causal), int(args.window_size), args.num_contexts, args.num_targets, int(args.target_group_size),
        rab_k, dq, dk, dv, drab, dropout_p=float(args.dropout_p), dropout_seed=_seed_arg(args.dropout_seed),
        options=_ext_options(_resolve(variant), bool(args.deterministic)), **tables,
    )  # fmt: skip
    if drab is not None and drab.dtype != rab.dtype:
        drab = drab.to(rab.dtype)
    dpos, dtime = (None if g is None else g.to(t.dtype) for g, t in zip(
        table_grads, (args.rab_position_weights, args.rab_time_weights)))  # fmt: skip
    return dq, dk, dv, drab, dpos, dtime
