"""Inputs the op or the extension refuses before launching anything: mismatched dtypes, bad offsets or targets,
lengths above max_seqlen, views that are not 16-byte aligned (the op copies them, the extension refuses them),
attention dropout inside a CUDA graph capture, and bad KernelVariant fields (``test_cpu_*``: no GPU needed).
"""

from __future__ import annotations

import pytest
import torch

from hstu.ops._extension import load_extension
from tests.ops.attention_cuda_common import gpu_test

pytestmark = pytest.mark.usefixtures("attention_cuda_env")


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
