"""``uvqk_projection``: argument checks, then the CUDA kernels (csrc/layer/uvqk.cu) where they apply, else the
PyTorch reference (CPU, meta and fake tensors, torch.compile, float32 / float64 GEMMs, qk_dim != v_dim, widths
that are not multiples of 8).

The kernels apply to real CUDA tensors whose GEMM dtype (the autocast dtype under autocast, else x's dtype) is
bfloat16 or float16, with qk_dim == v_dim and the input width K and H * qk_dim multiples of 8 (TMA alignment), the
LayerNorm parameters in x's dtype or float32 and the projection's in the GEMM dtype or float32. ``USE_CUDA_KERNELS``
switches them on once they have passed tests/ops/test_uvqk_cuda.py on a GPU.
"""

from __future__ import annotations

import math

import torch

from hstu.ops._validation import INT32_MAX, check_float_tensor, check_int, check_same_device, values_are_concrete
from hstu.ops.uvqk import cuda
from hstu.ops.uvqk.reference import uvqk_projection_reference

# Off until the kernels have passed their GPU tests: every call runs the PyTorch reference.
USE_CUDA_KERNELS = False


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's for x's device when autocast is on there, else x's."""
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _check_args(x, norm_weight, norm_bias, weight, bias, num_heads, qk_dim, v_dim, eps) -> tuple[int, int, int, float]:
    x = check_float_tensor("x", x, 2)
    norm_weight = check_float_tensor("norm_weight", norm_weight, 1)
    norm_bias = check_float_tensor("norm_bias", norm_bias, 1)
    weight = check_float_tensor("weight", weight, 2)
    bias = check_float_tensor("bias", bias, 1)
    num_heads = check_int("num_heads", num_heads, 1)
    qk_dim = check_int("qk_dim", qk_dim, 1)
    v_dim = check_int("v_dim", v_dim, 1)
    width = x.shape[1]
    if width == 0:
        raise ValueError(f"x must have at least one column to normalise, got shape {tuple(x.shape)}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t.shape != (width,):
            raise ValueError(f"{name} must have shape ({width},) (x's width), got {tuple(t.shape)}")
    if norm_bias.dtype != norm_weight.dtype:
        raise TypeError(f"norm_bias must have norm_weight's dtype {norm_weight.dtype}, got {norm_bias.dtype}")
    if norm_weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"norm_weight must have x's dtype {x.dtype} or float32, got {norm_weight.dtype}")
    out = num_heads * (2 * v_dim + 2 * qk_dim)
    if weight.shape != (out, width):
        raise ValueError(f"weight must have shape ({out}, {width}) (num_heads * (2 v_dim + 2 qk_dim), x's width), "
                         f"got {tuple(weight.shape)}")  # fmt: skip
    if bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},) (weight's rows), got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    device = x.device.type
    if not (device in ("cuda", "cpu") and torch.is_autocast_enabled(device)) and weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} outside autocast, got {weight.dtype}")
    check_same_device("x", x, norm_weight=norm_weight, norm_bias=norm_bias, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return num_heads, qk_dim, v_dim, float(eps)


def kernels_apply(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, num_heads: int, qk_dim: int, v_dim: int) -> bool:
    """Whether ``uvqk_projection`` runs these (already checked) arguments through the CUDA kernels."""
    dtype = gemm_dtype(x)
    return (USE_CUDA_KERNELS and qk_dim == v_dim and dtype in cuda.KERNEL_DTYPES
            and x.dtype in (torch.float32, *cuda.KERNEL_DTYPES) and norm_weight.dtype in (x.dtype, torch.float32)
            and weight.dtype in (dtype, torch.float32) and x.shape[1] % 8 == 0 and (num_heads * qk_dim) % 8 == 0
            and x.shape[0] <= INT32_MAX and values_are_concrete(x, norm_weight, norm_bias, weight, bias)
            and cuda.available(x, norm_weight, norm_bias, weight, bias))  # fmt: skip


def uvqk_projection(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    *, num_heads: int, qk_dim: int, v_dim: int, eps: float = 1e-6, recompute_input_norm: bool = False,
    return_pre: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(u, v, q, k) = split(SiLU(LayerNorm(x; norm_weight, norm_bias, eps) @ weight^T + bias)) for the tokens x:
    (T, K); weight: (H (2 Dv + 2 Dqk), K) laid out head by head ([u_h | v_h | q_h | k_h]), bias: its rows. u comes
    as (T, H Dv), v as (T, H, Dv), q and k as (T, H, Dqk), in the GEMM dtype (``gemm_dtype``).

    recompute_input_norm: the kernels' backward recomputes x_norm from x and the row statistics instead of keeping
    it (the reference keeps what torch's autograd keeps). return_pre: also return the projection's output before
    the SiLU, (4, T, H D) as the kernels keep it, or None on the reference path (for callers that recompute u, v, q,
    k from it: ``cuda.silu_parts``).
    """
    num_heads, qk_dim, v_dim, eps = _check_args(x, norm_weight, norm_bias, weight, bias, num_heads, qk_dim, v_dim,
                                                eps)  # fmt: skip
    if not isinstance(recompute_input_norm, bool):
        raise TypeError(f"recompute_input_norm must be a bool, got {type(recompute_input_norm).__name__}")
    if kernels_apply(x, norm_weight, norm_bias, weight, bias, num_heads, qk_dim, v_dim):
        out = cuda.uvqk_projection(x, norm_weight, norm_bias, weight, bias, eps, num_heads, qk_dim, gemm_dtype(x),
                                   recompute_input_norm)  # fmt: skip
        return out if return_pre else out[:4]
    out = uvqk_projection_reference(x, norm_weight, norm_bias, weight, bias, num_heads, qk_dim, v_dim, eps)
    return (*out, None) if return_pre else out
