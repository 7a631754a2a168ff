"""Which kernels run: the Hopper (sm_90) wgmma forward and backward against the sm80-style mma.sync ones, the
warp-specialized forward's two shapes, the persistent forward, the grouped launch order, and head dims without a
kernel (zero-padded or the reference). The Hopper tests check that ``cuda.kernel_plan`` names what the profiler
sees, that the variants agree with one another (bitwise where they sum in the same order) and pass the parity rule.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import warnings

import pytest
import torch

from tests.ops.attention_cuda_common import gpu_test, _build_inputs, _describe, _check_config

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


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
                        assert any("hstu_fwd_sm90_ws_kernel" in evt.key and "SingleTileScheduler" in evt.key
                                   for evt in prof.key_averages())
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
    """Whether a profiled kernel is the warp-specialized sm90 forward (either tile scheduler)."""
    return "hstu_fwd_sm90_ws_kernel" in kernel_name


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
