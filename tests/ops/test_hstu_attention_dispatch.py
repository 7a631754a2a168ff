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

    def forward_spy(q, k, v, *args):
        calls.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real_forward(q, k, v, *args)

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
