"""The CUDA kernels of csrc/layer/norm_mul_dropout.cu (the ``hstu_layer`` torch library) with their autograd. No
argument checks here (``op.py`` makes them)."""

from __future__ import annotations


import torch

from hstu.ops._extension import kernels_take

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (all on a CUDA device, extension built)."""
    return kernels_take("hstu_layer", "norm_mul_dropout_fwd", tensors)


class NormMulDropout(torch.autograd.Function):
    """y = dropout(LayerNorm(x) * u); saves x, u, the row statistics and (seed, offset): the backward draws the
    dropout mask again."""

    @staticmethod
    def forward(ctx, x, u, weight, bias, eps, p, seed, offset):
        x, u = x.contiguous(), u.contiguous()
        weight, bias = weight.contiguous(), bias.contiguous()
        y, mean, rstd = torch.ops.hstu_layer.norm_mul_dropout_fwd(x, u, weight, bias, eps, p, seed, offset)
        ctx.save_for_backward(x, u, weight, bias, mean, rstd)
        ctx.dropout = (p, seed, offset)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, weight, bias, mean, rstd = ctx.saved_tensors
        dx, du, dweight, dbias = torch.ops.hstu_layer.norm_mul_dropout_bwd(
            dy.contiguous(), x, u, weight, bias, mean, rstd, *ctx.dropout)
        return dx, du, dweight, dbias, None, None, None, None


def keep_mask(rows: int, width: int, p: float, seed: int, offset: int, device) -> torch.Tensor:
    """The kernels' keep mask of a (rows, width) input for (p, seed, offset), read back through the forward (for
    tests; the training path never stores it): with these inputs every element before dropout is nonzero, so the
    output is nonzero exactly where the element is kept."""
    # rows alternating 1, 0: LayerNorm gives values of magnitude at most ~1.5, and the bias 2 keeps them off 0
    x = torch.zeros(rows, width, device=device)
    x[:, 0::2] = 1.0
    if width == 1:
        x.zero_()
    weight = torch.ones(width, device=device)
    bias = torch.full((width,), 2.0, device=device)  # keeps the normalised value away from 0 for width 1 too
    y, _, _ = torch.ops.hstu_layer.norm_mul_dropout_fwd(x, torch.ones_like(x), weight, bias, 1e-5, p, seed, offset)
    return y != 0
