"""Host emulation of the kernels (csrc/hstu_attention/emulation), no GPU needed: the real kernel sources, compiled by
g++ with one fiber per CUDA thread and emulated ldmatrix / mma.sync / barriers / atomics, run on the CPU against the
fp32 reference under the parity rule (catches indexing, layout, masking and barrier-protocol bugs; not timing, not
memory-model races); and heuristics.h's kernel choice through the same library. Needs g++ and the CUDA headers;
skips otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests.ops.attention_cuda_common import _build_inputs

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


_EMU_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "hstu_attention")

# The bias tables' part of the harness's EmuArgs (AttnParams' rab_* fields), after the dropout fields.
_TABLE_FIELDS = [(n, ctypes.c_void_p) for n in ("pos_w", "time_w", "timestamps", "next_timestamps",
                                                "shared_positions", "dpos", "dtime")]
_TABLE_FIELDS += [(n, ctypes.c_int) for n in ("pos_heads", "pos_size", "time_heads", "time_buckets", "time_next",
                                              "table_hist")]
_TABLE_FIELDS += [("time_divisor", ctypes.c_float)]  # fmt: skip


def _cuda_include_dir():
    import glob

    cands = [os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "include")]
    cands += sorted(glob.glob("/usr/local/cuda*/targets/*/include")) + sorted(glob.glob("/usr/local/cuda*/include"))
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_bf16.h")) and os.path.exists(os.path.join(c, "cuda_runtime.h")):
            return c
    return None


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    import ctypes
    import shutil
    import subprocess

    cxx, inc = shutil.which("g++"), _cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("host emulation needs g++ and the CUDA headers")
    src = os.path.abspath(_EMU_DIR)
    lib = str(tmp_path_factory.mktemp("hstu_emu") / "libhstu_emu.so")
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-w", f"-I{src}/emulation", f"-I{src}", f"-I{inc}",
           f"{src}/emulation/harness.cpp", "-o", lib]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # cp.async copies land as late as a wait allows: a tile read before its wait sees stale / poisoned data (the
    # library reads the variable once, when it is loaded)
    old = os.environ.get("HSTU_EMU_LAZY_CP_ASYNC")
    os.environ["HSTU_EMU_LAZY_CP_ASYNC"] = "1"
    try:
        return ctypes.CDLL(lib)
    finally:
        if old is None:
            del os.environ["HSTU_EMU_LAZY_CP_ASYNC"]
        else:
            os.environ["HSTU_EMU_LAZY_CP_ASYNC"] = old


class _EmuArgs(ctypes.Structure):
    """The harness's EmuArgs (csrc/hstu_attention/emulation/harness.cpp)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "k", "v", "dout", "out", "dq", "dk", "dv", "drab", "dq_accum",
                                               "offsets", "ctx", "tgt", "rab")]
    _fields_ += [(n, ctypes.c_int64) for n in ("rab_bs", "rab_hs", "rab_rs", "drab_bs", "drab_hs", "drab_rs",
                                               "row_stride", "total_rows")]
    _fields_ += [(n, ctypes.c_int) for n in ("batch", "heads", "max_seqlen", "causal", "window", "group", "rab_heads",
                                             "dtype", "D", "dropout", "variant")]
    _fields_ += [(n, ctypes.c_float) for n in ("alpha", "inv_scale", "dropout_scale")]
    _fields_ += [(n, ctypes.c_uint32) for n in ("seed_lo", "seed_hi", "threshold")]  # fmt: skip
    _fields_ += _TABLE_FIELDS
    _fields_ += [(n, ctypes.c_void_p) for n in ("k_cache", "v_cache", "cache_offsets")]  # the cached forward
    _fields_ += [("page_table", ctypes.c_void_p), ("page_table_stride", ctypes.c_int64), ("page_shift", ctypes.c_int)]


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _args_for(q, k, v, offsets, n, alpha, scaling, causal, window, nc, nt, group, rab, p, seed, variant):
    from hstu.ops.hstu_attention import cuda

    a = _EmuArgs()
    a.q, a.k, a.v, a.offsets, a.ctx, a.tgt, a.rab = map(_ptr, (q, k, v, offsets, nc, nt, rab))
    if rab is not None:
        a.rab_bs, a.rab_hs, a.rab_rs, _ = rab.stride()
        a.rab_heads = rab.shape[1]
    a.row_stride, a.total_rows = q.stride(0), q.shape[0]
    a.batch, a.heads, a.max_seqlen, a.D = offsets.numel() - 1, q.shape[1], n, q.shape[2]
    a.causal, a.window, a.group, a.variant = int(causal), max(window, -1), group, variant
    a.dtype = 0 if q.dtype == torch.bfloat16 else 1
    a.alpha, a.inv_scale = alpha, 1.0 / scaling
    s = seed & 0xFFFFFFFFFFFFFFFF
    a.dropout, a.seed_lo, a.seed_hi = int(p > 0), s & 0xFFFFFFFF, s >> 32
    a.threshold, a.dropout_scale = cuda.dropout_threshold(p), 1.0 / (1.0 - p)
    return a


def _emu_impl(emu, deterministic, variant=0):
    """hstu_attention-like callable (CPU tensors) running the emulated kernels; dropout uses the kernels' Philox."""
    ptr = _ptr

    def args_for(*args):
        return _args_for(*args, variant)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, rab, offsets, n, alpha, scaling, causal, window, nc, nt, group, p, seed):
            rab_k = None if rab is None else rab.detach().to(q.dtype).contiguous()
            out = torch.full_like(q, float("nan"))
            a = args_for(q, k, v, offsets, n, alpha, scaling, causal, window, nc, nt, group, rab_k, p, seed)
            a.out = ptr(out)
            if q.numel():
                emu.emu_fwd(ctypes.byref(a))
            ctx.save_for_backward(q, k, v, rab_k, offsets, nc, nt)
            ctx.cfg = (n, alpha, scaling, causal, window, group, p, seed)
            ctx.rab_grad = rab is not None and rab.requires_grad
            ctx.rab_dtype = None if rab is None else rab.dtype
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, rab_k, offsets, nc, nt = ctx.saved_tensors
            n, alpha, scaling, causal, window, group, p, seed = ctx.cfg
            dout = dout.contiguous()
            dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
            a = args_for(q, k, v, offsets, n, alpha, scaling, causal, window, nc, nt, group, rab_k, p, seed)
            a.dout, a.dq, a.dk, a.dv = map(ptr, (dout, dq, dk, dv))
            drab = acc = None
            if ctx.rab_grad:
                drab = torch.zeros(rab_k.shape, dtype=torch.float32)
                a.drab = ptr(drab)
                a.drab_bs, a.drab_hs, a.drab_rs, _ = drab.stride()
            if not deterministic and q.numel():
                acc = torch.zeros(q.shape, dtype=torch.float32)  # the binding's zeroed workspace
                a.dq_accum = ptr(acc)
            if q.numel():
                emu.emu_bwd(ctypes.byref(a))
            return dq, dk, dv, None if drab is None else drab.to(ctx.rab_dtype), *([None] * 11)

    def impl(q, k, v, offsets, n, *, rab=None, alpha=1.0, scaling_seqlen=None, causal=True, window_size=-1,
             num_contexts=None, num_targets=None, target_group_size=1, dropout_p=0.0, dropout_mask=None, seed=77):
        scaling = n if scaling_seqlen is None else scaling_seqlen
        return Fn.apply(q.contiguous(), k.contiguous(), v.contiguous(), rab, offsets, n, alpha, scaling, causal,
                        window_size, num_contexts, num_targets, target_group_size, dropout_p, seed)  # fmt: skip

    return impl


_EMU_CASES = {
    # name: (dim, dtype, deterministic, variant, dropout p, config overrides)
    "atomic_d64_rab1": (64, torch.bfloat16, False, 0, 0.0, dict(rab_kind="one", rab_grad=True)),
    "atomic_d256_onepass_ctx_tgt_rabH": (256, torch.float16, False, 0, 0.0, dict(
        rab_kind="heads", rab_grad=True, num_targets=[0, 1, 20, 9, 64], num_contexts=[0, 0, 5, 3, 12])),
    "atomic_d32_dropout_noncausal": (32, torch.float16, False, 0, 0.3, dict(causal=False, window=30)),
    "atomic_d128_8warps_window": (128, torch.bfloat16, False, 8, 0.0, dict(window=17, num_targets=[0, 1, 20, 9, 64],
                                                                          group=4)),
    "atomic_d256_twopass": (256, torch.bfloat16, False, 2, 0.0, dict(rab_kind="one", rab_grad=True)),
    "split_d128_rab1_dropout": (128, torch.bfloat16, True, 0, 0.5, dict(rab_kind="one", rab_grad=True)),
}


@pytest.mark.parametrize("case", list(_EMU_CASES))
def test_cpu_emulated_kernels_parity(emulator, case):
    """Forward and every gradient of the emulated kernels against the fp32 reference (parity rule), both backward
    paths (atomic dq incl. the one-pass head-dim-256 kernel and the benchmark-knob variants; split)."""
    from hstu.testing.parity import attention_parity
    from hstu.ops.hstu_attention import cuda

    dim, dtype, det, variant, p, extra = _EMU_CASES[case]
    lengths = [0, 1, 77, 130, 100]
    cfg = dict(seed=70_000 + len(case), dtype=dtype, dim=dim, heads=2, lengths=lengths, max_seqlen=131, causal=True,
               window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="none", rab_grad=False,
               alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    cfg.update(extra)
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg, device="cpu")
    kwargs = dict(alpha=cfg["alpha"], causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc,
                  num_targets=nt, target_group_size=cfg["group"])  # fmt: skip
    if p > 0:
        mask = cuda.dropout_keep_mask_reference(77, len(lengths), cfg["heads"], cfg["max_seqlen"], p)
        kwargs.update(dropout_p=p, dropout_mask=mask)
    attention_parity(q, k, v, offsets, cfg["max_seqlen"], impl=_emu_impl(emulator, det, variant), rab=rab,
                     rab_requires_grad=cfg["rab_grad"], **kwargs)  # fmt: skip


def _emu_plan(emu, direction, head_dim, batch, heads, max_seqlen, *, bf16=True, rab=False, drab=False, dropout=False,
              deterministic=False, sm90_device=True, variant=None, rab_tables=False):  # fmt: skip
    """heuristics.h's plan (through the emulation library) as (sm90, kernel, persistent / atomic dq, sched_group)."""
    import ctypes

    from hstu.ops.hstu_attention import cuda

    v = variant or cuda.KernelVariant()
    choice = {None: -1, False: 0, True: 1}
    problem = (ctypes.c_int * 9)(head_dim, batch, heads, max_seqlen, bf16, rab or rab_tables, drab, dropout,
                                 rab_tables)  # fmt: skip
    options = (ctypes.c_int * 9)(deterministic, v.sm90_forward, v.sm90_backward, v.forward_warp_specialized,
                                 choice[v.forward_two_per_sm], v.forward_persistent, choice[v.grouped_schedule],
                                 v.bench_bwd_warps, v.bench_d256_two_pass)  # fmt: skip
    out = (ctypes.c_int * 4)()
    emu.emu_plan(int(direction == "backward"), problem, options, int(sm90_device), out)
    return tuple(out)


# Sm90FwdKernel and Sm80DkDv (heuristics.h) as the plan reports them
_PING_PONG, _TWO_PER_SM, _SINGLE_ROLE = 0, 1, 2
_ONE_PASS, _SPLIT_HEAD_DIM, _TWO_PASS, _EIGHT_WARPS = 0, 1, 2, 3


def test_cpu_heuristics_pick_the_measured_kernels(emulator):
    """heuristics.h's rules, each at both sides of its threshold: the Hopper forward only without dropout on an sm_90
    device; two blocks per SM up to 256 tokens at head dims 64 / 128; persistent at 64 / 128 only, warp-specialized
    only; the Hopper backward only on the atomic path without dropout or rab gradient; the sm80 dk/dv shape per head
    dim; the grouped launch order for launches of at most 1024 tiles and backwards over 2048+ tokens."""
    from hstu.ops.hstu_attention import cuda

    V = cuda.KernelVariant
    plan = functools.partial(_emu_plan, emulator)
    # 512 tiles: grouped, 85 pairs (12 bytes x 256 x 128 per pair in 32 MB)
    assert plan("forward", 128, 64, 4, 256) == (1, _TWO_PER_SM, 1, 85)
    assert plan("forward", 128, 64, 4, 257)[:3] == (1, _PING_PONG, 1)
    assert plan("forward", 256, 64, 4, 100)[:3] == (1, _PING_PONG, 0)
    assert plan("forward", 32, 64, 4, 100)[0] == 0
    assert plan("forward", 128, 8, 4, 100, dropout=True)[0] == 0
    assert plan("forward", 128, 8, 4, 100, sm90_device=False)[0] == 0
    assert plan("forward", 128, 8, 4, 100, variant=V(sm90_forward=False))[0] == 0
    # bias tables: only the sm80-style kernels read them, in both directions
    assert plan("forward", 128, 8, 4, 100, rab_tables=True)[0] == 0
    assert plan("backward", 128, 8, 4, 100, rab_tables=True)[:3] == (0, _ONE_PASS, 1)
    assert plan("backward", 256, 8, 4, 100, rab_tables=True, sm90_device=True)[:3] == (0, _SPLIT_HEAD_DIM, 1)
    assert plan("forward", 128, 8, 4, 100, variant=V(forward_warp_specialized=False))[:3] == (1, _SINGLE_ROLE, 0)
    assert plan("forward", 64, 8, 4, 4096, variant=V(forward_two_per_sm=True))[:3] == (1, _TWO_PER_SM, 1)
    assert plan("forward", 256, 8, 4, 100, variant=V(forward_two_per_sm=True))[:3] == (1, _PING_PONG, 0)
    assert plan("forward", 128, 8, 4, 100, variant=V(forward_persistent=False))[:3] == (1, _TWO_PER_SM, 0)
    # launch order: 32 x 4 pairs of 4096 tokens = 4096 forward tiles (pair after pair), backward grouped by 5 pairs
    # (12 bytes x 4096 x 128 per pair in 32 MB); 1024 tiles or fewer: grouped
    assert plan("forward", 128, 32, 4, 4096)[3] == 1
    assert plan("backward", 128, 32, 4, 4096)[3] == 5
    assert plan("forward", 128, 8, 4, 4096)[3] == 5  # 8 x 4 x 32 = 1024 tiles
    assert plan("forward", 128, 64, 4, 1024)[3] == 1  # 2048 tiles, 1024 tokens
    assert plan("backward", 128, 64, 4, 1024)[3] == 1
    assert plan("forward", 128, 32, 4, 4096, variant=V(grouped_schedule=True))[3] == 5
    assert plan("backward", 128, 8, 4, 4096, variant=V(grouped_schedule=False))[3] == 1
    # backward
    assert plan("backward", 128, 8, 4, 100)[:3] == (1, _ONE_PASS, 1)
    assert plan("backward", 256, 8, 4, 100)[:3] == (1, _ONE_PASS, 1)
    for kwargs in (dict(drab=True, rab=True), dict(dropout=True), dict(sm90_device=False), dict(deterministic=True)):
        assert plan("backward", 128, 8, 4, 100, **kwargs)[0] == 0, kwargs
    assert plan("backward", 128, 8, 4, 100, variant=V(sm90_backward=False)) == (0, _ONE_PASS, 1, 1)
    assert plan("backward", 128, 8, 4, 100, deterministic=True)[1:3] == (_ONE_PASS, 0)
    assert plan("backward", 256, 8, 4, 100, sm90_device=False)[1:3] == (_SPLIT_HEAD_DIM, 1)
    assert plan("backward", 256, 8, 4, 100, deterministic=True)[1:3] == (_TWO_PASS, 0)
    # benchmark variants (the emulation library compiles them)
    bench = V(sm90_backward=False, bench_bwd_warps=8, bench_d256_two_pass=True)
    assert plan("backward", 128, 8, 4, 100, variant=bench)[1] == _EIGHT_WARPS
    for kwargs in (dict(bf16=False), dict(rab=True), dict(dropout=True), dict(deterministic=True)):
        assert plan("backward", 128, 8, 4, 100, variant=bench, **kwargs)[1] == _ONE_PASS, kwargs
    assert plan("backward", 256, 8, 4, 100, variant=bench)[1:3] == (_TWO_PASS, 1)


@settings(max_examples=300, deadline=None)
@given(direction=st.sampled_from(["forward", "backward"]), head_dim=st.sampled_from([32, 64, 128, 256]),
       batch=st.integers(0, 300), heads=st.integers(1, 16), max_seqlen=st.integers(0, 20000),
       flags=st.tuples(*[st.booleans()] * 7), tri=st.tuples(*[st.sampled_from([None, False, True])] * 2),
       bools=st.tuples(*[st.booleans()] * 4))  # fmt: skip
def test_cpu_heuristics_plans_are_consistent(emulator, direction, head_dim, batch, heads, max_seqlen, flags, tri,
                                             bools):  # fmt: skip
    """Whatever the problem and the variant: a Hopper plan only where its kernel exists and the call allows it, the
    two-per-SM shape and the persistent kernel only at head dims 64 / 128 on the warp-specialized kernel, sched_group
    between 1 and the number of (sequence, head) pairs, the atomic-dq path exactly when deterministic is off."""
    from hstu.ops.hstu_attention import cuda

    bf16, rab, drab, dropout, deterministic, sm90_device, _ = flags
    drab = drab and rab
    variant = cuda.KernelVariant(sm90_forward=bools[0], sm90_backward=bools[1], forward_warp_specialized=bools[2],
                                 forward_persistent=bools[3], forward_two_per_sm=tri[0], grouped_schedule=tri[1])
    sm90, kernel, third, group = _emu_plan(
        emulator, direction, head_dim, batch, heads, max_seqlen, bf16=bf16, rab=rab, drab=drab, dropout=dropout,
        deterministic=deterministic, sm90_device=sm90_device, variant=variant)  # fmt: skip
    assert 1 <= group <= max(1, batch * heads)
    if not sm90:
        assert group == 1
    if direction == "forward":
        allowed = sm90_device and head_dim != 32 and not dropout and variant.sm90_forward
        assert sm90 == allowed
        if sm90:
            assert kernel in (_PING_PONG, _TWO_PER_SM, _SINGLE_ROLE)
            assert (kernel == _SINGLE_ROLE) == (not variant.forward_warp_specialized)
            assert kernel != _TWO_PER_SM or head_dim <= 128
            assert third == (kernel != _SINGLE_ROLE and head_dim <= 128 and variant.forward_persistent)
            if variant.grouped_schedule is not None:
                assert (group > 1) <= variant.grouped_schedule
    else:
        assert third == (not deterministic)
        allowed = sm90_device and head_dim != 32 and not dropout and not drab and not deterministic
        assert sm90 == (allowed and variant.sm90_backward)
        if not sm90:
            assert kernel == (_SPLIT_HEAD_DIM if head_dim == 256 and not deterministic else
                              _TWO_PASS if head_dim == 256 else _ONE_PASS)  # fmt: skip


# Non-finite entries on the emulated kernels (issue 20): one poisoned entry per (sequence, head) slot, so no product
# has two non-finite factors. (tensor, sequence, head, row in the sequence, column, value). Under the causal mask a
# poisoned key / value is seen by the rows at or after it and hidden from those before it inside the same tiles; a
# poisoned query / dO row reaches the keys at or before it and not those after.
_POISONS = [("k", 3, 0, 100, 5, float("nan")), ("v", 3, 1, 90, 7, float("inf")), ("q", 4, 0, 40, 3, float("-inf")),
            ("dout", 4, 1, 70, 9, float("nan")), ("v", 2, 0, 50, 2, float("-inf")), ("k", 2, 1, 60, 11, float("inf"))]
_NONFINITE_CASES = {
    # name: (dim, dtype, deterministic, variant, dropout p, extra call arguments)
    "atomic_d64_bf16": (64, torch.bfloat16, False, 0, 0.0, {}),
    "split_d64_fp16_window": (64, torch.float16, True, 0, 0.0, dict(window_size=40)),
    "split_d32_bf16_dropout": (32, torch.bfloat16, True, 0, 0.3, {}),
}


def _nonfinite_pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.isnan(t).to(torch.int8) + 2 * torch.isposinf(t).to(torch.int8) + 3 * torch.isneginf(t).to(torch.int8)


@pytest.mark.parametrize("case", list(_NONFINITE_CASES))
def test_cpu_emulated_kernels_select_nonfinite_entries(emulator, case):
    """A NaN / inf in k, v, q or dO reaches exactly the outputs and gradients the fp32 reference says it reaches
    (same NaN / +inf / -inf pattern: rows that see it get what IEEE arithmetic gives, rows and keys that do not see it
    stay finite), and every other entry equals the emulated kernels' result on the clean inputs bit for bit."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.reference import hstu_attention_reference

    dim, dtype, det, variant, p, extra = _NONFINITE_CASES[case]
    lengths = [0, 1, 77, 130, 100]
    n = max(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    g = torch.Generator().manual_seed(20 + dim)
    q, k, v, dout = (torch.randn(int(offsets[-1]), 2, dim, generator=g).to(dtype) for _ in range(4))
    kwargs = dict(alpha=1.0 / math.sqrt(dim), causal=True, **extra)
    mask = None
    if p > 0:
        mask = cuda.dropout_keep_mask_reference(77, len(lengths), 2, n, p)
    emu = _emu_impl(emulator, det, variant)

    def run(tensors, fn, dt):
        leaves = [t.to(dt).requires_grad_(True) for t in tensors[:3]]
        drop = dict(dropout_p=p, dropout_mask=mask) if p > 0 else {}
        out = fn(*leaves, offsets, n, **kwargs, **drop)
        return [out.detach(), *torch.autograd.grad(out, leaves, tensors[3].to(dt))]

    poisoned = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "dout": dout.clone()}
    for name, b, h, row, col, value in _POISONS:
        poisoned[name][int(offsets[b]) + row, h, col] = value
    poisoned = [poisoned[name] for name in ("q", "k", "v", "dout")]
    clean = run([q, k, v, dout], emu, dtype)
    got = run(poisoned, emu, dtype)
    want = run(poisoned, hstu_attention_reference, torch.float32)
    for what, c, x, r in zip(("out", "dq", "dk", "dv"), clean, got, want):
        pattern, expected = _nonfinite_pattern(x), _nonfinite_pattern(r)
        wrong = (pattern != expected).nonzero().tolist()
        assert not wrong, f"{what}: non-finite pattern differs from the reference at {len(wrong)} entries, e.g. " + \
            ", ".join(f"{tuple(e)}: {int(pattern[tuple(e)])} (want {int(expected[tuple(e)])})" for e in wrong[:6])
        finite = pattern == 0
        assert torch.equal(x[finite], c[finite]), f"{what}: finite entries differ from the clean run"


# Relative bias tables (issue 25) on the emulated kernels: the table kernels of the rab units against the fp32
# reference (outputs and table gradients) under the parity rule.
_TABLE_DIVISOR = 0.301


def _off_bucket_edges(times: list[int], extra: int | None = None) -> tuple[list[int], int | None]:
    """Times (one sequence) nudged so that no gap |t_a - t_b| lies within 1e-4 of a bucket edge of ln|dt| / divisor:
    float32 logf here and torch's log there may round an exact edge to different sides."""

    def near_edge(dt):
        if abs(dt) <= 1:
            return False
        f = math.log(abs(dt)) / _TABLE_DIVISOR
        return abs(f - round(f)) < 1e-4 * max(1.0, f)

    fixed: list[int] = []
    for t in [*times, *([] if extra is None else [extra])]:
        while any(near_edge(t - u) for u in fixed):
            t += 1
        fixed.append(t)
    return (fixed[: len(times)], None if extra is None else fixed[-1])


_TABLE_CASES = {
    # name: (dim, dtype, deterministic, variant, dropout p, table_hist, table options)
    "atomic_d64_bf16_query_shared_positions": (64, torch.bfloat16, False, 0, 0.0, 1, dict(
        reference="query", per_head_time=True, per_head_pos=False, shared=[0, 1, 20, 9],
        num_targets=[0, 1, 20, 9], num_contexts=[0, 0, 5, 3])),
    "split_d32_fp16_next_dropout": (32, torch.float16, True, 0, 0.3, 1, dict(
        reference="next", next_timestamps=True, per_head_time=False, per_head_pos=True)),
    "atomic_d256_onepass_next_global_atomics": (256, torch.bfloat16, False, 0, 0.0, 0, dict(
        reference="next", next_timestamps=False, per_head_time=True, per_head_pos=True, position=False,
        window=40)),
    "atomic_d128_fp16_position_only": (128, torch.float16, False, 0, 0.0, 1, dict(
        time=False, per_head_pos=False, shared=[0, 0, 3, 70], causal=False)),
}


def _table_inputs(dim, dtype, opts, seed):
    """q, k, v, dout, int32 offsets, n, tables (fp32, CPU), mask keywords."""
    from hstu.ops.hstu_attention import RelativeBiasTables

    lengths = [0, 1, 45, 70]
    heads, n = 2, max(lengths)
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    total = int(offsets[-1])
    q, k, v, dout = (torch.randn(total, heads, dim, generator=g).to(dtype) for _ in range(4))
    times, next_times = [], []
    for b, length in enumerate(lengths):
        # gaps from 0 (equal times) to huge (clamped to the last bucket), and decreasing stretches
        gaps = (torch.rand(length, generator=g) * 16).exp().long() * torch.randint(-1, 3, (length,), generator=g)
        seq = (10**9 + gaps.cumsum(0)).tolist()
        seq, nxt = _off_bucket_edges(seq, (seq[-1] if seq else 10**9) + 7919 * (b + 1))
        times += seq
        next_times.append(nxt)
    time_w = pos_w = timestamps = next_ts = shared = None
    if opts.get("time", True):
        time_w = torch.randn((heads, 21) if opts["per_head_time"] else (21,), generator=g)
        timestamps = torch.tensor(times, dtype=torch.int64)
        if opts["reference"] == "next" and opts.get("next_timestamps"):
            next_ts = torch.tensor(next_times, dtype=torch.int64)
    if opts.get("position", True):
        pos_w = torch.randn((heads, 2 * 50 - 1) if opts["per_head_pos"] else (2 * 50 - 1,), generator=g)
        if opts.get("shared") is not None:
            shared = torch.tensor(opts["shared"], dtype=torch.int32)
    tables = RelativeBiasTables(pos_w, time_w, timestamps, opts.get("reference", "query"), next_ts, shared,
                                _TABLE_DIVISOR)  # fmt: skip
    i32 = lambda x: None if x is None else torch.tensor(x, dtype=torch.int32)  # noqa: E731
    masks = dict(causal=opts.get("causal", True), window_size=opts.get("window", -1),
                 num_targets=i32(opts.get("num_targets")), num_contexts=i32(opts.get("num_contexts")))  # fmt: skip
    return q, k, v, dout, offsets, n, tables, masks


def _emu_table_run(emu, q, k, v, dout, offsets, n, tables, masks, *, alpha, deterministic, variant, table_hist, p,
                   seed=77):  # fmt: skip
    """out, dq, dk, dv, d position_weights, d time_weights (fp32) of the emulated table kernels, the tables packed
    as the binding packs them."""

    def args():
        a = _args_for(q, k, v, offsets, n, alpha, n, masks["causal"], masks["window_size"], masks["num_contexts"],
                      masks["num_targets"], 1, None, p, seed, variant)  # fmt: skip
        t = tables
        a.pos_w, a.time_w, a.timestamps = map(_ptr, (t.position_weights, t.time_weights, t.timestamps))
        a.next_timestamps, a.shared_positions = _ptr(t.next_timestamps), _ptr(t.shared_positions)
        if t.position_weights is not None:
            a.pos_heads = 1 if t.position_weights.dim() == 1 else t.position_weights.shape[0]
            a.pos_size = t.position_weights.shape[-1]
        if t.time_weights is not None:
            a.time_heads = 1 if t.time_weights.dim() == 1 else t.time_weights.shape[0]
            a.time_buckets = t.time_weights.shape[-1] - 1
        a.time_next, a.time_divisor, a.table_hist = int(t.time_reference == "next"), t.time_divisor, table_hist
        return a

    out = torch.full_like(q, float("nan"))
    a = args()
    a.out = _ptr(out)
    emu.emu_fwd(ctypes.byref(a))
    dq, dk, dv = (torch.full_like(q, float("nan")) for _ in range(3))
    grads = [None if w is None else torch.zeros(w.shape) for w in (tables.position_weights, tables.time_weights)]
    acc = None if deterministic else torch.zeros(q.shape, dtype=torch.float32)
    a = args()
    a.dout, a.dq, a.dk, a.dv, a.dq_accum = map(_ptr, (dout, dq, dk, dv, acc))
    a.dpos, a.dtime = map(_ptr, grads)
    emu.emu_bwd(ctypes.byref(a))
    return [out, dq, dk, dv, *grads]


@pytest.mark.parametrize("case", list(_TABLE_CASES))
def test_cpu_emulated_table_kernels_parity(emulator, case):
    """The table kernels (bias from the position / time-bucket tables and per-token timestamps, table gradients by
    shared-memory histogram or global atomics) against the fp32 reference with the same tables, parity rule for the
    output, dq, dk, dv and both table gradients: both time references (with and without next_timestamps), shared
    positions, per-head and shared tables, contexts / targets / window, empty and length-1 sequences, both backward
    paths and dropout."""
    from hstu.ops.hstu_attention import cuda, hstu_attention_reference
    from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity

    dim, dtype, det, variant, p, table_hist, opts = _TABLE_CASES[case]
    q, k, v, dout, offsets, n, tables, masks = _table_inputs(dim, dtype, opts, seed=sum(map(ord, case)))
    alpha = 1.0 / math.sqrt(dim)
    got = _emu_table_run(emulator, q, k, v, dout, offsets, n, tables, masks, alpha=alpha, deterministic=det,
                         variant=variant, table_hist=table_hist, p=p)  # fmt: skip
    drop = {}
    if p > 0:
        drop = dict(dropout_p=p, dropout_mask=cuda.dropout_keep_mask_reference(77, 4, q.shape[1], n, p))

    def reference(dt, table_dt, **kw):
        leaves = [t.float().to(dt).requires_grad_() for t in (q, k, v)]
        weights = {name: getattr(tables, name).to(table_dt).requires_grad_() for name in ("position_weights",
                   "time_weights") if getattr(tables, name) is not None}  # fmt: skip
        out = hstu_attention_reference(*leaves, offsets.long(), n, alpha=alpha, rab_tables=tables._replace(**weights),
                                       **masks, **drop, **kw)  # fmt: skip
        named = [weights.get("position_weights"), weights.get("time_weights")]
        grads = torch.autograd.grad(out, leaves + [w for w in named if w is not None], dout.to(dt))
        table_grads = iter(grads[3:])
        return [out.detach(), *grads[:3], *(None if w is None else next(table_grads) for w in named)]

    want = reference(torch.float32, torch.float32)
    low = reference(dtype, dtype, upcast=False)
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "d position_weights", "d time_weights"), got, want, low):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite entries (unwritten?)"
        assert_parity(name, a, b, c.to(a.dtype), factor=FORWARD_FACTOR if name == "out" else BACKWARD_FACTOR)


def test_cpu_emulated_deterministic_table_grads_are_fixed_order_sums(emulator):
    """The deterministic backward's table gradients (per-warp histograms whose lanes add in a fixed order, one slot per
    16-key block, summed slot after slot by the dq kernel): the histograms in shared memory (table_hist=1) and in the
    global slots (table_hist=0) give bitwise-equal results, every output bitwise equal between the two runs, and the
    parity rule against the fp32 reference holds (per-head time table, shared position table, targets, shared
    positions, "next" time reference)."""
    from hstu.ops.hstu_attention import hstu_attention_reference
    from hstu.testing.parity import BACKWARD_FACTOR, assert_parity

    opts = dict(reference="next", next_timestamps=True, per_head_time=True, per_head_pos=False, shared=[0, 1, 6, 9],
                num_targets=[0, 1, 6, 9], num_contexts=[0, 0, 2, 3])  # fmt: skip
    q, k, v, dout, offsets, n, tables, masks = _table_inputs(32, torch.bfloat16, opts, seed=25)
    runs = [_emu_table_run(emulator, q, k, v, dout, offsets, n, tables, masks, alpha=0.3, deterministic=True,
                           variant=0, table_hist=hist, p=0.0) for hist in (1, 0)]  # fmt: skip
    for name, a, b in zip(("out", "dq", "dk", "dv", "d position_weights", "d time_weights"), *runs):
        assert torch.equal(a, b), f"{name}: shared-memory and global histograms differ"
    weights = [w.clone().requires_grad_() for w in (tables.position_weights, tables.time_weights)]
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    low = [w.to(torch.bfloat16).requires_grad_() for w in weights]
    grads = []
    for ws, xs, kw in ((weights, leaves, {}), (low, [t.detach().requires_grad_() for t in (q, k, v)],
                                               dict(upcast=False))):  # fmt: skip
        t = tables._replace(position_weights=ws[0], time_weights=ws[1])
        out = hstu_attention_reference(*xs, offsets.long(), n, alpha=0.3, rab_tables=t, **masks, **kw)
        grads.append(torch.autograd.grad(out, ws, dout.to(out.dtype)))
    for name, a, b, c in zip(("d position_weights", "d time_weights"), runs[0][4:], *grads):
        assert torch.isfinite(a).all(), f"{name}: non-finite entries (unwritten?)"
        assert_parity(name, a, b, c.to(a.dtype), factor=BACKWARD_FACTOR)

# The cached forward (issue 26; csrc/hstu_attention/cached.h): new rows against cached keys / values plus their own,
# the keys read from the cache and the new rows (no concatenated copy), the masks at absolute positions.
def _emu_cached(emu, q, k, v, delta_offsets, cached_k, cached_v, cache_offsets, *, alpha, scaling_seqlen,
                window_size=-1, num_contexts=None, num_targets=None, target_group_size=1, rab=None, page_table=None,
                page_size=0):  # fmt: skip
    """cached_hstu_attention on the emulated cached forward kernel (CPU tensors of one 16-bit dtype; with
    page_table, cached_k / cached_v are pools of pages of page_size rows)."""
    i32 = lambda t: None if t is None else t.to(torch.int32).contiguous()  # noqa: E731
    delta_offsets, cache_offsets = i32(delta_offsets), i32(cache_offsets)
    num_contexts, num_targets = i32(num_contexts), i32(num_targets)
    rab = None if rab is None else rab.to(q.dtype).contiguous()
    q, k, v, cached_k, cached_v = (t.contiguous() for t in (q, k, v, cached_k, cached_v))
    n_new = int((delta_offsets[1:] - delta_offsets[:-1]).max()) if delta_offsets.numel() > 1 else 0
    out = torch.full_like(q, float("nan"))
    a = _args_for(q, k, v, delta_offsets, n_new, alpha, scaling_seqlen, True, window_size, num_contexts, num_targets,
                  target_group_size, rab, 0.0, 0, 0)  # fmt: skip
    a.out, a.k_cache, a.v_cache, a.cache_offsets = map(_ptr, (out, cached_k, cached_v, cache_offsets))
    if page_table is not None:
        page_table = i32(page_table)
        a.page_table, a.page_table_stride = _ptr(page_table), page_table.shape[1]
        a.page_shift = page_size.bit_length() - 1
    if q.numel():
        emu.emu_fwd_cached(ctypes.byref(a))
    return out


def _cached_problem(p):
    """(kernel on the emulator, fp32 cached reference, same-dtype full-recompute rows) of the problem p (the keys of
    tests/inference/test_cached_attention.problems)."""
    from hstu.ops.cached_attention import cached_attention_reference
    from tests.inference.test_cached_attention import _cached, _full

    return (lambda emu: _cached(p, p["dtype"], functools.partial(_emu_cached, emu)),
            _cached(p, torch.float32, cached_attention_reference), _full(p, p["dtype"], False))


_CACHED_EMU_CASES = {
    # empty and length-1 caches and deltas, a key tile across the cache end, M-FALCON candidates, per-head rab
    "d64_bf16_falcon_rabH": dict(dim=64, dtype=torch.bfloat16, cache=[0, 1, 150, 37, 0], delta=[0, 1, 40, 130, 3],
                                 targets=[0, 1, 40, 20, 3], contexts=None, group=1, window=-1, rab="heads"),
    # contexts, target groups, a window, a one-head rab, head dim 256 (64-row query tiles)
    "d256_fp16_ctx_groups_window": dict(dim=256, dtype=torch.float16, cache=[70, 5, 0], delta=[66, 1, 9],
                                        targets=[12, 0, 9], contexts=[3, 6, 0], group=3, window=20, rab=1),
}


@pytest.mark.parametrize("case", list(_CACHED_EMU_CASES))
def test_cpu_emulated_cached_forward_parity(emulator, case):
    """The cached forward against the fp32 cached reference under the parity rule (bound from the same-dtype full
    recompute's rows), with NaN-poisoned outputs: every new row is written."""
    p = dict(_CACHED_EMU_CASES[case], heads=2, seed=sum(map(ord, case)))
    run, want, low = _cached_problem(p)
    got = run(emulator)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert_parity_cached(got, want, low)


def assert_parity_cached(got, want, low):
    from hstu.testing.parity import FORWARD_FACTOR, assert_parity

    # floor: one rounding of the output's own dtype (a single output row can leave the same-dtype error near 0)
    floor = torch.finfo(got.dtype).eps * max(float(want.abs().max()) if want.numel() else 0.0, 1e-3)
    assert_parity("cached out", got.float(), want, low.float(), factor=FORWARD_FACTOR, abs_floor=floor)


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(1, 3), data=st.data())
def test_cpu_emulated_cached_forward_random(emulator, batch, data):
    """Randomized cache lengths (0..160), new-row counts (0..48 with 0 and 1 likely), targets with group sizes 1-3,
    contexts, windows and rab, head dims 32 / 64 / 128, both dtypes: the parity rule against the fp32 reference."""
    cache = [data.draw(st.integers(0, 160)) for _ in range(batch)]
    delta = [data.draw(st.sampled_from([0, 1, data.draw(st.integers(2, 48))])) for _ in range(batch)]
    targets = [data.draw(st.integers(0, n)) for n in delta]
    contexts = None
    if data.draw(st.booleans()):
        contexts = [data.draw(st.integers(0, min(8, c + n - t))) for c, n, t in zip(cache, delta, targets)]
    p = dict(cache=cache, delta=delta, targets=targets, contexts=contexts, heads=data.draw(st.integers(1, 2)),
             group=data.draw(st.sampled_from([1, 1, 2, 3])), window=data.draw(st.sampled_from([-1, -1, 0, 25])),
             dim=data.draw(st.sampled_from([32, 64, 128])), rab=data.draw(st.sampled_from([None, 1, "heads"])),
             dtype=data.draw(st.sampled_from([torch.bfloat16, torch.float16])), seed=data.draw(st.integers(0, 9999)))
    if sum(delta) == 0:
        return
    run, want, low = _cached_problem(p)
    got = run(emulator)
    assert torch.isfinite(got).all()
    assert_parity_cached(got, want, low)


def test_cpu_emulated_cached_forward_selects_nonfinite_entries(emulator):
    """A NaN / inf in a cached or new value reaches exactly the outputs of the new rows that see it, inside a key tile
    that spans the cache end (cached keys 0-39, new keys 40-69, one 64-key tile): the cached NaN only the first history
    rows (window 30), the new inf only its own candidate (M-FALCON), the cached inf nobody; the non-finite pattern is
    the fp32 reference's and every other output equals the clean run bit for bit."""
    from hstu.ops.cached_attention import cached_attention_reference
    from tests.inference.test_cached_attention import _full_inputs, _offsets, _split

    p = dict(dim=64, cache=[40], delta=[30], heads=1, rab=None, seed=5)
    (q, k, v), _, _ = _full_inputs(p, torch.bfloat16)
    (_, dq), (ck, dk), (cv, dv) = _split(q, p), _split(k, p), _split(v, p)
    kwargs = dict(alpha=0.5, scaling_seqlen=40, window_size=30, num_targets=torch.tensor([24]))
    offsets = (_offsets([30]), _offsets([40]))
    clean = _emu_cached(emulator, dq, dk, dv, offsets[0], ck, cv, offsets[1], **kwargs)
    cv, dv = cv.clone(), dv.clone()
    cv[12, 0, 7] = float("nan")  # key 12: seen by history rows 40-42 only (window 30; the targets start at 46)
    cv[2, 0, 5] = float("inf")  # key 2: outside every new row's window
    dv[10, 0, 3] = float("-inf")  # key 50, a candidate: seen by itself only
    got = _emu_cached(emulator, dq, dk, dv, offsets[0], ck, cv, offsets[1], **kwargs)
    want = cached_attention_reference(dq.float(), dk.float(), dv.float(), offsets[0], ck.float(), cv.float(),
                                      offsets[1], **kwargs)  # fmt: skip
    expected = torch.zeros(got.shape, dtype=torch.bool)
    expected[0:3, 0, 7] = True
    expected[10, 0, 3] = True
    assert torch.equal(_nonfinite_pattern(want) != 0, expected)
    assert torch.equal(_nonfinite_pattern(got), _nonfinite_pattern(want))
    assert torch.equal(got[~expected], clean[~expected])


from hstu.ops.cached_attention import cached_attention_reference  # noqa: E402
from tests.inference.test_cached_attention import _cached  # noqa: E402  (outside the @given test below)


def _page_layout(lengths, page_size, pages_per_seq, generator):
    """A page table (B, pages_per_seq) int32 over a shuffled pool (a sequence's pages out of order, two spare pages,
    unused slots -1), the pool's page count and the pool row of every cached row in jagged order."""
    used = [(n + page_size - 1) // page_size for n in lengths]
    num_pages = sum(used) + 2
    order = iter(torch.randperm(num_pages, generator=generator).tolist())
    table = torch.full((len(lengths), pages_per_seq), -1, dtype=torch.int32)
    for b, count in enumerate(used):
        table[b, :count] = torch.tensor([next(order) for _ in range(count)], dtype=torch.int32)
    rows = [int(table[b, r // page_size]) * page_size + r % page_size for b, n in enumerate(lengths) for r in range(n)]
    return table, num_pages, torch.tensor(rows, dtype=torch.int64)


def _to_pool(cached, rows, num_pages, page_size):
    """The jagged cached rows placed at their pool rows; every other pool row (spare pages, page tails) is NaN."""
    pool = torch.full((num_pages * page_size, *cached.shape[1:]), float("nan"), dtype=cached.dtype)
    pool[rows] = cached
    return pool


@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no slow shrinking
@given(batch=st.integers(1, 3), data=st.data())
def test_cpu_emulated_paged_cached_forward(emulator, batch, data):
    """The paged cached forward (cached.h's kPaged CachedRows): every user's cache spread over pages of 16, 32 or 64
    rows of a shuffled pool (spare pages and page tails NaN, so a read outside the page table shows), users with 0, 1
    or many pages: the outputs equal the contiguous cached forward's bit for bit (same tiles, same order), and the
    reference gathers the same pages."""
    page_size = data.draw(st.sampled_from([16, 32, 64]))
    cache = [data.draw(st.sampled_from([0, data.draw(st.integers(1, page_size)), data.draw(st.integers(1, 150))]))
             for _ in range(batch)]
    delta = [data.draw(st.sampled_from([1, data.draw(st.integers(2, 40))])) for _ in range(batch)]
    targets = [data.draw(st.integers(0, n)) for n in delta]
    p = dict(cache=cache, delta=delta, targets=targets, contexts=None, heads=data.draw(st.integers(1, 2)),
             group=data.draw(st.sampled_from([1, 2])), window=data.draw(st.sampled_from([-1, 30])),
             dim=data.draw(st.sampled_from([32, 64])), rab=data.draw(st.sampled_from([None, "heads"])),
             dtype=data.draw(st.sampled_from([torch.bfloat16, torch.float16])), seed=data.draw(st.integers(0, 9999)))
    spare_slots = data.draw(st.integers(0, 2))
    pages_per_seq = max((n + page_size - 1) // page_size for n in cache) + spare_slots
    table, num_pages, rows = _page_layout(cache, page_size, pages_per_seq, torch.Generator().manual_seed(p["seed"]))

    def paged(fn):
        def run(q, k, v, delta_offsets, cached_k, cached_v, cache_offsets, **kw):
            pools = (_to_pool(t, rows, num_pages, page_size) for t in (cached_k, cached_v))
            return fn(q, k, v, delta_offsets, *pools, cache_offsets, page_table=table, page_size=page_size, **kw)
        return run

    got = _cached(p, p["dtype"], paged(functools.partial(_emu_cached, emulator)))
    contiguous = _cached(p, p["dtype"], functools.partial(_emu_cached, emulator))
    assert torch.isfinite(got).all()
    assert torch.equal(got, contiguous)  # the contiguous kernel's parity: the tests above
    # the reference reads the same pools through the page table
    assert torch.equal(_cached(p, torch.float32, paged(cached_attention_reference)),
                       _cached(p, torch.float32, cached_attention_reference))
