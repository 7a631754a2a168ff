"""The low-precision parity rule for kernels.

A kernel result passes when its worst error against the fp32 reference is at most ``factor`` times the worst
error of plain PyTorch in the same dtype against that reference (2x forward, 5x gradients), plus a small
absolute floor so that exact-zero baselines (e.g. all-masked rows) don't demand bit-exactness.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 5.0


class ParityError(AssertionError):
    pass


@dataclasses.dataclass
class ParityResult:
    name: str
    kernel_error: float
    baseline_error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.kernel_error <= self.bound


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.double() - b.double()).abs()
    # NaN anywhere (e.g. a poisoned element the kernel never wrote) must fail, not vanish in max().
    if bool(torch.isnan(diff).any()):
        return float("inf")
    return float(diff.max())


def assert_parity(
    name: str,
    kernel: torch.Tensor,
    reference: torch.Tensor,
    same_dtype_torch: torch.Tensor,
    *,
    factor: float,
    abs_floor: Optional[float] = None,
) -> ParityResult:
    """Raise ParityError unless |kernel - reference|max <= factor * |same_dtype_torch - reference|max + floor."""
    if kernel.shape != reference.shape:
        raise ParityError(f"{name}: kernel shape {tuple(kernel.shape)} != reference shape {tuple(reference.shape)}")
    if abs_floor is None:
        eps = torch.finfo(kernel.dtype).eps if kernel.dtype.is_floating_point else 0.0
        scale = float(reference.double().abs().max()) if reference.numel() else 0.0
        abs_floor = eps * max(scale, 1e-3)
    result = ParityResult(
        name=name,
        kernel_error=_max_abs_diff(kernel, reference),
        baseline_error=_max_abs_diff(same_dtype_torch, reference),
        bound=0.0,
    )
    result.bound = factor * result.baseline_error + abs_floor
    if not result.ok:
        raise ParityError(
            f"{name}: kernel error {result.kernel_error:.3e} > bound {result.bound:.3e} "
            f"({factor}x same-dtype torch error {result.baseline_error:.3e} + floor {abs_floor:.1e})"
        )
    return result


def attention_parity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seqlen: int,
    *,
    impl: Optional[Callable[..., torch.Tensor]] = None,
    rab: Optional[torch.Tensor] = None,
    rab_requires_grad: bool = False,
    backward: bool = True,
    grad_out: Optional[torch.Tensor] = None,
    **kwargs,
) -> list[ParityResult]:
    """Run ``impl`` (default: ``hstu.ops.hstu_attention``) forward and backward and check it with the rule.

    q, k, v (and rab) are the low-precision inputs. The fp32 reference runs on upcast copies; the same-dtype
    baseline runs the reference math in the inputs' dtype. Returns one result per checked tensor.
    """
    from hstu.ops import hstu_attention
    from hstu.ops.hstu_attention.reference import hstu_attention_reference

    impl = impl or hstu_attention
    kwargs = dict(kwargs)
    results: list[ParityResult] = []

    def run(fn, dtype, upcast_args):
        leaves = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]
        rab_leaf = None
        if rab is not None:
            rab_leaf = rab.detach().to(dtype if upcast_args else rab.dtype).requires_grad_(backward and rab_requires_grad)
        out = fn(*leaves, seq_offsets, max_seqlen, rab=rab_leaf, **kwargs)
        grads = {}
        if backward:
            inputs = leaves + ([rab_leaf] if rab_requires_grad and rab_leaf is not None else [])
            g = grad_out if grad_out is not None else _default_grad_out(out)
            computed = torch.autograd.grad(out, inputs, g.to(out.dtype))
            grads = dict(zip(("dq", "dk", "dv", "drab"), computed))
        return out.detach(), grads

    kernel_out, kernel_grads = run(impl, q.dtype, upcast_args=False)
    ref_out, ref_grads = run(hstu_attention_reference, torch.float32, upcast_args=True)
    lowp_out, lowp_grads = run(lambda *a, **kw: hstu_attention_reference(*a, upcast=False, **kw), q.dtype, False)
    results.append(assert_parity("out", kernel_out, ref_out, lowp_out, factor=FORWARD_FACTOR))
    for name in kernel_grads:
        results.append(
            assert_parity(name, kernel_grads[name], ref_grads[name], lowp_grads[name], factor=BACKWARD_FACTOR)
        )
    return results


def _default_grad_out(out: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=out.device)
    generator.manual_seed(1234)
    return torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
