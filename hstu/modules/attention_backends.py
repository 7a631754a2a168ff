"""Which implementation computes the attention of the HSTU layers (``NetworkArgs.attention_backend``).

* ``fused``: :func:`hstu.ops.hstu_attention`, our CUDA kernels where they support the call, else the PyTorch
  reference (always the reference on CPU).
* ``reference``: the PyTorch reference (:func:`hstu.ops.hstu_attention_reference`) on every device.
* ``triton``: Meta's generative-recommenders Triton kernel (``triton_hstu_mha``), when that package is importable.
  It divides the SiLU weights by its sequence bound N, which is our ``scaling_seqlen``; it has no relative attention
  bias, attention dropout, target groups, non-causal mode or per-sequence contextual counts, so those settings are
  refused before training starts (:func:`check_backend_settings`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional

import torch

from hstu.ops import hstu_attention_reference

ATTENTION_BACKENDS = ("fused", "reference", "triton")
_TRITON_MODULE = "generative_recommenders.ops.triton.triton_hstu_attention"


class AttentionBackendError(ValueError):
    """An attention backend cannot run here or with these settings (the message names the field)."""


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor,
                        max_seqlen: int, *, dropout_p: float = 0.0, deterministic: bool = False,
                        **masks) -> torch.Tensor:
    """The PyTorch reference with ``hstu_attention``'s arguments (the reference is deterministic anyway). The
    dropout seed is drawn from torch's CPU generator as ``hstu_attention`` draws it, so both drop the same weights."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0
    out = hstu_attention_reference(q, k, v, seq_offsets, max_seqlen, dropout_p=dropout_p, dropout_seed=seed, **masks)
    return out.to(q.dtype)


@functools.lru_cache(maxsize=None)
def load_triton_attention() -> Callable:
    """Meta's ``triton_hstu_mha``; an :class:`AttentionBackendError` naming the field when it cannot be imported."""
    try:
        module = __import__(_TRITON_MODULE, fromlist=["triton_hstu_mha"])
        return module.triton_hstu_mha
    except (ImportError, AttributeError) as err:
        raise AttentionBackendError(
            "NetworkArgs.attention_backend='triton' (the example's NetworkArgs.kernel_backend='triton') needs Meta's "
            f"generative-recommenders package ({_TRITON_MODULE}.triton_hstu_mha), which cannot be imported here "
            f"({err}); install it (github.com/meta-recsys/generative-recommenders) or use 'fused'") from None


def check_backend_settings(backend: str, *, causal: bool, relative_attention_bias: bool, attention_dropout: float,
                           target_group_size: int) -> None:
    """Settings that ``backend`` cannot compute, as an :class:`AttentionBackendError` naming the fields; for
    ``triton`` also whether Meta's package imports."""
    if backend not in ATTENTION_BACKENDS:
        raise AttentionBackendError(f"NetworkArgs.attention_backend must be one of {ATTENTION_BACKENDS}, "
                                    f"got {backend!r}")
    if backend != "triton":
        return
    unsupported = [name for name, bad in (
        ("NetworkArgs.causal=False", not causal),
        ("NetworkArgs.relative_attention_bias=True", relative_attention_bias),
        (f"NetworkArgs.attention_dropout={attention_dropout}", attention_dropout > 0.0),
        (f"NetworkArgs.target_group_size={target_group_size}", target_group_size != 1),
    ) if bad]  # fmt: skip
    if unsupported:
        raise AttentionBackendError("NetworkArgs.attention_backend='triton' (Meta's Triton kernel) cannot compute "
                                    + ", ".join(unsupported) + "; use 'fused' or 'reference' for them")
    load_triton_attention()


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor, max_seqlen: int,
                     *, alpha: float, scaling_seqlen: Optional[int], num_targets: Optional[torch.Tensor],
                     num_contextual: int, rab: Optional[torch.Tensor] = None, rab_tables: Optional[object] = None,
                     dropout_p: float = 0.0, causal: bool = True, target_group_size: int = 1,
                     **unused) -> torch.Tensor:
    """Meta's Triton kernel with our arguments: its N (sequence bound and divisor) is ``scaling_seqlen``, its
    contextual count one int for every sequence (``num_contexts`` and ``deterministic`` play no further part). What
    it cannot apply (a relative bias, attention dropout, full attention, target groups) is an
    :class:`AttentionBackendError` naming the argument; check_backend_settings refuses the settings that lead to
    them before training starts."""
    refused = [name for name, bad in (
        ("rab", rab is not None),
        ("rab_tables", rab_tables is not None),
        (f"dropout_p={dropout_p}", dropout_p > 0.0),
        ("causal=False", not causal),
        (f"target_group_size={target_group_size}", target_group_size != 1),
    ) if bad]  # fmt: skip
    if refused:
        raise AttentionBackendError("attention_backend='triton' (Meta's Triton kernel) cannot apply "
                                    + ", ".join(refused) + "; use the 'fused' or 'reference' backend")
    n = max_seqlen if scaling_seqlen is None else scaling_seqlen
    if n < max_seqlen:
        raise AttentionBackendError(
            f"NetworkArgs.attention_backend='triton' needs NetworkArgs.scaling_seqlen >= the longest sequence "
            f"({max_seqlen} tokens), got {scaling_seqlen}: Meta's kernel uses it as the sequence bound too")
    kernel = load_triton_attention()
    extra = {"causal": True} if "causal" in _parameters(kernel) else {}
    return kernel(N=n, alpha=alpha, q=q, k=k, v=v, seq_offsets=seq_offsets, num_targets=num_targets,
                  contextual_seq_len=num_contextual, **extra)


def _parameters(fn: Callable) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return ()
