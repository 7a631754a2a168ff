"""Attention dropout: the kernels' keep mask (``cuda.dropout_keep_mask``, a debug kernel evaluating the same device
function) is checked against its PyTorch formulation, and the kernel forward / gradients against the reference
applied with exactly that mask, under the parity rule; the same seed gives the same result, p = 0 the dropout-free
kernels. The ``test_cpu_*`` tests run without a GPU: the Philox known-answer vectors and the PyTorch mask
formulation.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hstu.ops._extension import load_extension
from tests.ops.attention_cuda_common import (
    gpu_test,
    HEAD_DIMS,
    _random_config,
    _build_inputs,
    _describe,
    DROPOUT_PS,
    _check_dropout_config,
)

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


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
