"""The host side of a call: CUDA graph capture and replay of the op (the remedy for host-bound short sequences), and
(``test_cpu_*``, no GPU needed, a fake extension) the arguments and the KernelOptions object that
``cuda.forward`` / ``cuda.backward`` hand the binding.
"""

from __future__ import annotations

import pytest
import torch

from tests.ops.attention_cuda_common import gpu_test

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


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
