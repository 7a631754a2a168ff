"""uvqk_projection's CUDA kernels (csrc/layer/uvqk.cu; skip without a GPU or the built extension): forward and
backward against the fp64 reference with the 2x forward / 5x gradient rule (baseline: the same PyTorch composition in
the GEMM dtype), over the models' widths (hidden 64..1024, out 4 H D), T = 0, 1 and ragged sizes, bf16 and fp16,
fp32 inputs under autocast, the sm90 CUTLASS GEMM and the cuBLAS path; recompute_input_norm and the SiLU
recomputation bit for bit; and the HSTU layer with and without the fused op under the same rule."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from hstu.ops.uvqk import cuda as uvqk_cuda
from hstu.ops.uvqk import op as uvqk_op
from hstu.ops.uvqk import split_uvqk, uvqk_projection, uvqk_projection_reference
from tests.conftest import requires_cuda


def _needs_kernels():
    if not uvqk_cuda.available(torch.empty(0, device="cuda")):
        pytest.skip("hstu._C was built without the uvqk kernels")


@pytest.fixture
def kernels_on(monkeypatch):
    _needs_kernels()
    monkeypatch.setattr(uvqk_op, "USE_CUDA_KERNELS", True)


def _inputs(rows, width, heads, dim, x_dtype, param_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    out = heads * 4 * dim
    x = torch.randn(rows, width, generator=gen) * 2 + 0.5
    nw = 1 + 0.3 * torch.randn(width, generator=gen)
    nb = 0.2 * torch.randn(width, generator=gen)
    w = torch.randn(out, width, generator=gen) * 0.05
    b = 0.1 * torch.randn(out, generator=gen)
    dtypes = (x_dtype, param_dtype, param_dtype, param_dtype, param_dtype)
    return [t.to("cuda", d) for t, d in zip((x, nw, nb, w, b), dtypes)]


def _run(fn, tensors, grads, upcast):
    leaves = [t.detach().double().requires_grad_(True) if upcast else t.detach().clone().requires_grad_(True)
              for t in tensors]  # fmt: skip
    outs = fn(*leaves)
    if outs[0].shape[0]:
        got = torch.autograd.grad(outs, leaves, [g.to(o.dtype).view_as(o) for g, o in zip(grads, outs)])
    else:
        got = [torch.zeros_like(t) for t in leaves]
    return [o.detach() for o in outs], got


def _check(rows, width, heads, dim, dtype, autocast, sm90, seed, monkeypatch, recompute_input_norm=False):
    from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity

    monkeypatch.setattr(uvqk_cuda, "SM90_GEMM", sm90)
    x_dtype, param_dtype = (torch.float32, torch.float32) if autocast else (dtype, dtype)
    tensors = _inputs(rows, width, heads, dim, x_dtype, param_dtype, seed)
    kw = dict(num_heads=heads, qk_dim=dim, v_dim=dim, eps=1e-5)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    grads = [torch.randn(rows, heads * dim, device="cuda", generator=gen) for _ in range(4)]
    assert uvqk_op.kernels_apply(*[t.to(dtype) if not autocast else t for t in tensors], heads, dim, dim)

    def kernel(*t):
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            return uvqk_projection(*t, recompute_input_norm=recompute_input_norm, **kw)

    def lowp(*t):  # plain PyTorch in the GEMM dtype: the LayerNorm in fp32 (as autocast runs it), then cast
        normed = F.layer_norm(t[0].float(), (width,), t[1].float(), t[2].float(), 1e-5).to(dtype)
        return split_uvqk(F.silu(F.linear(normed, t[3].to(dtype), t[4].to(dtype))), heads, dim, dim)

    got = _run(kernel, tensors, grads, upcast=False)
    ref = _run(lambda *t: uvqk_projection_reference(*t, heads, dim, dim, 1e-5), tensors, grads, upcast=True)
    base = _run(lowp, tensors, grads, upcast=False)
    where = f"T={rows} K={width} H={heads} D={dim} {dtype} autocast={autocast} sm90={sm90}"
    for name, a, r, l in zip("uvqk", got[0], ref[0], base[0]):
        assert a.dtype == dtype and a.is_contiguous(), (name, where)
        assert_parity(f"{name} {where}", a, r, l, factor=FORWARD_FACTOR)
    for name, a, r, l in zip(("dx", "dnorm_weight", "dnorm_bias", "dweight", "dbias"), got[1], ref[1], base[1]):
        assert a.dtype == l.dtype, (name, where)  # each gradient in its input's dtype
        assert_parity(f"{name} {where}", a, r, l, factor=BACKWARD_FACTOR)
    return got


# (hidden K, heads, head dim): the models' widths (configs/*.gin) and the benchmark's 1024 / 4 x 256
SHAPES = [(64, 1, 32), (64, 2, 64), (128, 1, 64), (256, 2, 128), (512, 4, 128), (1024, 4, 256), (1024, 8, 64)]


@requires_cuda
@pytest.mark.parametrize("seed", range(16))
def test_kernels_match_the_reference(seed, kernels_on, monkeypatch):
    rng = random.Random(seed)
    width, heads, dim = SHAPES[seed % len(SHAPES)]
    rows = [0, 1, 7][seed] if seed < 3 else rng.choice([rng.randint(2, 300), rng.randint(300, 5000)])
    dtype = [torch.bfloat16, torch.float16][seed % 2]
    autocast = seed % 3 != 0
    _check(rows, width, heads, dim, dtype, autocast, sm90=seed % 4 != 3, seed=seed, monkeypatch=monkeypatch)


@requires_cuda
@pytest.mark.parametrize("sm90", [True, False])
def test_recompute_input_norm_and_silu_are_bit_identical(sm90, kernels_on, monkeypatch):
    """The backward with x_norm recomputed equals the one with it kept, and SiLU recomputed from the returned pre
    equals the forward's u, v, q, k, bit for bit."""
    monkeypatch.setattr(uvqk_cuda, "SM90_GEMM", sm90)
    tensors = _inputs(333, 256, 2, 64, torch.float32, torch.float32, seed=5)
    kw = dict(num_heads=2, qk_dim=64, v_dim=64)
    results = []
    for recompute in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            *parts, pre = uvqk_projection(*leaves, recompute_input_norm=recompute, return_pre=True, **kw)
        assert pre is not None and pre.shape == (4, 333, 128)
        for a, b in zip(uvqk_cuda.silu_parts(pre, 2, 64), parts):
            assert torch.equal(a, b)
        loss = sum((p.float() * (i + 1)).sin().sum() for i, p in enumerate(parts))
        results.append([*map(torch.Tensor.detach, parts), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_cuda
def test_sm90_gemm_matches_the_cublas_path(kernels_on, monkeypatch):
    """Where the CUTLASS sm90 GEMM runs, its u, v, q, k and pre are the cuBLAS path's to within one bf16 rounding
    of pre (both round acc + bias once, then SiLU in fp32 from that)."""
    if uvqk_cuda.gemm_backend() != "sm90" or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU and the sm90 GEMM in the extension")
    tensors = _inputs(1000, 1024, 4, 256, torch.bfloat16, torch.bfloat16, seed=3)
    out = {}
    for sm90 in (True, False):
        monkeypatch.setattr(uvqk_cuda, "SM90_GEMM", sm90)
        with torch.no_grad():
            out[sm90] = uvqk_projection(*tensors, num_heads=4, qk_dim=256, v_dim=256, return_pre=True)
    for a, b in zip(out[True], out[False]):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-7)


@requires_cuda
@pytest.mark.parametrize("recompute", [False, True])
def test_layer_with_and_without_the_fused_op(recompute, monkeypatch):
    """One HSTU layer under bf16 autocast, the fused op on and off: output and gradients against the layer in fp64
    (reference attention) with the 2x / 5x rule, the unfused bf16 layer as the baseline."""
    _needs_kernels()
    from hstu.modules.hstu_layer import AttentionInputs, HSTULayer
    from hstu.testing.parity import BACKWARD_FACTOR, FORWARD_FACTOR, assert_parity

    torch.manual_seed(0)
    layer = HSTULayer(256, 2, 64, 64, recompute_input_norm=recompute, recompute_silu=recompute).cuda().train()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    lengths = [0, 1, 37, 200, 64]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    x = torch.randn(sum(lengths), 256, device="cuda")
    dy = torch.randn_like(x)

    def run(fused, backend="fused", dtype=torch.float32, autocast=True):
        monkeypatch.setattr(uvqk_op, "USE_CUDA_KERNELS", fused)
        model = layer if dtype == torch.float32 else HSTULayer(256, 2, 64, 64).to("cuda", dtype).train()
        if model is not layer:
            model.load_state_dict({k: v.to(dtype) for k, v in layer.state_dict().items()})
        xi = x.detach().to(dtype).requires_grad_(True)
        inputs = AttentionInputs(offsets, max(lengths), attention_backend=backend)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = model(xi, inputs)
        grads = torch.autograd.grad(y, [xi, *model.parameters()], dy.to(y.dtype))
        return y.detach(), grads

    fused = run(True)
    unfused = run(False)
    ref = run(False, backend="reference", dtype=torch.float64, autocast=False)
    assert_parity("layer output", fused[0], ref[0], unfused[0], factor=FORWARD_FACTOR)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, a, r, b in zip(names, fused[1], ref[1], unfused[1]):
        assert_parity(f"layer grad {name}", a, r, b, factor=BACKWARD_FACTOR)
