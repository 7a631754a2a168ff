"""uvqk_projection (issue 22): LayerNorm(x) -> UVQK projection -> SiLU as one op, CPU side. The reference is the HSTU
layer's own composition bit for bit; its gradients; meta tensors; the named argument errors; the dispatcher's rule
(which calls take the kernels); and the kernels' weight regrouping and part layout, emulated in torch, against the
layer's head-by-head split. The kernels themselves: tests/ops/test_uvqk_cuda.py (GPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.modules.hstu_layer import HSTULayer
from hstu.ops.uvqk import cuda as uvqk_cuda
from hstu.ops.uvqk import op as uvqk_op
from hstu.ops.uvqk import split_uvqk, uvqk_projection, uvqk_projection_reference


def _inputs(rows, width, heads, qk_dim, v_dim, dtype=torch.float32, device="cpu", seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    out = heads * (2 * v_dim + 2 * qk_dim)
    x = (torch.randn(rows, width, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    nw = (1 + 0.3 * torch.randn(width, generator=gen)).to(device=device, dtype=dtype)
    nb = (0.2 * torch.randn(width, generator=gen)).to(device=device, dtype=dtype)
    w = (torch.randn(out, width, generator=gen) / math.sqrt(width)).to(device=device, dtype=dtype)
    b = (0.1 * torch.randn(out, generator=gen)).to(device=device, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (x, nw, nb, w, b))


def test_reference_is_the_layers_projection_bit_for_bit():
    layer = HSTULayer(24, 3, 8, 5)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(37, 24)
    want = layer.project(x)
    norm, proj = layer.input_norm, layer.uvqk_proj
    got = uvqk_projection(x, norm.weight, norm.bias, proj.weight, proj.bias, num_heads=3, qk_dim=8, v_dim=5,
                          eps=norm.eps)  # fmt: skip
    assert len(got) == 4
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.equal(a, b)
    assert got[0].shape == (37, 15) and got[1].shape == (37, 3, 5) and got[2].shape == (37, 3, 8)


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(0, 6), width=st.integers(2, 7), heads=st.integers(1, 2), qk=st.integers(1, 3),
       v=st.integers(1, 3))
def test_reference_gradients(rows, width, heads, qk, v):
    tensors = _inputs(rows, width, heads, qk, v, dtype=torch.float64, seed=rows * 7 + width, grad=True)

    def fn(*t):
        return uvqk_projection(*t, num_heads=heads, qk_dim=qk, v_dim=v, eps=1e-5)

    assert torch.autograd.gradcheck(fn, tensors)


def test_meta_tensors_and_the_output_dtype():
    x, nw, nb, w, b = _inputs(5, 16, 2, 8, 8, dtype=torch.bfloat16, device="meta")
    u, v, q, k = uvqk_projection(x, nw.float(), nb.float(), w, b, num_heads=2, qk_dim=8, v_dim=8)
    assert (u.shape, v.shape, q.shape, k.shape) == ((5, 16), (5, 2, 8), (5, 2, 8), (5, 2, 8))
    assert u.dtype == torch.bfloat16 and u.device.type == "meta"
    *_, pre = uvqk_projection(x, nw, nb, w, b, num_heads=2, qk_dim=8, v_dim=8, return_pre=True)
    assert pre is None  # the reference path keeps no pre-activation of its own


def test_argument_errors_name_the_argument():
    x, nw, nb, w, b = _inputs(4, 6, 2, 3, 2)
    kw = dict(num_heads=2, qk_dim=3, v_dim=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        uvqk_projection(x.tolist(), nw, nb, w, b, **kw)
    with pytest.raises(ValueError, match="x must be 2-D"):
        uvqk_projection(x.view(2, 2, 6), nw, nb, w, b, **kw)
    with pytest.raises(ValueError, match="x must have at least one column"):
        uvqk_projection(x[:, :0], nw[:0], nb[:0], w[:, :0], b, **kw)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(6,\)"):
        uvqk_projection(x, nw[:5], nb, w, b, **kw)
    with pytest.raises(ValueError, match="norm_bias must be 1-D"):
        uvqk_projection(x, nw, nb.view(2, 3), w, b, **kw)
    with pytest.raises(TypeError, match="norm_bias must have norm_weight's dtype"):
        uvqk_projection(x, nw, nb.double(), w, b, **kw)
    with pytest.raises(TypeError, match="norm_weight must have x's dtype torch.bfloat16 or float32"):
        uvqk_projection(x.bfloat16(), nw.double(), nb.double(), w.bfloat16(), b.bfloat16(), **kw)
    with pytest.raises(ValueError, match=r"weight must have shape \(20, 6\)"):
        uvqk_projection(x, nw, nb, w[:19], b, **kw)
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\)"):
        uvqk_projection(x, nw, nb, w, b[:19], **kw)
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        uvqk_projection(x, nw, nb, w, b.double(), **kw)
    with pytest.raises(TypeError, match="weight must have x's dtype torch.float32 outside autocast"):
        uvqk_projection(x, nw, nb, w.bfloat16(), b.bfloat16(), **kw)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        uvqk_projection(x, nw, nb, w, b, num_heads=0, qk_dim=3, v_dim=2)
    with pytest.raises(TypeError, match="qk_dim must be an int"):
        uvqk_projection(x, nw, nb, w, b, num_heads=2, qk_dim=3.0, v_dim=2)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        uvqk_projection(x, nw, nb, w, b, eps=0.0, **kw)
    with pytest.raises(TypeError, match="eps must be a float"):
        uvqk_projection(x, nw, nb, w, b, eps="1e-6", **kw)
    with pytest.raises(TypeError, match="recompute_input_norm must be a bool"):
        uvqk_projection(x, nw, nb, w, b, recompute_input_norm=1, **kw)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        uvqk_projection(x, nw, nb, w.to("meta"), b.to("meta"), **kw)


def test_dispatcher_rule(monkeypatch):
    """The kernels take a call only when switched on, on CUDA tensors of a half GEMM dtype with qk_dim == v_dim and
    widths that are multiples of 8 (the kernels' availability is faked here: CPU tensors stand in for CUDA ones)."""
    x, nw, nb, w, b = _inputs(3, 16, 2, 8, 8, dtype=torch.bfloat16)
    args = (x, nw.float(), nb.float(), w, b, 2, 8, 8)
    assert not uvqk_op.kernels_apply(*args)  # off by default
    monkeypatch.setattr(uvqk_op, "USE_CUDA_KERNELS", True)
    assert not uvqk_op.kernels_apply(*args)  # CPU tensors: no kernels
    monkeypatch.setattr(uvqk_cuda, "available", lambda *t: True)
    assert uvqk_op.kernels_apply(*args)
    assert not uvqk_op.kernels_apply(x.float(), nw.float(), nb.float(), w.float(), b.float(), 2, 8, 8)  # fp32 GEMM
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inputs under a bf16 autocast: a bf16 GEMM
        assert uvqk_op.kernels_apply(x.float(), nw.float(), nb.float(), w.float(), b.float(), 2, 8, 8)
    xs, nws, nbs, ws, bs = _inputs(3, 16, 2, 8, 4, dtype=torch.bfloat16)
    assert not uvqk_op.kernels_apply(xs, nws, nbs, ws, bs, 2, 8, 4)  # qk_dim != v_dim
    xs, nws, nbs, ws, bs = _inputs(3, 12, 2, 8, 8, dtype=torch.bfloat16)
    assert not uvqk_op.kernels_apply(xs, nws, nbs, ws, bs, 2, 8, 8)  # K = 12
    xs, nws, nbs, ws, bs = _inputs(3, 16, 1, 4, 4, dtype=torch.bfloat16)
    assert not uvqk_op.kernels_apply(xs, nws, nbs, ws, bs, 1, 4, 4)  # H * D = 4
    assert not uvqk_op.kernels_apply(x, nw.double(), nb.double(), w, b, 2, 8, 8)  # fp64 LayerNorm parameters
    assert not uvqk_op.kernels_apply(x.to("meta"), nw.to("meta"), nb.to("meta"), w.to("meta"), b.to("meta"),
                                     2, 8, 8)  # fmt: skip


@pytest.mark.parametrize("heads,dim", [(1, 8), (3, 4), (2, 16)])
def test_regrouped_weight_and_parts_give_the_layers_split(heads, dim):
    """The kernels' forward, emulated: the regrouped (4, H D, K) weight and (4, H D) bias, one GEMM per part into a
    (4, T, H D) buffer, then ``cuda.parts``: exactly the layer's split of the head-by-head projection."""
    x, _, _, w, b = _inputs(11, 8, heads, dim, dim, dtype=torch.float64, seed=heads)
    wg, bg = uvqk_cuda.regrouped(w, b, heads, dim, torch.float64)
    assert wg.shape == (4, heads * dim, 8) and bg.shape == (4, heads * dim) and wg.is_contiguous()
    out = torch.baddbmm(bg[:, None, :], x.expand(4, -1, -1), wg.transpose(1, 2))
    got = uvqk_cuda.parts(out, heads, dim)
    want = split_uvqk(F.linear(x, w, b), heads, dim, dim)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.is_contiguous()
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # the backward's row order: the weight's own (head by head, u | v | q | k within a head)
    d_parts = [torch.randn(11, heads * dim, dtype=torch.float64) for _ in range(4)]
    d_pre = torch.stack([d.view(11, heads, dim) for d in d_parts], dim=2).reshape(11, heads * 4 * dim)
    assert torch.equal(uvqk_cuda.regrouped(d_pre.t(), torch.zeros(heads * 4 * dim, dtype=torch.float64), heads,
                                           dim, torch.float64)[0].transpose(1, 2),
                       torch.stack(d_parts))  # fmt: skip


def test_reference_under_autocast_matches_the_layer():
    layer = HSTULayer(16, 2, 8, 8)
    x = torch.randn(9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer.project(x)
        norm, proj = layer.input_norm, layer.uvqk_proj
        got = uvqk_projection(x, norm.weight, norm.bias, proj.weight, proj.bias, num_heads=2, qk_dim=8, v_dim=8,
                              eps=norm.eps)  # fmt: skip
    for a, e in zip(got, want):
        assert a.dtype == e.dtype == torch.bfloat16 and torch.equal(a, e)
