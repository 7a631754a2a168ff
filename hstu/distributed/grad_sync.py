"""Explicit gradient averaging for parameters that no DDP wrapper owns.

Used for (a) the dense parameters on CPU, where Megatron-core's DDP cannot run (its gradient buffers are allocated
on ``torch.cuda.current_device()``), and (b) replicated embedding tables (data-parallel tables, or tables kept
unsharded on CPU). Torch's DDP is not used for (a) because it only reduces gradients when the forward goes through
its wrapper, while our models call their dense submodules directly; an all-reduce after ``backward()`` is
equivalent and independent of the call structure.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per collective


class GradientAllReduce:
    """Averages ``.grad`` of ``params`` over ``group`` (sum in fp32, divide by the group size)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], group: Optional[dist.ProcessGroup],
                 reduce_in_fp32: bool = True):
        unique, seen = [], set()
        for p in params:
            if p.requires_grad and id(p) not in seen:
                unique.append(p)
                seen.add(id(p))
        self.params = unique
        self.group = group
        self.reduce_in_fp32 = reduce_in_fp32

    def finish_grad_sync(self) -> None:
        size = dist.get_world_size(self.group) if dist.is_initialized() else 1
        if size == 1 or not self.params:
            return
        # A parameter unused on this rank (grad None) still takes part, as zeros, so that every rank issues the
        # same collectives.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in self._buckets():
            dtype = torch.float32 if self.reduce_in_fp32 else bucket[0].grad.dtype
            flat = torch.cat([p.grad.reshape(-1).to(dtype) for p in bucket])
            dist.all_reduce(flat, group=self.group)
            flat.div_(size)
            offset = 0
            for p in bucket:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n

    def _buckets(self):
        bucket, count = [], 0
        for p in self.params:
            if bucket and (count + p.numel() > _BUCKET_ELEMENTS or p.grad.device != bucket[0].grad.device):
                yield bucket
                bucket, count = [], 0
            bucket.append(p)
            count += p.numel()
        if bucket:
            yield bucket
