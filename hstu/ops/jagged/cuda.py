"""CUDA implementations of the jagged ops (csrc/jagged/jagged.cu, the ``hstu_jagged`` torch library) with their
autograd. No argument checks here. Every function takes the host sizes its outputs need (``total`` rows and the
like) from the caller, so none reads a device value. The public ops in ``hstu.ops.jagged.op`` dispatch here when
``op.USE_CUDA_KERNELS`` is on, which it is not until these kernels have passed tests/ops/test_jagged_cuda.py on a
GPU.
"""

from __future__ import annotations


import torch

from hstu.ops._extension import kernels_take


def available(*tensors: torch.Tensor) -> bool:
    """Whether the CUDA kernels take these tensors (all on a CUDA device, extension built)."""
    return kernels_take("hstu_jagged", "to_padded", tensors)


def _ops():
    return torch.ops.hstu_jagged


class _ToPadded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, offsets, max_length, padding_value):
        ctx.save_for_backward(offsets)
        ctx.total = values.shape[0]
        return _ops().to_padded(values.contiguous(), offsets, max_length, padding_value)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        # rows past max_length were dropped: their gradient is zero (from_padded writes zeros there)
        return _ops().from_padded(grad.contiguous(), offsets, ctx.total), None, None, None


class _FromPadded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dense, offsets, total):
        ctx.save_for_backward(offsets)
        ctx.max_length = dense.shape[1]
        return _ops().from_padded(dense.contiguous(), offsets, total)

    @staticmethod
    def backward(ctx, grad):
        (offsets,) = ctx.saved_tensors
        return _ops().to_padded(grad.contiguous(), offsets, ctx.max_length, 0), None, None


class _Concat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, offsets_a, b, offsets_b):
        out_offsets = offsets_a + offsets_b
        ctx.save_for_backward(offsets_a, offsets_b, out_offsets)
        ctx.totals = (a.shape[0], b.shape[0])
        ctx.mark_non_differentiable(out_offsets)
        return _ops().concat(a.contiguous(), offsets_a, b.contiguous(), offsets_b, out_offsets), out_offsets

    @staticmethod
    def backward(ctx, grad, _grad_offsets):
        offsets_a, offsets_b, out_offsets = ctx.saved_tensors
        grad_a, grad_b = _ops().split(grad.contiguous(), offsets_a, offsets_b, out_offsets, *ctx.totals)
        return grad_a, None, grad_b, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, offsets_a, offsets_b, total_a, total_b):
        out_offsets = offsets_a + offsets_b
        ctx.save_for_backward(offsets_a, offsets_b, out_offsets)
        return _ops().split(values.contiguous(), offsets_a, offsets_b, out_offsets, total_a, total_b)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        offsets_a, offsets_b, out_offsets = ctx.saved_tensors
        return _ops().concat(grad_a.contiguous(), offsets_a, grad_b.contiguous(), offsets_b, out_offsets), None, None, \
            None, None


def jagged_to_padded_dense(values: torch.Tensor, offsets: torch.Tensor, max_length: int,
                           padding_value: float = 0.0) -> torch.Tensor:
    return _ToPadded.apply(values, offsets, max_length, padding_value)


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """total: offsets[-1], from the caller (the batch holds it on the host)."""
    return _FromPadded.apply(dense, offsets, total)


def concat_2d_jagged(values_a: torch.Tensor, offsets_a: torch.Tensor, values_b: torch.Tensor,
                     offsets_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """offsets_a and offsets_b in one dtype; returns (values, offsets_a + offsets_b)."""
    return _Concat.apply(values_a, offsets_a, values_b, offsets_b)


def split_2d_jagged(values: torch.Tensor, offsets_a: torch.Tensor, offsets_b: torch.Tensor, total_a: int,
                    total_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """total_a, total_b: offsets_a[-1] and offsets_b[-1], from the caller."""
    return _Split.apply(values, offsets_a, offsets_b, total_a, total_b)
