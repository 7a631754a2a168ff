"""Parity of the fused CUDA HSTU attention kernels against the fp32 reference (2x forward / 5x gradient rule).

Skips without a GPU or without the compiled extension. On GPU: a seeded randomized sweep (HSTU_CUDA_TEST_CONFIGS
configs, default 320) over batch shapes (empty and length-1 sequences, lengths that are no tile multiple, a few
long sequences), heads, head dims, dtypes, every mask combination, rab none / 1-head / H-head with and without
gradient, alpha in {1/sqrt(D), 1}; forward and every gradient. Output buffers are NaN-poisoned before each launch
(HSTU_POISON_OUTPUTS=1) so unwritten elements fail.

Attention dropout: the kernels' keep mask (``cuda.dropout_keep_mask``, a debug kernel evaluating the same device
function) is checked against its PyTorch formulation, and the kernel forward / gradients against the reference
applied with exactly that mask, under the same parity rule. The tests at the end (``test_cpu_*``) run without a GPU:
the Philox known-answer vectors, the PyTorch mask formulation and the Python-side argument plumbing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.ops._extension import load_extension

_NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_NEEDS_EXT = pytest.mark.skipif(load_extension() is None, reason="the hstu CUDA extension is not built")


def gpu_test(fn):
    """Skip without a GPU or without the compiled extension (the CPU tests at the end run everywhere)."""
    return _NEEDS_GPU(_NEEDS_EXT(fn))


NUM_CONFIGS = int(os.environ.get("HSTU_CUDA_TEST_CONFIGS", "320"))
HEAD_DIMS = (32, 64, 128, 256)


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    from hstu.ops.hstu_attention import cuda

    monkeypatch.setenv("HSTU_POISON_OUTPUTS", "1")
    # The kernels' own choice (the default KernelVariant), even if the caller's environment sets a user override.
    with cuda.kernel_variant(cuda.KernelVariant()):
        yield


def _random_config(seed: int) -> dict:
    rng = random.Random(seed)
    dtype = rng.choice([torch.bfloat16, torch.float16])
    dim = HEAD_DIMS[seed % 4] if seed < 16 else rng.choice(HEAD_DIMS)
    long_case = seed % 60 == 59  # a few long sequences
    if long_case:
        max_len = rng.choice([4096, 8192])
        batch = rng.randint(1, 2)
        heads = rng.randint(1, 2)
    else:
        max_len = rng.choice([1, 2, 7, 16, 33, 64, 100, 127, 129, 200, 257, 383, 515, 1000])
        batch = rng.choice([1, 2, 3, 5, 8, 13, 32])
        heads = rng.randint(1, 8)
        while batch * max_len * heads > 40000 and batch > 1:
            batch //= 2
    lengths = [rng.randint(0, max_len) for _ in range(batch)]
    if batch >= 3:
        lengths[0] = 0
        lengths[1] = 1
    lengths[-1] = max_len if rng.random() < 0.7 else max(1, lengths[-1])  # all-empty batches: see test_empty_batch
    causal = rng.random() < 0.8
    window = -1
    if rng.random() < 0.35:
        window = rng.randint(0, max(1, max_len))
    num_contexts = num_targets = None
    group = 1
    if causal:
        if rng.random() < 0.4:
            num_targets = [rng.randint(0, n) for n in lengths]
            group = rng.choice([1, 1, 2, 3, 7])
        if rng.random() < 0.4:
            tg = num_targets or [0] * batch
            num_contexts = [rng.randint(0, min(n - t, 12)) for n, t in zip(lengths, tg)]
    rab_kind = rng.choice(["none", "none", "one", "heads"])
    rab_grad = rab_kind != "none" and rng.random() < 0.6
    alpha = rng.choice([1.0 / math.sqrt(dim), 1.0])
    max_seqlen = max_len + (rng.randint(0, 5) if rng.random() < 0.3 else 0)
    scaling = None if rng.random() < 0.6 else rng.randint(1, 2 * max_seqlen + 1)
    return dict(seed=seed, dtype=dtype, dim=dim, heads=heads, lengths=lengths, max_seqlen=max_seqlen, causal=causal,
                window=window, num_contexts=num_contexts, num_targets=num_targets, group=group, rab_kind=rab_kind,
                rab_grad=rab_grad, alpha=alpha, scaling=scaling)


def _build_inputs(cfg: dict, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1000)
    lengths = torch.tensor(cfg["lengths"], dtype=torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    total, heads, dim = int(offsets[-1]), cfg["heads"], cfg["dim"]
    q, k, v = (torch.randn(total, heads, dim, generator=g).to(device=device, dtype=cfg["dtype"]) for _ in range(3))
    rab = None
    if cfg["rab_kind"] != "none":
        rh = 1 if cfg["rab_kind"] == "one" else heads
        n = cfg["max_seqlen"]
        rab = torch.randn(len(lengths), rh, n, n, generator=g).to(device=device, dtype=cfg["dtype"])
    as_i32 = lambda xs: None if xs is None else torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return q, k, v, offsets.to(device=device, dtype=torch.int32), rab, as_i32(cfg["num_contexts"]), as_i32(
        cfg["num_targets"]
    )


def _describe(cfg: dict) -> str:
    keys = ("seed", "dtype", "dim", "heads", "max_seqlen", "causal", "window", "group", "rab_kind", "rab_grad", "alpha",
            "scaling")  # fmt: skip
    lens = cfg["lengths"]
    return " ".join(f"{k}={cfg[k]}" for k in keys) + f" B={len(lens)} lengths={lens[:8]}{'...' if len(lens) > 8 else ''}" + (
        f" ctx={cfg['num_contexts'][:8]}" if cfg["num_contexts"] else "") + (
        f" tgt={cfg['num_targets'][:8]}" if cfg["num_targets"] else "")  # fmt: skip


def _op_with(deterministic):
    """hstu_attention with an explicit backward mode (None: the op's default; the atomic-dq path in these tests)."""
    from hstu.ops import hstu_attention

    if deterministic is None:
        return hstu_attention
    return lambda *args, **kwargs: hstu_attention(*args, deterministic=deterministic, **kwargs)


def _check_config(cfg: dict, deterministic=None) -> None:
    from hstu.ops.hstu_attention import cuda
    from hstu.testing.parity import attention_parity

    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    assert cuda.unsupported_reason(q, k, v, rab, 0.0) is None, cuda.unsupported_reason(q, k, v, rab, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn: fail instead
        attention_parity(
            q, k, v, offsets, cfg["max_seqlen"], impl=_op_with(deterministic), rab=rab,
            rab_requires_grad=cfg["rab_grad"], alpha=cfg["alpha"],
            scaling_seqlen=cfg["scaling"], causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc,
            num_targets=nt, target_group_size=cfg["group"],
        )  # fmt: skip


@gpu_test
@pytest.mark.parametrize("seed", range(NUM_CONFIGS))
def test_parity_random(seed):
    from hstu.ops.hstu_attention import cuda

    cfg = _random_config(seed)
    # On Hopper, odd seeds run the mma.sync forward (the one Ampere uses), even ones the default wgmma forward.
    # The wgmma backward is the default where it applies (atomic dq, head dim 64 / 128 / 256, no drab, no dropout);
    # seeds 2 mod 4 opt out of it, so the mma.sync atomic-dq backward Ampere uses is swept on Hopper too.
    # Even seeds alternate between the warp-specialized forward's two shapes (head dims 64 / 128): 0 mod 4 two
    # 64-row blocks per SM, 2 mod 4 the 128-row ping-pong block, whatever the length.
    variant = cuda.KernelVariant(sm90_forward=seed % 2 == 0, sm90_backward=seed % 4 != 2,
                                 forward_two_per_sm=seed % 4 == 0)  # fmt: skip
    try:
        with cuda.kernel_variant(variant):
            _check_config(cfg)
    except AssertionError as err:
        raise AssertionError(f"{_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("mask", ["causal", "noncausal", "window", "ctx_tgt", "noncausal_window", "tgt_group_window"])
def test_parity_mask_grid(dim, mask):
    """Every mask family at every head dim, 1-head rab with gradient, odd lengths."""
    lengths = [0, 1, 77, 130, 255]
    n = max(lengths)
    cfg = dict(seed=10_000 + dim + len(mask), dtype=torch.bfloat16, dim=dim, heads=3, lengths=lengths, max_seqlen=n,
               causal=mask not in ("noncausal", "noncausal_window"), window=-1, num_contexts=None, num_targets=None,
               group=1, rab_kind="one", rab_grad=True, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    if "window" in mask:
        cfg["window"] = 17
    if mask in ("ctx_tgt", "tgt_group_window"):
        cfg["num_targets"] = [0, 1, 20, 9, 64]
        cfg["group"] = 1 if mask == "ctx_tgt" else 4
    if mask == "ctx_tgt":
        cfg["num_contexts"] = [0, 0, 5, 3, 12]
    _check_config(cfg)


@gpu_test
@pytest.mark.parametrize("rab_heads", [0, 1, 2])
def test_empty_batch(rab_heads):
    """T = 0 (every sequence empty): output and gradients are empty / zero, nothing is launched out of bounds."""
    from hstu.ops import hstu_attention

    q, k, v = (torch.randn(0, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    offsets = torch.zeros(3, dtype=torch.int32, device="cuda")
    rab = torch.randn(2, rab_heads, 4, 4, device="cuda", requires_grad=True) if rab_heads else None
    out = hstu_attention(q, k, v, offsets, 4, rab=rab)
    assert out.shape == (0, 2, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if rab is not None:
        assert rab.grad is None or bool((rab.grad == 0).all())
    torch.cuda.synchronize()


@gpu_test
@pytest.mark.parametrize("rab_heads", [1, 3])
def test_float32_rab_with_bf16_inputs(rab_heads):
    """rab in float32 next to bf16 q/k/v: the binding casts it for the kernel and returns drab in float32."""
    from hstu.testing.parity import attention_parity

    cfg = dict(seed=4242, dtype=torch.bfloat16, dim=64, heads=3, lengths=[5, 130, 64], max_seqlen=130, causal=True,
               window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="none", rab_grad=False,
               alpha=0.125, scaling=None)  # fmt: skip
    q, k, v, offsets, _, _, _ = _build_inputs(cfg)
    rab = torch.randn(3, rab_heads, 131, 133, device="cuda", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attention_parity(q, k, v, offsets, 130, rab=rab, rab_requires_grad=True, alpha=0.125)


# Jagged batches (empty, length-1, odd lengths) x masks x rab kinds for both backward paths; fp16 on every other case.
_ATOMIC_CASES = {
    "causal_rab1": dict(rab_kind="one", rab_grad=True),
    "ctx_tgt_rabH": dict(rab_kind="heads", rab_grad=True, num_targets=[0, 1, 20, 9, 64, 3],
                         num_contexts=[0, 0, 5, 3, 12, 0]),
    "tgt_group_window_rab1": dict(rab_kind="one", rab_grad=True, window=17, num_targets=[0, 1, 20, 9, 64, 30],
                                  group=4),
    "noncausal_window_norab": dict(rab_kind="none", rab_grad=False, causal=False, window=40),
    "window_rabH_nograd": dict(rab_kind="heads", rab_grad=False, window=5, scaling=97),
}


@gpu_test
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(_ATOMIC_CASES))
def test_atomic_dq_parity(deterministic, dim, case):
    """Atomic-dq backward (deterministic=False) and the split backward (True) against the fp32 reference."""
    lengths = [0, 1, 77, 130, 255, 190]
    idx = list(_ATOMIC_CASES).index(case)
    cfg = dict(seed=60_000 + 10 * dim + idx, dtype=torch.float16 if (idx + dim // 32) % 2 else torch.bfloat16, dim=dim,
               heads=3, lengths=lengths, max_seqlen=max(lengths) + 1, causal=True, window=-1, num_contexts=None,
               num_targets=None, group=1, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    cfg.update(_ATOMIC_CASES[case])
    try:
        _check_config(cfg, deterministic=deterministic)
    except AssertionError as err:
        raise AssertionError(f"deterministic={deterministic} {_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_atomic_dq_parity_dropout(deterministic, dim):
    """Both backward paths with attention dropout (the dq scale carries 1 / (1 - p))."""
    cfg = dict(seed=61_000 + dim, dtype=torch.bfloat16, dim=dim, heads=2, lengths=[0, 1, 77, 130, 255], max_seqlen=255,
               causal=True, window=-1, num_contexts=None, num_targets=[0, 1, 20, 9, 64], group=2, rab_kind="one",
               rab_grad=True, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    try:
        _check_dropout_config(cfg, 0.3, torch_seed=dim, deterministic=deterministic)
    except AssertionError as err:
        raise AssertionError(f"deterministic={deterministic} {_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_atomic_dq_matches_split_path(dim):
    """The atomic path's dk, dv and drab (no atomics there) are bitwise reproducible run to run, its dq differs only
    by the float32 summation order; its dq matches the split path's closely."""
    from hstu.ops import hstu_attention

    cfg = _random_config(11)
    cfg.update(dtype=torch.bfloat16, dim=dim, lengths=[300, 0, 1, 511, 64], max_seqlen=511, rab_kind="one",
               rab_grad=True, heads=4, causal=True, window=-1, num_contexts=None, num_targets=None)  # fmt: skip
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    runs = {}
    for det in (False, False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rab)]
        out = hstu_attention(*leaves[:3], offsets, 511, rab=leaves[3], alpha=cfg["alpha"], deterministic=det)
        out.backward(torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda"
                                 ).to(out.dtype))  # fmt: skip
        runs.setdefault(det, []).append([t.grad.clone() for t in leaves])
    (a, b), (c,) = runs[False], runs[True]
    for name, x, y in zip(("dq", "dk", "dv", "drab"), a, b):
        assert not bool(torch.isnan(x).any()), name
        if name == "dq":
            torch.testing.assert_close(x.float(), y.float(), atol=2e-2, rtol=2e-2)
        else:
            assert torch.equal(x, y), name
    scale = float(c[0].float().abs().max())
    assert float((a[0].float() - c[0].float()).abs().max()) <= 2e-2 * max(scale, 1e-3)


def _sm90_forward_available() -> bool:
    from hstu.ops.hstu_attention import cuda

    return torch.cuda.get_device_capability() == (9, 0) and bool(cuda.build_info().get("sm90_forward"))


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", (64, 128, 256))
def test_sm90_forward_runs_and_matches(dtype, dim):
    """On an sm_90 device the warp-specialized Hopper wgmma forward runs by default (seen in the profiler) and passes the
    parity rule on jagged lengths around its 128-row / 128- or 64-key tiles with rab and targets, and agrees with
    the mma.sync forward of the same inputs to within both kernels' rounding."""
    from torch.profiler import ProfilerActivity, profile

    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    if not _sm90_forward_available():
        pytest.skip("needs an sm_90 device and a build with the sm90 forward units (9.0a in TORCH_CUDA_ARCH_LIST)")
    cfg = dict(seed=20_000 + dim, dtype=dtype, dim=dim, heads=3, lengths=[0, 1, 63, 64, 129, 300, 517],
               max_seqlen=517, causal=True, window=-1, num_contexts=[0, 0, 4, 0, 9, 3, 12],
               num_targets=[0, 1, 10, 0, 33, 50, 64], group=2, rab_kind="heads", rab_grad=False,
               alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    args = AttentionArgs(q, k, v, offsets, 517, cfg["alpha"], 517, True, -1, nc, nt, 2, rab)
    shape = dict(head_dim=dim, batch=len(cfg["lengths"]), heads=3, max_seqlen=517, dtype=dtype, rab=True)
    plan = cuda.kernel_plan("forward", **shape)  # the default
    assert plan["kernel"] in ("sm90_ping_pong", "sm90_two_per_sm"), plan
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out_sm90 = cuda.forward(args)
        torch.cuda.synchronize()
    names = [evt.key for evt in prof.key_averages()]
    assert any(_is_ws_forward(n) for n in names), names
    assert all(any(kernel in n for n in names) for kernel in plan["kernels"]), (plan, names)  # the plan is what ran
    _check_config(cfg)  # forward (sm90) and gradients through the op, 2x / 5x rule against fp32
    sm80 = cuda.KernelVariant(sm90_forward=False)  # opt-out: the mma.sync forward
    assert cuda.kernel_plan("forward", variant=sm80, **shape)["kernel"] == "sm80"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out_sm80 = cuda.forward(args, variant=sm80)
        torch.cuda.synchronize()
    assert not any("hstu_fwd_sm90" in evt.key for evt in prof.key_averages())
    assert not bool(torch.isnan(out_sm90).any())
    scale = float(out_sm80.float().abs().max())
    assert float((out_sm90.float() - out_sm80.float()).abs().max()) <= 2e-2 * max(scale, 1e-3)


def _ws_forward_checks() -> None:
    """Body of test_sm90_ws_forward_matches_single_role_kernel, run in a child process."""
    from torch.profiler import ProfilerActivity, profile

    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    cases = [dict(causal=True, window=-1, num_contexts=[0, 0, 4, 0, 9, 3, 12], num_targets=[0, 1, 10, 0, 33, 50, 64],
                  group=2, rab_kind="heads"),
             dict(causal=False, window=100, num_contexts=None, num_targets=None, group=1, rab_kind="one"),
             dict(causal=True, window=70, num_contexts=None, num_targets=None, group=1, rab_kind="none"),
             # 48 jagged sequences x 3 heads: 864 query tiles, several waves of blocks
             dict(causal=True, window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="one",
                  lengths=[0, 1] + [(37 * i) % 700 + 2 for i in range(46)])]  # fmt: skip
    for dim in (64, 128, 256):
        for dtype in (torch.bfloat16, torch.float16):
            for c, case in enumerate(cases):
                lengths = case.get("lengths", [0, 1, 63, 64, 129, 300, 517])
                cfg = dict(seed=23_000 + dim + 7 * c + (dtype == torch.float16), dtype=dtype, dim=dim, heads=3,
                           max_seqlen=max(lengths), rab_grad=False, alpha=1.0 / math.sqrt(dim), scaling=None,
                           **dict(case, lengths=lengths))  # fmt: skip
                q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
                L = cfg["max_seqlen"]
                args = AttentionArgs(q, k, v, offsets, L, cfg["alpha"], L, cfg["causal"], cfg["window"], nc, nt,
                                     cfg["group"], rab)  # fmt: skip
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    out_single = cuda.forward(args, variant=cuda.KernelVariant(forward_warp_specialized=False))
                    torch.cuda.synchronize()
                names = [evt.key for evt in prof.key_averages()]
                assert any("hstu_fwd_sm90_kernel" in n for n in names), names
                # the default, warp-specialized, in both shapes: ping-pong (128 rows, two consumer warpgroups) and,
                # at head dims 64 / 128, two blocks of 64 rows and 64-key tiles per SM (one consumer warpgroup: the
                # traits' last argument 1)
                for two_per_sm in (False, True) if dim <= 128 else (False,):
                    ws = cuda.KernelVariant(forward_two_per_sm=two_per_sm)
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        out_ws = cuda.forward(args, variant=ws)
                        torch.cuda.synchronize()
                    assert _ws_forward_consumer_warpgroups(prof) == ["1" if two_per_sm else "2"]
                    assert not bool(torch.isnan(out_ws).any()), _describe(cfg)
                    # Per output element the same products summed in the same order (a 128-key tile's k steps are
                    # two 64-key tiles' in a row; a skipped masked tile only adds zeros): bitwise equal to the
                    # single-role wgmma forward.
                    assert torch.equal(out_ws, out_single), (
                        _describe(cfg), two_per_sm, float((out_ws - out_single).abs().max()))
                    if dim <= 128:  # the persistent kernel is the default there: the one-tile-per-block one agrees
                        per_tile = dataclasses.replace(ws, forward_persistent=False)
                        with profile(activities=[ProfilerActivity.CUDA]) as prof:
                            out_per_tile = cuda.forward(args, variant=per_tile)
                            torch.cuda.synchronize()
                        assert any("hstu_fwd_sm90_ws_kernel" in evt.key for evt in prof.key_averages())
                        assert torch.equal(out_per_tile, out_ws), (_describe(cfg), two_per_sm)
                    if c == 0:
                        with cuda.kernel_variant(ws):  # forward (warp-specialized) and gradients through the op
                            _check_config(cfg)


def _persistent_forward_short_items_checks() -> None:
    """Many short work items per persistent block (128 sequences of up to 200 tokens, 128 x 1024 tokens), launched 30
    times: each launch bitwise equal to the one-tile-per-block kernel's output, in both warp-specialized shapes."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    for dim, lengths in ((64, [200] * 127 + [1]), (128, [1024] * 128)):
        cfg = dict(seed=25_000 + dim, dtype=torch.bfloat16, dim=dim, heads=1, lengths=lengths, max_seqlen=max(lengths),
                   causal=True, window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="none",
                   rab_grad=False, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
        q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
        L = cfg["max_seqlen"]
        args = AttentionArgs(q, k, v, offsets, L, cfg["alpha"], L, True, -1, None, None, 1, None, 0.0, 0)
        for two_per_sm in (False, True):
            persistent = cuda.KernelVariant(forward_two_per_sm=two_per_sm)
            expected = cuda.forward(args, variant=dataclasses.replace(persistent, forward_persistent=False))
            outs = [cuda.forward(args, variant=persistent) for _ in range(30)]
            torch.cuda.synchronize()
            assert all(torch.equal(o, expected) for o in outs), (dim, two_per_sm)


def _is_ws_forward(kernel_name: str) -> bool:
    """Whether a profiled kernel is a warp-specialized sm90 forward: the persistent one or the one-tile-per-block one."""
    return "hstu_fwd_sm90_ws_kernel" in kernel_name or "hstu_fwd_sm90_persistent_kernel" in kernel_name


def _ws_forward_consumer_warpgroups(prof) -> list[str]:
    """The consumer-warpgroup count (FwdTraitsSm90's fourth argument) of each warp-specialized forward in a profile."""
    names = [evt.key for evt in prof.key_averages() if _is_ws_forward(evt.key)]
    traits = [re.search(r"FwdTraitsSm90<([^<>]*)>", n) for n in names]
    assert names and all(t is not None for t in traits), names
    return [t.group(1).split(",")[3].strip() for t in traits]


@gpu_test
@pytest.mark.parametrize("dim", (64, 128, 256))
def test_sm90_forward_shape_follows_the_longest_sequence(dim):
    """By default the launcher runs the two-per-SM forward shape (one consumer warpgroup) when no sequence is longer
    than 256 tokens and the head dim has it (64 / 128), the ping-pong shape (two) otherwise (the plan says so and the
    profiler sees it); the two agree bit for bit on the same inputs."""
    from torch.profiler import ProfilerActivity, profile

    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    if not _sm90_forward_available():
        pytest.skip("needs an sm_90 device and a build with the sm90 forward units (9.0a in TORCH_CUDA_ARCH_LIST)")
    for longest in (256, 257):
        cfg = dict(seed=24_000 + dim + longest, dtype=torch.bfloat16, dim=dim, heads=2, lengths=[0, 1, 100, longest],
                   max_seqlen=longest, causal=True, window=-1, num_contexts=None, num_targets=None, group=1,
                   rab_kind="none", rab_grad=False, alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
        q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
        args = AttentionArgs(q, k, v, offsets, longest, cfg["alpha"], longest, True, -1, None, None, 1, None, 0.0, 0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out_default = cuda.forward(args)
            torch.cuda.synchronize()
        expected = "1" if longest <= 256 and dim <= 128 else "2"
        assert _ws_forward_consumer_warpgroups(prof) == [expected], (dim, longest)
        plan = cuda.kernel_plan("forward", head_dim=dim, batch=4, heads=2, max_seqlen=longest)
        assert plan["consumer_warpgroups"] == int(expected), (plan, dim, longest)
        out_other = cuda.forward(args, variant=cuda.KernelVariant(forward_two_per_sm=expected == "2"))
        assert torch.equal(out_default, out_other), (dim, longest, float((out_default - out_other).abs().max()))


@gpu_test
def test_sm90_ws_forward_matches_single_role_kernel():
    """The default sm90 forward is the warp-specialized wgmma kernel (producer warpgroup, mbarrier pipelines) in two
    shapes: ping-pong consumers on 128 rows, and at head dims 64 / 128 two 64-row blocks per SM
    (KernelVariant.forward_two_per_sm forces one), persistent at head dims 64 / 128 (forward_persistent=False: one
    tile per block); forward_warp_specialized=False takes the single-role one (every warpgroup loads and computes).
    All are seen in the profiler and bitwise equal on jagged lengths around their tiles for every head dim, dtype and mask family,
    and pass the parity rule through the op; the persistent kernel also on many short work items, launched
    repeatedly (where its first version deadlocked). It runs in a child process with a time limit, so a pipeline
    deadlock fails this test instead of hanging the suite."""
    import subprocess
    import sys

    if not _sm90_forward_available():
        pytest.skip("needs an sm_90 device and a build with the sm90 forward units (9.0a in TORCH_CUDA_ARCH_LIST)")
    if os.environ.get("HSTU_WS_FORWARD_CHILD") == "1":
        _ws_forward_checks()
        _persistent_forward_short_items_checks()
        return
    env = dict(os.environ, HSTU_WS_FORWARD_CHILD="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::{test_sm90_ws_forward_matches_single_role_kernel.__name__}"]  # fmt: skip
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("warp-specialized forward did not finish within 240 s (pipeline deadlock?)")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]


def _sm90_backward_built() -> bool:
    from hstu.ops.hstu_attention import cuda

    return bool(cuda.build_info().get("sm90_backward"))


def _sm90_backward_available() -> bool:
    return torch.cuda.get_device_capability() == (9, 0) and _sm90_backward_built()


# Jagged lengths around the sm90 backward's 128-key (64 at head dim 256) block / 64-query step, per mask family (rab without gradient:
# a rab gradient keeps the sm80 backward).
_SM90_BWD_CASES = {
    "ctx_tgt_rabH": dict(causal=True, window=-1, num_contexts=[0, 0, 4, 0, 9, 3, 12],
                         num_targets=[0, 1, 10, 0, 33, 50, 64], group=2, rab_kind="heads"),
    "causal_window_rab1": dict(causal=True, window=70, num_contexts=None, num_targets=None, group=1, rab_kind="one",
                               scaling=97),
    "noncausal_window_norab": dict(causal=False, window=100, num_contexts=None, num_targets=None, group=1,
                                   rab_kind="none"),
}


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", (64, 128, 256))
@pytest.mark.parametrize("case", list(_SM90_BWD_CASES))
def test_sm90_backward_runs_and_matches(dtype, dim, case):
    """By default on an sm_90 device the Hopper wgmma backward runs (seen in the profiler) for the atomic-dq path, its
    dq / dk / dv pass the parity rule through the op on jagged lengths around its tiles, and agree with the sm80
    atomic backward's (KernelVariant(sm90_backward=False)) to within both kernels' rounding. A rab gradient or
    deterministic=True keeps the sm80 backward."""
    from torch.profiler import ProfilerActivity, profile

    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    if not _sm90_backward_available():
        pytest.skip("needs an sm_90 device and a build with the sm90 backward units (9.0a in TORCH_CUDA_ARCH_LIST)")
    lengths = [0, 1, 63, 64, 129, 300, 517]
    cfg = dict(seed=21_000 + dim + 7 * list(_SM90_BWD_CASES).index(case) + (dtype == torch.float16), dtype=dtype,
               dim=dim, heads=3, lengths=lengths, max_seqlen=517, rab_grad=False, alpha=1.0 / math.sqrt(dim),
               scaling=None)  # fmt: skip
    cfg.update(_SM90_BWD_CASES[case])
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    dout = torch.randn(q.shape, generator=torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)).to(
        device="cuda", dtype=dtype)  # fmt: skip
    scaling = cfg["scaling"] or cfg["max_seqlen"]

    def run(rab_needs_grad=False, deterministic=False, variant=None):
        args = AttentionArgs(q, k, v, offsets, cfg["max_seqlen"], cfg["alpha"], scaling, cfg["causal"], cfg["window"],
                             nc, nt, cfg["group"], rab, 0.0, 0, deterministic)  # fmt: skip
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            grads = cuda.backward(dout, args, rab_needs_grad, variant=variant)
            torch.cuda.synchronize()
        return grads, [evt.key for evt in prof.key_averages()]

    shape = dict(head_dim=dim, batch=len(lengths), heads=3, max_seqlen=517, dtype=dtype, rab=rab is not None)
    plan = cuda.kernel_plan("backward", **shape)  # the default
    assert plan["kernel"] == "sm90", plan
    g90, names = run()
    assert any("hstu_bwd_sm90" in n for n in names), names
    assert all(any(kernel in n for n in names) for kernel in plan["kernels"]), (plan, names)  # the plan is what ran
    assert not any("hstu_bwd_dkdv_kernel" in n for n in names), names
    try:
        _check_config(cfg)  # forward and gradients through the op (the sm90 backward), 2x / 5x rule against fp32
    except AssertionError as err:
        raise AssertionError(f"sm90 backward {_describe(cfg)}: {err}") from None
    for kwargs in ([dict(deterministic=True)] + ([dict(rab_needs_grad=True)] if rab is not None else [])):
        _, names = run(**kwargs)
        assert not any("hstu_bwd_sm90" in n for n in names), (kwargs, names)
        plan_kwargs = dict(shape, deterministic=kwargs.get("deterministic", False),
                           rab_grad=kwargs.get("rab_needs_grad", False))  # fmt: skip
        assert cuda.kernel_plan("backward", **plan_kwargs)["kernel"] == "sm80", kwargs
    sm80 = cuda.KernelVariant(sm90_backward=False)  # opt-out: the sm80 atomic-dq backward on the same inputs
    assert cuda.kernel_plan("backward", variant=sm80, **shape)["kernel"] == "sm80"
    g80, names = run(variant=sm80)
    assert not any("hstu_bwd_sm90" in n for n in names), names
    for name, a, b in zip(("dq", "dk", "dv"), g90[:3], g80[:3]):
        assert not bool(torch.isnan(a).any()), name
        scale = float(b.float().abs().max())
        err = float((a.float() - b.float()).abs().max())
        assert err <= 2e-2 * max(scale, 1e-3), f"{name}: sm90 vs sm80 max abs diff {err} (scale {scale})"


@gpu_test
@pytest.mark.parametrize("dim", (64, 128, 256))
def test_sm90_grouped_schedule_matches_pair_after_pair(dim):
    """The sm90 kernels' grouped schedule (blocks launched by groups of (sequence, head) pairs, tile-major inside a
    group; KernelVariant(grouped_schedule=True) forces it) against launching pair after pair (False): many pairs, a
    partial last group, jagged lengths with empty and length-1 sequences, contexts and targets. Every output element comes from one
    block in a fixed order, so the forward and dk / dv agree exactly; dq sums the blocks' atomics in another order.
    The grouped order passes the parity rule."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    if not _sm90_backward_available():
        pytest.skip("needs an sm_90 device and a build with the sm90 units (9.0a in TORCH_CUDA_ARCH_LIST)")
    rng = random.Random(41 + dim)
    lengths = [0, 1, 2, 600, 129] + [rng.randint(0, 600) for _ in range(70)]
    contexts = [min(n, rng.randint(0, 20)) for n in lengths]
    targets = [min(n - c, rng.randint(0, 40)) for n, c in zip(lengths, contexts)]
    cfg = dict(seed=41_000 + dim, dtype=torch.bfloat16, dim=dim, heads=3, lengths=lengths, max_seqlen=600,
               rab_grad=False, alpha=1.0 / math.sqrt(dim), scaling=None, causal=True, window=-1, group=1,
               num_contexts=contexts, num_targets=targets, rab_kind="none")  # fmt: skip
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    dout = torch.randn(q.shape, generator=torch.Generator(device="cpu").manual_seed(cfg["seed"] + 1)).to(
        device="cuda", dtype=cfg["dtype"])  # fmt: skip
    args = AttentionArgs(q, k, v, offsets, cfg["max_seqlen"], cfg["alpha"], cfg["max_seqlen"], True, -1, nc, nt, 1,
                         None)  # fmt: skip

    def run():
        return cuda.forward(args), cuda.backward(dout, args)

    shape = dict(head_dim=dim, batch=len(lengths), heads=3, max_seqlen=600)
    with cuda.kernel_variant(grouped_schedule=True):  # the sm90 kernels (the defaults), grouped launch order
        for direction in ("forward", "backward"):
            plan = cuda.kernel_plan(direction, **shape)
            assert plan["kernel"] != "sm80" and plan["sched_group"] > 1, plan
        out, grads = run()
        try:
            _check_config(cfg)
        except AssertionError as err:
            raise AssertionError(f"grouped schedule {_describe(cfg)}: {err}") from None
    with cuda.kernel_variant(grouped_schedule=False):
        assert all(cuda.kernel_plan(d, **shape)["sched_group"] == 1 for d in ("forward", "backward"))
        out_pairs, grads_pairs = run()
    assert torch.equal(out, out_pairs), "forward differs"
    assert torch.equal(grads[1], grads_pairs[1]), "dk differs"
    assert torch.equal(grads[2], grads_pairs[2]), "dv differs"
    scale = float(grads_pairs[0].float().abs().max())
    err = float((grads[0].float() - grads_pairs[0].float()).abs().max())
    assert err <= 1e-2 * max(scale, 1e-3), f"dq: grouped vs pair after pair max abs diff {err} (scale {scale})"


@gpu_test
def test_backward_is_deterministic():
    from hstu.ops import hstu_attention

    cfg = _random_config(7)
    cfg.update(lengths=[300, 511, 64], max_seqlen=511, rab_kind="one", rab_grad=True, heads=4, causal=True)
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rab)]
        out = hstu_attention(*leaves[:3], offsets, 511, rab=leaves[3], alpha=cfg["alpha"], deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([t.grad.clone() for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@gpu_test
@pytest.mark.parametrize("batch, length, heads, dim", [(128, 200, 1, 64), (6, 1000, 2, 128)])
def test_cuda_graph_replays_forward_and_backward(batch, length, heads, dim):
    """Short sequences are host-bound; CUDA graphs are the remedy, so the op must capture (after a warm-up, which
    also fills the index-check cache and the kernel-attribute cache) and its replays must compute on new inputs."""
    from hstu.ops import hstu_attention

    gen = torch.Generator(device="cuda").manual_seed(batch + dim)
    offsets = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")
    targets = torch.randint(0, 20, (batch,), device="cuda", generator=gen, dtype=torch.int32)

    def fresh():
        return [torch.randn(batch * length, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                for _ in range(4)]  # fmt: skip

    def step(q, k, v, grad_out):
        out = hstu_attention(q, k, v, offsets, length, alpha=dim**-0.5, num_targets=targets)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    static = [t.requires_grad_(i < 3) for i, t in enumerate(fresh())]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for _ in range(2):
        values = fresh()
        with torch.no_grad():
            for dst, src in zip(static, values):
                dst.copy_(src)
        graph.replay()
        eager = step(*[t.clone().requires_grad_(i < 3) for i, t in enumerate(values)])
        for name, got, want in zip(("out", "dq", "dk", "dv"), captured, eager):
            assert bool(torch.isfinite(got).all()), name
            if name == "dq":  # float32 atomics: the summation order may differ between runs
                scale = float(want.float().abs().max())
                assert float((got.float() - want.float()).abs().max()) <= 1e-2 * max(scale, 1e-3), name
            else:
                assert torch.equal(got, want), name


@gpu_test
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # (the refused call captured nothing)
def test_cuda_graph_capture_refuses_attention_dropout():
    from hstu.ops import hstu_attention

    q = torch.randn(64, 1, 64, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 30, 64], dtype=torch.int32, device="cuda")
    hstu_attention(q, q, q, offsets, 34)  # warm-up (index checks)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="dropout_p"):
        with torch.cuda.graph(graph):
            hstu_attention(q, q, q, offsets, 34, dropout_p=0.1)


@gpu_test
def test_double_backward_runs_the_reference_backward():
    """create_graph=True: the kernels' gradients are not differentiable, so that backward runs the reference. The
    bf16 second-order gradients meet the 5x rule against the float32 reference's (5x the bf16 reference's error)."""
    from hstu.ops import hstu_attention
    from hstu.ops.hstu_attention.reference import hstu_attention_reference

    gen = torch.Generator(device="cuda").manual_seed(5)
    offsets = torch.tensor([0, 40, 41, 141], dtype=torch.int32, device="cuda")
    base = [torch.randn(141, 2, 64, device="cuda", generator=gen) for _ in range(3)]

    def second_order(fn, dtype):
        q, k, v = (t.to(dtype).requires_grad_(True) for t in base)
        out = fn(q, k, v, offsets, 100, alpha=0.125)
        (grad_q,) = torch.autograd.grad(out.float().pow(2).sum(), q, create_graph=True)
        return [g.float() for g in torch.autograd.grad(grad_q.float().sum(), (q, k, v))]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = second_order(hstu_attention, torch.bfloat16)
    want = second_order(hstu_attention_reference, torch.float32)
    same_dtype = second_order(hstu_attention_reference, torch.bfloat16)
    for name, g, w, b in zip(("q", "k", "v"), got, want, same_dtype):
        floor = 1e-3 * float(w.abs().max())
        assert float((g - w).abs().max()) <= 5 * float((b - w).abs().max()) + floor, name


@gpu_test
def test_head_dims_without_a_kernel_are_padded_or_fall_back():
    from hstu.ops import hstu_attention
    from hstu.ops.hstu_attention import cuda, op
    from hstu.ops.hstu_attention.reference import hstu_attention_reference

    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    q = torch.randn(10, 2, 48, device="cuda", dtype=torch.bfloat16)
    assert cuda.unsupported_reason(q, q, q, None, 0.0) is not None
    assert cuda.unsupported_reason(q.float(), q.float(), q.float(), None, 0.0) is not None
    q32 = q[..., :32].contiguous()
    assert cuda.unsupported_reason(q32, q32, q32, None, 0.5) is None  # dropout runs in the kernel
    # d=48 (and d=50, the paper's ML-1M width) run the d=64 kernel on zero-padded inputs: no fallback warning.
    assert op._padded_head_dim(q, q) == 64 and op._padded_head_dim(q.float(), q.float()) == 0
    for dim in (48, 50):
        q, k, v = (torch.randn(10, 2, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out = hstu_attention(q, k, v, offsets, 6, alpha=dim**-0.5)
        reference = hstu_attention_reference(q.double(), k.double(), v.double(), offsets, 6, alpha=dim**-0.5)
        same_dtype = hstu_attention_reference(q, k, v, offsets, 6, alpha=dim**-0.5)
        assert out.shape == (10, 2, dim)
        assert (out.double() - reference).abs().max() <= 2 * (same_dtype.double() - reference).abs().max() + 1e-6
    # Above the largest compiled dim: the reference, bit for bit.
    q = torch.randn(10, 2, 320, device="cuda", dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = hstu_attention(q, q, q, offsets, 6)
    torch.testing.assert_close(out, hstu_attention_reference(q, q, q, offsets, 6), atol=0, rtol=0)


@gpu_test
def test_bad_inputs_raise_before_launch():
    from hstu.ops import hstu_attention

    q = torch.randn(10, 2, 64, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device="cuda")
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q.half(), q, offsets, 6)
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, torch.tensor([0, 6, 4], dtype=torch.int32, device="cuda"), 6)
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, offsets, 5)  # a length above max_seqlen
    with pytest.raises((ValueError, TypeError)):
        hstu_attention(q, q, q, offsets, 6, num_targets=torch.tensor([5, 1], dtype=torch.int32, device="cuda"))
    # The extension itself refuses mismatched arguments before launching anything.
    ext = load_extension()
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError):
        ext.hstu_attn_fwd(q, q.half(), q, offsets, 6, 1.0, 6, True, -1, None, None, 1, None, out)
    with pytest.raises(RuntimeError):
        ext.hstu_attn_fwd(q, q, q, offsets.long(), 6, 1.0, 6, True, -1, None, None, 1, None, out)
    torch.cuda.synchronize()  # no asynchronous error was left behind


@gpu_test
@pytest.mark.parametrize("deterministic", [False, True])
def test_inputs_at_an_unaligned_offset(deterministic):
    """Contiguous views starting an odd number of elements into their storage (not 16-byte aligned) give the same
    output and gradients as aligned copies; the extension itself refuses them before any launch."""
    from hstu.ops import hstu_attention

    T, H, D = 300, 2, 64
    offsets = torch.tensor([0, 130, 131, 300], dtype=torch.int32, device="cuda")
    storage = torch.randn(4, T * H * D + 1, device="cuda", dtype=torch.bfloat16)
    q, k, v, dout = (storage[i, 1:].view(T, H, D) for i in range(4))
    assert all(t.is_contiguous() and t.data_ptr() % 16 != 0 for t in (q, k, v, dout))
    results = []
    for tensors in ((q, k, v), tuple(t.clone() for t in (q, k, v))):
        leaves = [t.detach().requires_grad_(True) for t in tensors]  # the views themselves, then aligned copies
        out = hstu_attention(*leaves, offsets, 170, alpha=D**-0.5, deterministic=deterministic)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0 if deterministic else 1e-2, rtol=0 if deterministic else 1.6e-2)
    ext = load_extension()
    aligned = k.clone()
    for args in ((q, aligned, aligned), (aligned, k, aligned), (aligned, aligned, v)):  # each of q, k, v alone
        with pytest.raises(RuntimeError, match="16-byte aligned"):
            ext.hstu_attn_fwd(*args, offsets, 170, 1.0, 170, True, -1, None, None, 1, None, torch.empty_like(aligned))
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Attention dropout
# ----------------------------------------------------------------------------------------------------------------

DROPOUT_PS = (0.1, 0.5)


def _op_seed(torch_seed: int) -> int:
    """The dropout_seed that hstu_attention draws right after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**62, (1,)).item())


def _seeded_op(torch_seed: int, deterministic=None):
    """hstu_attention with its dropout seed pinned by torch.manual_seed (ignores the reference-only dropout_mask)."""
    from hstu.ops import hstu_attention

    def impl(*args, dropout_mask=None, **kwargs):
        torch.manual_seed(torch_seed)
        if deterministic is not None:
            kwargs["deterministic"] = deterministic
        return hstu_attention(*args, **kwargs)

    return impl


def _check_dropout_config(cfg: dict, p: float, torch_seed: int, deterministic=None) -> None:
    """Kernel forward + every gradient vs the fp32 reference applied with the kernels' own keep mask."""
    from hstu.ops.hstu_attention import cuda
    from hstu.testing.parity import attention_parity

    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    assert cuda.unsupported_reason(q, k, v, rab, p) is None, cuda.unsupported_reason(q, k, v, rab, p)
    seed = _op_seed(torch_seed)
    mask = cuda.dropout_keep_mask(seed, len(cfg["lengths"]), cfg["heads"], cfg["max_seqlen"], p, device=q.device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the reference would warn: fail instead
        attention_parity(
            q, k, v, offsets, cfg["max_seqlen"], impl=_seeded_op(torch_seed, deterministic), rab=rab,
            rab_requires_grad=cfg["rab_grad"], alpha=cfg["alpha"], scaling_seqlen=cfg["scaling"],
            causal=cfg["causal"], window_size=cfg["window"], num_contexts=nc, num_targets=nt,
            target_group_size=cfg["group"], dropout_p=p, dropout_mask=mask,
        )  # fmt: skip


@gpu_test
@pytest.mark.parametrize("p", DROPOUT_PS)
@pytest.mark.parametrize(
    "seed,batch,heads,n", [(0, 1, 1, 1), (7, 2, 3, 37), (2**40 + 3, 3, 2, 130), (2**62 - 1, 1, 4, 257)]
)
def test_dropout_keep_mask_matches_pytorch_formulation(p, seed, batch, heads, n):
    """The debug kernel's mask equals the PyTorch Philox formulation (also bits from the seed's high word)."""
    from hstu.ops.hstu_attention import cuda

    got = cuda.dropout_keep_mask(seed, batch, heads, n, p, device="cuda")
    want = cuda.dropout_keep_mask_reference(seed, batch, heads, n, p, device="cuda")
    assert got.shape == (batch, heads, n, n) and got.dtype == torch.bool
    assert torch.equal(got, want)


@gpu_test
@pytest.mark.parametrize("p", DROPOUT_PS)
def test_dropout_keep_rate(p):
    """Keep rate ~ 1 - p overall and per (batch, head); distinct heads, batches and seeds get distinct masks."""
    from hstu.ops.hstu_attention import cuda

    mask = cuda.dropout_keep_mask(123, 3, 4, 512, p, device="cuda")
    rate = float(mask.double().mean())
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(rate - (1 - p)) < 6 * sigma + 1e-4, (rate, 1 - p)
    per_bh = mask.double().mean(dim=(2, 3))
    assert float((per_bh - (1 - p)).abs().max()) < 6 * math.sqrt(p * (1 - p) / (512 * 512)) + 1e-4
    # rows / columns of the 2 x 2 Philox grouping are not correlated more than chance
    assert abs(float(mask[..., 0::16, :].double().mean()) - (1 - p)) < 0.01
    assert abs(float(mask[..., 8::16, :].double().mean()) - (1 - p)) < 0.01
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])
    assert not torch.equal(mask, cuda.dropout_keep_mask(124, 3, 4, 512, p, device="cuda"))
    assert torch.equal(mask, cuda.dropout_keep_mask(123, 3, 4, 512, p, device="cuda"))
    assert bool(cuda.dropout_keep_mask(123, 2, 2, 33, 0.0, device="cuda").all())


@gpu_test
@pytest.mark.parametrize("idx", range(32))
def test_dropout_parity_random(idx):
    """Randomized configs (dtypes, masks, rab none / 1-head / H-head, lengths) at every head dim and both p."""
    cfg = _random_config(20_000 + idx)
    cfg["dim"] = HEAD_DIMS[idx % 4]
    cfg["alpha"] = 1.0 / math.sqrt(cfg["dim"]) if idx % 3 else 1.0
    p = DROPOUT_PS[(idx // 4) % 2]
    try:
        _check_dropout_config(cfg, p, torch_seed=idx)
    except AssertionError as err:
        raise AssertionError(f"p={p} {_describe(cfg)}: {err}") from None


@gpu_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("mask", ["causal", "noncausal", "ctx_tgt", "tgt_group_window"])
@pytest.mark.parametrize("rab_kind", ["none", "one", "heads"])
def test_dropout_parity_grid(dtype, dim, mask, rab_kind):
    """Mask families x head dims x dtypes x rab kinds (1-head rab with gradient: the dk/dv kernel's head loop)."""
    lengths = [0, 1, 77, 130, 255]
    cfg = dict(seed=30_000 + dim + len(mask) + len(rab_kind), dtype=dtype, dim=dim, heads=3, lengths=lengths,
               max_seqlen=max(lengths) + 2, causal=mask != "noncausal", window=-1, num_contexts=None,
               num_targets=None, group=1, rab_kind=rab_kind, rab_grad=rab_kind != "none", alpha=1.0 / math.sqrt(dim),
               scaling=None)  # fmt: skip
    if mask == "tgt_group_window":
        cfg.update(window=17, num_targets=[0, 1, 20, 9, 64], group=4)
    if mask == "ctx_tgt":
        cfg.update(num_targets=[0, 1, 20, 9, 64], num_contexts=[0, 0, 5, 3, 12])
    p = 0.5 if (dim // 32 + len(mask)) % 2 else 0.1
    try:
        _check_dropout_config(cfg, p, torch_seed=dim + len(mask))
    except AssertionError as err:
        raise AssertionError(f"p={p} {_describe(cfg)}: {err}") from None


def _dropout_run(cfg, p, torch_seed, leaves_from):
    from hstu.ops import hstu_attention

    q, k, v, offsets, rab, nc, nt = leaves_from
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(torch_seed)
    out = hstu_attention(*leaves, offsets, cfg["max_seqlen"], alpha=cfg["alpha"], causal=cfg["causal"],
                         num_contexts=nc, num_targets=nt, dropout_p=p, rab=rab)  # fmt: skip
    g = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda").to(out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


@gpu_test
@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_dropout_same_seed_same_result_different_seed_differs(dim):
    cfg = dict(seed=40_000 + dim, dtype=torch.bfloat16, dim=dim, heads=2, lengths=[200, 65, 130], max_seqlen=200,
               causal=True, window=-1, num_contexts=None, num_targets=None, group=1, rab_kind="none", rab_grad=False,
               alpha=1.0 / math.sqrt(dim), scaling=None)  # fmt: skip
    inputs = _build_inputs(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        a = _dropout_run(cfg, 0.3, 11, inputs)
        b = _dropout_run(cfg, 0.3, 11, inputs)
        c = _dropout_run(cfg, 0.3, 12, inputs)
        d = _dropout_run(cfg, 0.0, 11, inputs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, c):
        assert not torch.equal(x, y)
    for x, y in zip(a, d):
        assert not torch.equal(x, y)


@gpu_test
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("rab_heads", [0, 1])
def test_dropout_p0_path_unchanged(dim, rab_heads):
    """dropout_p = 0 runs the dropout-free kernels: bitwise equal to the binding's defaults, whatever the seed."""
    from hstu.ops import hstu_attention

    cfg = dict(seed=50_000 + dim, dtype=torch.bfloat16, dim=dim, heads=3, lengths=[1, 130, 255], max_seqlen=255,
               causal=True, window=-1, num_contexts=None, num_targets=None, group=1,
               rab_kind="one" if rab_heads else "none", rab_grad=bool(rab_heads), alpha=1.0 / math.sqrt(dim),
               scaling=None)  # fmt: skip
    q, k, v, offsets, rab, nc, nt = _build_inputs(cfg)
    ext = load_extension()
    n = cfg["max_seqlen"]
    args = (q, k, v, offsets, n, cfg["alpha"], n, True, -1, None, None, 1, rab)
    o_default = torch.empty_like(q)
    ext.hstu_attn_fwd(*args, o_default)  # the pre-dropout call signature
    o_zero = torch.empty_like(q)
    ext.hstu_attn_fwd(*args, o_zero, dropout_p=0.0, dropout_seed=987654321)
    o_op = hstu_attention(q, k, v, offsets, n, alpha=cfg["alpha"], rab=rab, dropout_p=0.0)
    assert torch.equal(o_default, o_zero) and torch.equal(o_default, o_op)
    dout = torch.randn_like(q)
    grads = []
    for kw in ({}, dict(dropout_p=0.0, dropout_seed=5)):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        drab = torch.zeros(rab.shape, dtype=torch.float32, device="cuda") if rab is not None else None
        ext.hstu_attn_bwd(dout, *args, dq, dk, dv, drab, **kw)
        grads.append([dq, dk, dv] + ([drab] if drab is not None else []))
    for x, y in zip(*grads):
        assert torch.equal(x, y)
    torch.cuda.synchronize()


@gpu_test
def test_dropout_empty_batch():
    from hstu.ops import hstu_attention
    from hstu.ops.hstu_attention import cuda

    q, k, v = (torch.randn(0, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    offsets = torch.zeros(3, dtype=torch.int32, device="cuda")
    out = hstu_attention(q, k, v, offsets, 4, dropout_p=0.5)
    out.sum().backward()
    assert out.shape == (0, 2, 64) and q.grad.shape == q.shape
    assert cuda.dropout_keep_mask(1, 0, 2, 4, 0.5, device="cuda").shape == (0, 2, 4, 4)
    assert cuda.dropout_keep_mask(1, 2, 2, 0, 0.5, device="cuda").shape == (2, 2, 0, 0)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# CPU tests (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------


# Host emulation of the kernels (csrc/hstu_attention/emulation): the real kernel sources, compiled by g++ with one
# fiber per CUDA thread and emulated ldmatrix / mma.sync / barriers / atomics, run on the CPU against the fp32
# reference under the same parity rule. Catches indexing, layout, masking and barrier-protocol bugs without a GPU
# (not timing, not memory-model races). Needs g++ and the CUDA headers; skips otherwise.

_EMU_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "hstu_attention")


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


def _emu_impl(emu, deterministic, variant=0):
    """hstu_attention-like callable (CPU tensors) running the emulated kernels; dropout uses the kernels' Philox."""
    import ctypes

    vp, i64, i32, f32, u32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint32

    class Args(ctypes.Structure):
        _fields_ = [(n, vp) for n in ("q", "k", "v", "dout", "out", "dq", "dk", "dv", "drab", "dq_accum", "offsets",
                                      "ctx", "tgt", "rab")]
        _fields_ += [(n, i64) for n in ("rab_bs", "rab_hs", "rab_rs", "drab_bs", "drab_hs", "drab_rs", "row_stride",
                                        "total_rows")]
        _fields_ += [(n, i32) for n in ("batch", "heads", "max_seqlen", "causal", "window", "group", "rab_heads",
                                        "dtype", "D", "dropout", "variant")]
        _fields_ += [(n, f32) for n in ("alpha", "inv_scale", "dropout_scale")]
        _fields_ += [(n, u32) for n in ("seed_lo", "seed_hi", "threshold")]  # fmt: skip

    from hstu.ops.hstu_attention import cuda

    def ptr(t):
        return None if t is None else vp(t.data_ptr())

    def args_for(q, k, v, offsets, n, alpha, scaling, causal, window, nc, nt, group, rab, p, seed):
        a = Args()
        a.q, a.k, a.v, a.offsets, a.ctx, a.tgt, a.rab = map(ptr, (q, k, v, offsets, nc, nt, rab))
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
              deterministic=False, sm90_device=True, variant=None):  # fmt: skip
    """heuristics.h's plan (through the emulation library) as (sm90, kernel, persistent / atomic dq, sched_group)."""
    import ctypes

    from hstu.ops.hstu_attention import cuda

    v = variant or cuda.KernelVariant()
    choice = {None: -1, False: 0, True: 1}
    problem = (ctypes.c_int * 8)(head_dim, batch, heads, max_seqlen, bf16, rab, drab, dropout)
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


def test_cpu_philox_known_answers():
    """Random123's Philox4x32-10 known-answer vectors (the kernels' dropout.h implements the same function)."""
    from hstu.ops.hstu_attention.cuda import philox4x32_10

    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 6, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]  # fmt: skip
    for (c0, c1, c2, c3, k0, k1), want in cases:
        ctr = [torch.tensor([c], dtype=torch.int64) for c in (c0, c1, c2, c3)]
        got = tuple(int(t) for t in philox4x32_10(*ctr, k0, k1))
        assert got == want, [hex(x) for x in got]


def test_cpu_dropout_keep_mask_reference_properties():
    from hstu.ops.hstu_attention import cuda

    assert cuda.dropout_threshold(0.0) == 0
    assert cuda.dropout_threshold(0.5) == 2**31
    assert cuda.dropout_threshold(1.0 - 1e-15) == 2**32 - 1
    assert bool(cuda.dropout_keep_mask_reference(3, 2, 2, 40, 0.0).all())
    for p in DROPOUT_PS:
        m = cuda.dropout_keep_mask_reference(2**33 + 5, 2, 3, 200, p)
        assert m.shape == (2, 3, 200, 200) and m.dtype == torch.bool
        sigma = math.sqrt(p * (1 - p) / m.numel())
        assert abs(float(m.double().mean()) - (1 - p)) < 6 * sigma
        assert torch.equal(m, cuda.dropout_keep_mask_reference(2**33 + 5, 2, 3, 200, p))
        assert not torch.equal(m, cuda.dropout_keep_mask_reference(2**33 + 6, 2, 3, 200, p))
        assert not torch.equal(m[0, 0], m[0, 1])
        # a pure function of (seed, b, h, i, j): a larger batch / max_seqlen does not move existing positions
        big = cuda.dropout_keep_mask_reference(2**33 + 5, 3, 3, 233, p)
        assert torch.equal(big[:2, :, :200, :200], m)
    # the seed's high 32 bits matter
    assert not torch.equal(cuda.dropout_keep_mask_reference(1, 1, 1, 64, 0.5),
                           cuda.dropout_keep_mask_reference(1 + 2**32, 1, 1, 64, 0.5))  # fmt: skip


class _FakeExtension:
    """Records the keyword arguments of the binding's calls and of the KernelOptions it is given."""

    def __init__(self):
        self.calls = {}

    class KernelOptions:
        def __init__(self, **fields):
            self.fields = fields

    def hstu_attn_fwd(self, *args, **kwargs):
        self.calls["fwd"] = kwargs

    def hstu_attn_bwd(self, *args, **kwargs):
        self.calls["bwd"] = kwargs


@pytest.fixture
def fake_extension(monkeypatch):
    from hstu.ops.hstu_attention import cuda

    ext = _FakeExtension()
    monkeypatch.setattr(cuda, "load_extension", lambda: ext)
    cuda._ext_options.cache_clear()  # options objects are cached per extension
    yield ext
    cuda._ext_options.cache_clear()


def test_cpu_dropout_arguments_reach_the_extension(fake_extension):
    """cuda.forward / backward hand dropout_p and the (64-bit) seed to the binding; bad p is refused early."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    calls = fake_extension.calls
    q = torch.randn(5, 2, 32, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 5], dtype=torch.int32)
    args = AttentionArgs(q, q, q, offsets, 5, 0.25, 5, True, -1, None, None, 1, None)
    cuda.forward(args._replace(dropout_p=0.25, dropout_seed=2**62 - 7))
    assert {k: calls["fwd"][k] for k in ("dropout_p", "dropout_seed")} == dict(dropout_p=0.25, dropout_seed=2**62 - 7)
    cuda.backward(q, args._replace(dropout_p=0.5, dropout_seed=2**64 - 1, deterministic=True))
    # seed: the same 64 bits, signed
    assert {k: calls["bwd"][k] for k in ("dropout_p", "dropout_seed")} == dict(dropout_p=0.5, dropout_seed=-1)
    assert calls["bwd"]["options"].fields["deterministic"] is True
    cuda.backward(q, args._replace(dropout_seed=3))
    assert calls["bwd"]["options"].fields["deterministic"] is False
    cuda.forward(args)
    assert (calls["fwd"]["dropout_p"], calls["fwd"]["dropout_seed"]) == (0.0, 0)
    with pytest.raises(ValueError):
        cuda.dropout_keep_mask(1, 1, 1, 4, 1.0, device="cpu")


def test_cpu_kernel_variant_reaches_the_extension(fake_extension, monkeypatch):
    """The options object the binding gets: deterministic from the call alone (no environment variable turns the
    atomic-dq path off any more), the variant from the call, from kernel_variant() around it, or the defaults with the
    user overrides HSTU_SM90_FWD=0 / HSTU_SM90_BWD=0 read once per process."""
    from hstu.ops.hstu_attention import cuda
    from hstu.ops.hstu_attention.args import AttentionArgs

    calls = fake_extension.calls
    q = torch.randn(5, 2, 32, dtype=torch.bfloat16)
    args = AttentionArgs(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, 0.25, 5, True, -1, None, None, 1, None)
    monkeypatch.setenv("HSTU_ATOMIC_DQ", "0")
    with cuda.kernel_variant(cuda.KernelVariant()):
        cuda.backward(q, args._replace(dropout_seed=3))
    assert calls["bwd"]["options"].fields == dict(
        deterministic=False, sm90_forward=True, sm90_backward=True, fwd_warp_specialized=True, fwd_two_per_sm=None,
        fwd_persistent=True, grouped_schedule=None, bench_bwd_warps=0, bench_d256_two_pass=False)  # fmt: skip
    variant = cuda.KernelVariant(sm90_forward=False, forward_two_per_sm=True, grouped_schedule=False)
    cuda.forward(args, variant=variant)
    fields = calls["fwd"]["options"].fields
    assert (fields["sm90_forward"], fields["fwd_two_per_sm"], fields["grouped_schedule"]) == (False, True, False)
    with cuda.kernel_variant(forward_persistent=False, sm90_backward=False):
        cuda.forward(args)
        assert calls["fwd"]["options"].fields["fwd_persistent"] is False
        cuda.backward(q, args._replace(dropout_seed=3, deterministic=True))
        assert calls["bwd"]["options"].fields["sm90_backward"] is False
        assert calls["bwd"]["options"].fields["deterministic"] is True
    cuda.default_variant.cache_clear()
    try:
        monkeypatch.setenv("HSTU_SM90_FWD", "0")
        monkeypatch.setenv("HSTU_SM90_BWD", "1")
        assert cuda.default_variant() == cuda.KernelVariant(sm90_forward=False)
        monkeypatch.setenv("HSTU_SM90_FWD", "1")  # read once: later changes do not count
        assert cuda.default_variant() == cuda.KernelVariant(sm90_forward=False)
    finally:
        cuda.default_variant.cache_clear()


@pytest.mark.parametrize("field, value, error", [
    ("sm90_forward", 1, TypeError), ("forward_two_per_sm", 0, TypeError), ("grouped_schedule", "on", TypeError),
    ("forward_persistent", None, TypeError), ("bench_bwd_warps", 4, ValueError), ("bench_bwd_warps", True, ValueError),
])  # fmt: skip
def test_cpu_kernel_variant_rejects_bad_fields(field, value, error):
    from hstu.ops.hstu_attention import cuda

    with pytest.raises(error, match=field):
        cuda.KernelVariant(**{field: value})
    with pytest.raises(TypeError, match="KernelVariant"):
        with cuda.kernel_variant("sm80"):
            pass
