"""``layer_norm_mul_dropout``: argument checks, then the CUDA kernels (csrc/layer/norm_mul_dropout.cu) for real
CUDA tensors of a kernel dtype when the extension has them, else the PyTorch reference (CPU, meta and fake tensors,
torch.compile, float64)."""

from __future__ import annotations

import math

import torch

from hstu.ops._validation import check_float_tensor, check_same_device, values_are_concrete
from hstu.ops.norm_mul_dropout import cuda
from hstu.ops.norm_mul_dropout.reference import layer_norm_mul_dropout_reference


def _check_float(name: str, value: object) -> float:
    """A finite real number (int or float, not bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _use_kernels(*tensors: torch.Tensor) -> bool:
    """Real (not fake or meta) CUDA tensors of a kernel dtype, the extension built with the kernels."""
    return tensors[0].dtype in cuda.KERNEL_DTYPES and values_are_concrete(*tensors) and cuda.available(*tensors)


def layer_norm_mul_dropout(
    x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, eps: float = 1e-6,
    dropout_p: float = 0.0, training: bool = True,
) -> torch.Tensor:
    """dropout(LayerNorm(x; weight, bias, eps) * u, dropout_p) for x, u: (rows, d) and weight, bias: (d,), in x's
    dtype; LayerNorm statistics in fp32. Dropout applies when ``training`` and dropout_p > 0.

    weight and bias: x's dtype or float32 (an fp32 LayerNorm under autocast). On CUDA the kernels draw the dropout
    mask from a seed taken from torch's CPU generator (follows torch.manual_seed, no device sync) and draw it again
    in the backward instead of storing it; the reference uses ``F.dropout``.
    """
    x = check_float_tensor("x", x, 2)
    u = check_float_tensor("u", u, 2)
    weight = check_float_tensor("weight", weight, 1)
    bias = check_float_tensor("bias", bias, 1)
    if u.shape != x.shape:
        raise ValueError(f"u must have x's shape {tuple(x.shape)}, got {tuple(u.shape)}")
    if u.dtype != x.dtype:
        raise TypeError(f"u must have x's dtype {x.dtype}, got {u.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column to normalise, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},) (x's width), got {tuple(t.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"weight must have x's dtype {x.dtype} or float32, got {weight.dtype}")
    check_same_device("x", x, u=u, weight=weight, bias=bias)
    eps = _check_float("eps", eps)
    if eps <= 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    dropout_p = _check_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    p = dropout_p if training else 0.0
    if _use_kernels(x, u, weight, bias):
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0
        return cuda.NormMulDropout.apply(x, u, weight, bias, eps, p, seed, 0)
    return layer_norm_mul_dropout_reference(x, u, weight, bias, eps, p, p > 0.0)
