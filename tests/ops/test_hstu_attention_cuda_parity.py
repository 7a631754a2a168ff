"""Parity of the fused CUDA HSTU attention kernels against the fp32 reference (2x forward / 5x gradient rule).

Skips without a GPU or without the compiled extension. On GPU: a seeded randomized sweep (HSTU_CUDA_TEST_CONFIGS
configs, default 320) over batch shapes (empty and length-1 sequences, lengths that are no tile multiple, a few
long sequences), heads, head dims, dtypes, every mask combination, rab none / 1-head / H-head with and without
gradient, alpha in {1/sqrt(D), 1}; forward and every gradient. Also every mask family at every head dim, empty
batches, a float32 rab beside bf16 inputs, and second-order gradients (create_graph=True runs the reference).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from tests.ops.attention_cuda_common import gpu_test, HEAD_DIMS, _random_config, _build_inputs, _describe, _check_config

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


NUM_CONFIGS = int(os.environ.get("HSTU_CUDA_TEST_CONFIGS", "320"))


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
