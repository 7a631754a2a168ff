"""Ranks agreeing on the outcome of work that can fail on some of them (a write on rank 0 only, a file per rank).

Without agreement, a rank that fails leaves the others waiting in their next collective. Every rank calls
:func:`raise_if_any_rank_failed` after the work with its own exception (or None); when any rank failed, every rank
raises, and the ranks that did not fail name the ranks that did and their exceptions.
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from hstu.distributed.context import ParallelContext

T = TypeVar("T")


class OtherRankFailedError(RuntimeError):
    """Raised on a rank whose own part succeeded when another rank failed; the message names the failed ranks and
    their exceptions."""


def describe_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def failures_on_ranks(ctx: ParallelContext, error: Optional[BaseException]) -> dict[int, str]:
    """Collective: {rank: its exception described} of every rank that reports an ``error`` ({} when none did).

    One all-reduce of a flag when every rank succeeded; the descriptions are gathered only after a failure."""
    if ctx.world_size == 1:
        return {} if error is None else {ctx.rank: describe_error(error)}
    flag = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
    dist.all_reduce(flag)
    if not int(flag.item()):
        return {}
    described: list[Optional[str]] = [None] * ctx.world_size
    dist.all_gather_object(described, None if error is None else describe_error(error))
    return {rank: text for rank, text in enumerate(described) if text is not None}


def raise_if_any_rank_failed(ctx: ParallelContext, error: Optional[BaseException], what: str,
                             own_error: Callable[[BaseException], BaseException] = lambda err: err,
                             other_error: Callable[[str], BaseException] = OtherRankFailedError) -> None:
    """Collective: every rank raises when one of them failed at ``what`` (e.g. "writing the checkpoint X").

    A rank that failed raises ``own_error(error)`` (its own exception by default); the others raise
    ``other_error(message)``, the message naming ``what``, the failed ranks and their exceptions."""
    failures = failures_on_ranks(ctx, error)
    if not failures:
        return
    if error is not None:
        raised = own_error(error)
        if raised is error:
            raise error
        raise raised from error
    causes = "; ".join(f"rank {rank}: {text}" for rank, text in sorted(failures.items()))
    raise other_error(f"{what} failed on {len(failures)} other rank(s) ({causes})")


def run_agreed(ctx: ParallelContext, what: str, action: Callable[[], T]) -> T:
    """Collective: ``action()`` on every rank (typically a write that only rank 0 makes, the others doing nothing);
    when it fails on any rank, every rank raises as :func:`raise_if_any_rank_failed` says instead of leaving the
    others waiting in their next collective."""
    result, error = None, None
    try:
        result = action()
    except Exception as err:  # raised again on this rank by the agreement
        error = err
    raise_if_any_rank_failed(ctx, error, what)
    return result


__all__ = ["OtherRankFailedError", "describe_error", "failures_on_ranks", "raise_if_any_rank_failed", "run_agreed"]
