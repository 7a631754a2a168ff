"""The CUDA kernels of csrc/layer/uvqk.cu (the ``hstu_layer`` torch library) with their autograd. No argument
checks here (``op.py`` makes them).

The forward regroups the projection's weight and bias part by part (u, v, q, k; one copy, cast to the GEMM dtype
in the same pass), so that one batched GEMM writes u, v, q, k as four contiguous (T, H D) slices of one buffer:
the attention and the output side take them without a copy. The backward's SiLU-derivative kernel writes the
gradient of the projection's output in the weight's own row order, so dW, db and dLayerNorm(x) need no permutation.
"""

from __future__ import annotations

from typing import Optional

import torch

from hstu.ops._extension import kernels_take, library_registered

KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # the GEMM's dtype (the LayerNorm input may also be float32)
PARTS = 4  # u, v, q, k
# The CUTLASS sm90 GEMM (bias, pre store and SiLU in its epilogue) on sm_90 devices; False: cuBLAS and a SiLU kernel
# on every device (tests compare the two).
SM90_GEMM = True


def available(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors (all on a CUDA device, extension built)."""
    return kernels_take("hstu_layer", "uvqk_fwd", tensors)


def regrouped(weight: torch.Tensor, bias: torch.Tensor, heads: int, dim: int, dtype: torch.dtype):
    """The projection's (H * 4 D, K) weight and (H * 4 D,) bias as (4, H D, K) and (4, H D) in `dtype`: part p's
    rows, head by head."""
    k = weight.shape[1]
    w = torch.empty(PARTS, heads, dim, k, dtype=dtype, device=weight.device)
    w.copy_(weight.detach().view(heads, PARTS, dim, k).transpose(0, 1))
    b = torch.empty(PARTS, heads, dim, dtype=dtype, device=bias.device)
    b.copy_(bias.detach().view(heads, PARTS, dim).transpose(0, 1))
    return w.view(PARTS, heads * dim, k), b.view(PARTS, heads * dim)


def parts(out: torch.Tensor, heads: int, dim: int):
    """(u, v, q, k) of a (4, T, H D) buffer: u as (T, H D), v, q, k as (T, H, D), all contiguous views."""
    rows = out.shape[1]
    return out[0], out[1].view(rows, heads, dim), out[2].view(rows, heads, dim), out[3].view(rows, heads, dim)


def silu_parts(pre: torch.Tensor, heads: int, dim: int):
    """(u, v, q, k) recomputed from the saved pre-activation, bit for bit the forward's."""
    return parts(torch.ops.hstu_layer.uvqk_silu(pre), heads, dim)


class UvqkProjection(torch.autograd.Function):
    """(u, v, q, k, pre) = split(SiLU(pre)), pre = LayerNorm(x) @ W^T + b in `dtype`; pre is returned (not
    differentiable) for callers that recompute u, v, q, k from it. Saves x, the row statistics, pre and x_norm
    (x_norm is recomputed from x and the statistics instead when recompute_input_norm)."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, bias, eps, heads, dim, dtype, recompute_input_norm):
        x, norm_weight, norm_bias = x.contiguous(), norm_weight.contiguous(), norm_bias.contiguous()
        w, b = regrouped(weight, bias, heads, dim, dtype)
        out, pre, x_norm, mean, rstd = torch.ops.hstu_layer.uvqk_fwd(
            x, norm_weight.detach(), norm_bias.detach(), eps, w, b, SM90_GEMM)
        ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd, pre,
                              None if recompute_input_norm else x_norm)  # fmt: skip
        ctx.heads, ctx.dim, ctx.bias_dtype = heads, dim, bias.dtype
        ctx.mark_non_differentiable(pre)
        return (*parts(out, heads, dim), pre)

    @staticmethod
    def backward(ctx, du, dv, dq, dk, _dpre):
        x, norm_weight, norm_bias, weight, mean, rstd, pre, x_norm = ctx.saved_tensors
        rows, n = pre.shape[1], pre.shape[2]
        grads = [torch.zeros(rows, n, dtype=pre.dtype, device=pre.device) if g is None
                 else g.reshape(rows, n).to(pre.dtype).contiguous() for g in (du, dv, dq, dk)]  # fmt: skip
        d_pre = torch.ops.hstu_layer.uvqk_silu_bwd(*grads, pre, ctx.heads)  # (T, H * 4 D), the weight's row order
        needs = ctx.needs_input_grad
        dx = dnorm_weight = dnorm_bias = dweight = dbias = None
        if needs[3]:
            if x_norm is None:
                x_norm = torch.ops.hstu_layer.uvqk_norm(x, norm_weight, norm_bias, mean, rstd, pre.dtype)
            dweight = torch.mm(d_pre.t(), x_norm).to(weight.dtype)
        if needs[4]:
            dbias = d_pre.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        if needs[0] or needs[1] or needs[2]:
            dx_norm = torch.mm(d_pre, weight.to(pre.dtype))
            dx, dnorm_weight, dnorm_bias = torch.ops.hstu_layer.uvqk_norm_bwd(dx_norm, x, norm_weight, mean, rstd)
        return dx, dnorm_weight, dnorm_bias, dweight, dbias, None, None, None, None, None


def uvqk_projection(x, norm_weight, norm_bias, weight, bias, eps: float, heads: int, dim: int, dtype: torch.dtype,
                    recompute_input_norm: bool = False) -> tuple[torch.Tensor, ...]:
    """(u, v, q, k, pre) through the kernels (arguments already checked)."""
    return UvqkProjection.apply(x, norm_weight, norm_bias, weight, bias, eps, heads, dim, dtype,
                                recompute_input_norm)  # fmt: skip


def gemm_backend() -> Optional[str]:
    """'sm90' when the extension has the CUTLASS sm90 GEMM, 'cublas' when only the cuBLAS path, None without it."""
    if not library_registered("hstu_layer", "uvqk_fwd"):
        return None
    return "sm90" if torch.ops.hstu_layer.uvqk_has_sm90_gemm() else "cublas"
