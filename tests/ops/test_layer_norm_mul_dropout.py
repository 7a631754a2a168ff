"""layer_norm_mul_dropout (issue 22): dropout(LayerNorm(x) * u) as one op. CPU: the reference is the HSTU layer's
own composition (bit-identical, dropout included), gradients, meta tensors, the named argument errors. GPU (skip on
CPU): the kernels (csrc/layer/norm_mul_dropout.cu) against the fp32 reference with the 2x forward / 5x gradient rule
over random widths (not multiples of 8 too) and row counts (0 and 1 too), bf16 / fp16 / fp32, with the keep mask
the same in the forward and the backward and its keep rate within statistical bounds."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.ops.norm_mul_dropout import cuda as nmd_cuda
from hstu.ops.norm_mul_dropout import layer_norm_mul_dropout, layer_norm_mul_dropout_reference
from tests.conftest import requires_cuda


def _inputs(rows, width, dtype=torch.float32, weight_dtype=None, device="cpu", seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=gen) * 3 + 1).to(device=device, dtype=dtype)
    u = torch.randn(rows, width, generator=gen).to(device=device, dtype=dtype)
    weight_dtype = weight_dtype or dtype
    weight = (1 + 0.3 * torch.randn(width, generator=gen)).to(device=device, dtype=weight_dtype)
    bias = (0.2 * torch.randn(width, generator=gen)).to(device=device, dtype=weight_dtype)
    tensors = (x, u, weight, bias)
    return tuple(t.requires_grad_(grad) for t in tensors)


# ---- CPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training,p", [(False, 0.3), (True, 0.0), (True, 0.3)])
def test_reference_is_the_layers_composition_bit_for_bit(training, p):
    """What HSTULayer.combine computes before its projection: nn.LayerNorm(attn) * u, then F.dropout."""
    x, u, _, _ = _inputs(37, 24, seed=1)
    norm = torch.nn.LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.2)
    torch.manual_seed(5)
    want = F.dropout(norm(x) * u, p=p, training=training)
    torch.manual_seed(5)
    got = layer_norm_mul_dropout(x, u, norm.weight, norm.bias, eps=1e-6, dropout_p=p, training=training)
    assert torch.equal(got, want)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(0, 9), width=st.integers(1, 13), p=st.sampled_from([0.0, 0.25, 1.0]))
def test_reference_with_a_keep_mask_and_its_gradients(rows, width, p):
    x, u, w, b = _inputs(rows, width, dtype=torch.float64, seed=rows * 31 + width, grad=True)
    keep = torch.rand(rows, width, generator=torch.Generator().manual_seed(width)) >= 0.5
    y = layer_norm_mul_dropout_reference(x, u, w, b, 1e-5, p, True, keep)
    normed = F.layer_norm(x, (width,), w, b, 1e-5)
    if p == 0:
        expected = normed * u  # no dropout: the mask plays no part
    else:
        expected = torch.where(keep, normed * u / (1 - p), 0.0) if p < 1 else torch.zeros_like(normed)
    torch.testing.assert_close(y, expected)
    if rows and p < 1 and width > 1:  # (a width-1 row normalises to 0 with rstd 1/sqrt(eps): no useful check)
        assert torch.autograd.gradcheck(
            lambda *t: layer_norm_mul_dropout_reference(*t, 1e-5, p, True, keep), (x, u, w, b))


def test_meta_tensors_and_the_output_dtype():
    x, u, w, b = _inputs(5, 7, dtype=torch.bfloat16, weight_dtype=torch.float32, device="meta")
    y = layer_norm_mul_dropout(x, u, w, b, dropout_p=0.1)
    assert (y.shape, y.dtype, y.device.type) == ((5, 7), torch.bfloat16, "meta")


def test_argument_errors_name_the_argument():
    x, u, w, b = _inputs(4, 6)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer_norm_mul_dropout(x.tolist(), u, w, b)
    with pytest.raises(ValueError, match=r"u must have x's shape \(4, 6\), got \(4, 5\)"):
        layer_norm_mul_dropout(x, u[:, :5], w, b)
    with pytest.raises(TypeError, match="u must have x's dtype"):
        layer_norm_mul_dropout(x, u.double(), w, b)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        layer_norm_mul_dropout(x, u, w[:5], b)
    with pytest.raises(ValueError, match="bias must be 1-D"):
        layer_norm_mul_dropout(x, u, w, b.view(2, 3))
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        layer_norm_mul_dropout(x, u, w, b.double())
    with pytest.raises(TypeError, match="weight must have x's dtype torch.bfloat16 or float32"):
        layer_norm_mul_dropout(x.bfloat16(), u.bfloat16(), w.double(), b.double())
    with pytest.raises(ValueError, match="x must have at least one column"):
        layer_norm_mul_dropout(x[:, :0], u[:, :0], w[:0], b[:0])
    with pytest.raises(ValueError, match="x must be 2-D"):
        layer_norm_mul_dropout(x.view(2, 2, 6), u.view(2, 2, 6), w, b)
    with pytest.raises(ValueError, match="eps must be > 0"):
        layer_norm_mul_dropout(x, u, w, b, eps=0.0)
    with pytest.raises(ValueError, match="eps must be finite"):
        layer_norm_mul_dropout(x, u, w, b, eps=math.nan)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        layer_norm_mul_dropout(x, u, w, b, dropout_p=1.5)
    with pytest.raises(TypeError, match="dropout_p must be a float, got str"):
        layer_norm_mul_dropout(x, u, w, b, dropout_p="0.1")
    with pytest.raises(TypeError, match="training must be a bool"):
        layer_norm_mul_dropout(x, u, w, b, training=1)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        layer_norm_mul_dropout(x, u, w.to("meta"), b)


# ---- GPU ---------------------------------------------------------------------------------------------------------

def _needs_kernels():
    if not nmd_cuda.available(torch.empty(0, device="cuda")):
        pytest.skip("hstu._C was built without the hstu_layer kernels")


def _lowp_torch(x, u, w, b, eps, p, keep):
    """The same computation in plain PyTorch in the inputs' dtype (the 2x / 5x rule's baseline)."""
    gated = F.layer_norm(x, (x.shape[1],), w.to(x.dtype), b.to(x.dtype), eps) * u
    if p > 0:
        gated = torch.where(keep, gated * (1.0 / (1.0 - p)), torch.zeros_like(gated))
    return gated


def _check_parity(rows, width, dtype, weight_dtype, p, seed):
    from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity

    eps = 1e-5
    x, u, w, b = _inputs(rows, width, dtype, weight_dtype, "cuda", seed, grad=True)
    keep = nmd_cuda.keep_mask(rows, width, p, seed + 1, 0, "cuda") if p > 0 else None
    dy = torch.randn(rows, width, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)

    def run(fn, upcast):
        tensors = [t.detach().double().requires_grad_(True) if upcast else t.detach().clone().requires_grad_(True)
                   for t in (x, u, w, b)]
        out = fn(*tensors)
        grads = torch.autograd.grad(out, tensors, dy.to(out.dtype)) if rows else [torch.zeros_like(t) for t in tensors]
        return out.detach(), grads

    kernel = run(lambda *t: nmd_cuda.NormMulDropout.apply(*t, eps, p, seed + 1, 0), False)
    reference = run(lambda *t: layer_norm_mul_dropout_reference(*t, eps, p, True, keep), True)
    lowp = run(lambda *t: _lowp_torch(*t, eps, p, keep), False)
    where = f"rows={rows} width={width} {dtype} weight {weight_dtype} p={p}"
    assert kernel[0].dtype == dtype, where
    assert_parity(f"y {where}", kernel[0], reference[0], lowp[0], factor=FORWARD_FACTOR)
    for name, got, want, base in zip(("dx", "du", "dweight", "dbias"), kernel[1], reference[1], lowp[1]):
        assert got.dtype == (weight_dtype or dtype) or name in ("dx", "du"), f"{name} {where}"
        assert_parity(f"{name} {where}", got, want, base.to(got.dtype), factor=BACKWARD_FACTOR)


@requires_cuda
@pytest.mark.parametrize("seed", range(24))
def test_kernels_match_the_reference(seed):
    _needs_kernels()
    rng = random.Random(seed)
    width = [1, 3, 7, 12, 100, 257, 1000, 1024, 1030, 4099][seed % 10] if seed < 20 else rng.randint(1, 3000)
    rows = [0, 1, 2, 33][seed % 4] if seed < 8 else rng.randint(1, 3000)
    dtype = [torch.bfloat16, torch.float16, torch.float32][seed % 3]
    weight_dtype = rng.choice([None, torch.float32])
    p = rng.choice([0.0, 0.1, 0.5])
    _check_parity(rows, width, dtype, weight_dtype, p, seed)


@requires_cuda
def test_dropout_keep_rate_and_seeds():
    _needs_kernels()
    rows, width, p = 4096, 1000, 0.3
    keep = nmd_cuda.keep_mask(rows, width, p, 1234, 0, "cuda")
    n = keep.numel()
    rate = float(keep.float().mean())
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p, sigma)
    # columns and rows are independent streams: every column's and row's keep rate is near 1 - p
    assert float((keep.float().mean(0) - (1 - p)).abs().max()) < 6 * math.sqrt(p * (1 - p) / rows)
    assert not torch.equal(keep, nmd_cuda.keep_mask(rows, width, p, 1235, 0, "cuda"))
    assert torch.equal(keep, nmd_cuda.keep_mask(rows, width, p, 1234, 0, "cuda"))
    assert bool(nmd_cuda.keep_mask(8, 9, 1.0, 1, 0, "cuda").logical_not().all())


@requires_cuda
def test_the_public_op_takes_the_kernels_and_follows_the_torch_seed():
    _needs_kernels()
    x, u, w, b = _inputs(300, 129, torch.bfloat16, torch.float32, "cuda", seed=3)
    torch.manual_seed(7)
    first = layer_norm_mul_dropout(x, u, w, b, dropout_p=0.2)
    torch.manual_seed(7)
    again = layer_norm_mul_dropout(x, u, w, b, dropout_p=0.2)
    assert torch.equal(first, again)
    assert not torch.equal(first, layer_norm_mul_dropout(x, u, w, b, dropout_p=0.2))
    y = layer_norm_mul_dropout(x, u, w, b, dropout_p=0.2, training=False)
    ref = layer_norm_mul_dropout_reference(x, u, w, b, 1e-6, 0.0, False)
    assert (y.float() - ref.float()).abs().max() <= 2 * (ref.float().abs().max() * 2**-8)
