"""The dispatcher's head-dim padding: q, k, v zero-padded to a compiled kernel dim give the unpadded result.

On CPU the padded call runs the reference, so forcing the padding decision checks its exactness (forward and every
gradient, including rab's) without a GPU; the GPU test file checks that d=50 really reaches the kernel.
"""

import random

import pytest
import torch

from hstu.ops import hstu_attention
from hstu.ops.hstu_attention import op
from tests.ops.test_hstu_attention_reference import MASK_FAMILIES, random_problem


@pytest.mark.parametrize("seed", range(6))
def test_padded_head_dims_give_the_unpadded_result(monkeypatch, seed):
    rng = random.Random(seed)
    q, k, v, offsets, max_seqlen, rab, kwargs = random_problem(rng, MASK_FAMILIES[seed % len(MASK_FAMILIES)])
    if rab is not None:
        rab.requires_grad_()
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()] + ([rab] if rab is not None else [])
    expected = hstu_attention(q, k, v, offsets, max_seqlen, rab=rab, **kwargs)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    padded_to = max(q.shape[-1], v.shape[-1]) + rng.randint(1, 20)
    calls = []
    real_forward = op._forward_impl

    def forward_spy(args):
        calls.append((args.q.shape[-1], args.k.shape[-1], args.v.shape[-1]))
        return real_forward(args)

    monkeypatch.setattr(op, "_padded_head_dim", lambda q, v: padded_to)
    monkeypatch.setattr(op, "_forward_impl", forward_spy)
    out = hstu_attention(q, k, v, offsets, max_seqlen, rab=rab, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)

    assert calls == [(padded_to, padded_to, padded_to)]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_no_padding_off_cuda_or_without_the_extension():
    q = torch.randn(5, 1, 50, dtype=torch.bfloat16)
    assert op._padded_head_dim(q, q) == 0


def test_kernel_variant_and_deterministic_reach_the_binding_through_the_op(monkeypatch):
    """The op's kernel path hands the binding one options object: `deterministic` from the op's argument (no
    environment variable overrides it) and the variant from `cuda.kernel_variant` around the call. CPU tensors with
    a stub extension standing in for the kernels."""
    from hstu.ops.hstu_attention import cuda

    seen = []

    class StubExtension:
        class KernelOptions:
            def __init__(self, **fields):
                self.fields = fields

        def hstu_attn_fwd(self, *args, options, **kwargs):
            seen.append(("fwd", options.fields))

        def hstu_attn_bwd(self, *args, options, **kwargs):
            seen.append(("bwd", options.fields))

    monkeypatch.setattr(cuda, "load_extension", lambda: StubExtension())
    monkeypatch.setattr(op, "_use_kernel", lambda *args: True)
    monkeypatch.setenv("HSTU_ATOMIC_DQ", "0")
    cuda._ext_options.cache_clear()
    try:
        q, k, v = (torch.randn(6, 2, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        offsets = torch.tensor([0, 2, 6], dtype=torch.int32)
        variant = cuda.KernelVariant(sm90_forward=False, forward_two_per_sm=True, grouped_schedule=False)
        for deterministic in (False, True):
            seen.clear()
            with cuda.kernel_variant(variant):
                out = hstu_attention(q, k, v, offsets, 4, deterministic=deterministic)
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            assert [direction for direction, _ in seen] == ["fwd", "bwd"]
            for _, fields in seen:
                assert (fields["sm90_forward"], fields["fwd_two_per_sm"], fields["grouped_schedule"]) == (
                    False, True, False)
            assert seen[1][1]["deterministic"] is deterministic
        seen.clear()
        hstu_attention(q.detach(), k.detach(), v.detach(), offsets, 4)  # outside the block: the default variant
        fields = seen[0][1]
        assert fields["fwd_two_per_sm"] is None and fields["sm90_forward"] == cuda.default_variant().sm90_forward
    finally:
        cuda._ext_options.cache_clear()


def test_attention_args_fields_follow_the_custom_op_schemas():
    """The op passes AttentionArgs to its custom ops positionally (op(*args)) and reads their inputs with
    AttentionArgs._make: its fields must be the forward schema's arguments, in order, and the backward's between
    grad_out and rab_needs_grad."""
    from hstu.ops.hstu_attention.args import AttentionArgs

    forward = [a.name for a in torch.ops.hstu.hstu_attention_forward.default._schema.arguments]
    backward = [a.name for a in torch.ops.hstu.hstu_attention_backward.default._schema.arguments]
    assert tuple(forward) == AttentionArgs._fields
    assert tuple(backward) == ("grad_out", *AttentionArgs._fields, "rab_needs_grad")


@pytest.mark.parametrize("rab_grad", [True, False])
@pytest.mark.parametrize("eager", [True, False])
def test_gradients_through_the_custom_op_autograd(monkeypatch, rab_grad, eager):
    """Calling the forward custom op with inputs that need grad runs torch.library's autograd (_setup_context and
    _backward: the path torch.compile takes): each gradient reaches its own input (rab's only when it needs one),
    equal to the public op's; eager=False takes the backward custom op too."""
    if not eager:
        monkeypatch.setattr(op, "_runs_eagerly", lambda *tensors: False)
    gen = torch.Generator().manual_seed(3)
    offsets = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    rab = torch.randn(2, 1, 5, 5, dtype=torch.float64, generator=gen, requires_grad=rab_grad)
    leaves = (q, k, v, rab) if rab_grad else (q, k, v)
    out = torch.ops.hstu.hstu_attention_forward(q, k, v, offsets, 5, 0.25, 7, True, 2, None, None, 1, rab, 0.0, 0,
                                                False)  # fmt: skip
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(out, leaves, grad_out)
    expected = hstu_attention(q, k, v, offsets, 5, alpha=0.25, scaling_seqlen=7, window_size=2, rab=rab)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    want = torch.autograd.grad(expected, leaves, grad_out)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
