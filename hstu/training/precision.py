"""Mixed precision of the training step: bf16 autocast (the default on GPU), or fp16 autocast with dynamic loss
scaling (``TrainerArgs.fp16``; the NVIDIA example's ``NetworkArgs.dtype_str='float16'``).

The fp16 step follows ``torch.amp.GradScaler``: the loss is multiplied by the scale before backward; after the
gradient reduction every torch optimizer's gradients are unscaled (and checked for inf/nan) before clipping; an
optimizer whose gradients are not finite skips its update, and the scale then halves; after ``growth_interval``
finite steps in a row it doubles. The scaler's state is part of each checkpoint, so a resumed run continues with
the same scale and growth count.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

# Device types on which fp16 training runs. CPU autocast to float16 exists but is slow and not what the NVIDIA
# example's fp16 means (its fp16 runs on GPUs); a CPU run with fp16 is refused.
FP16_DEVICE_TYPES = ("cuda",)


class Precision:
    """Autocast context, backward and optimizer step of one run's precision."""

    def __init__(self, device: torch.device, bf16: bool, fp16: bool, init_scale: float = 2.0 ** 16,
                 growth_interval: int = 2000):
        if fp16 and device.type not in FP16_DEVICE_TYPES:
            raise ValueError(f"TrainerArgs.fp16=True (the NVIDIA example's NetworkArgs.dtype_str='float16') needs a "
                             f"CUDA device, and this run is on {device.type}: use bf16 (the default) or run on a GPU")
        self.device = device
        if fp16:
            self.dtype: Optional[torch.dtype] = torch.float16
        else:
            self.dtype = torch.bfloat16 if bf16 and device.type == "cuda" else None
        self.scaler = (torch.amp.GradScaler(device.type, init_scale=init_scale, growth_interval=growth_interval)
                       if fp16 else None)

    def check_model(self, parallel) -> None:
        """fp16 needs every update to go through a torch optimizer that the scaler can skip."""
        if self.scaler is None:
            return
        if parallel.dense.uses_megatron:
            raise ValueError("TrainerArgs.fp16=True (NetworkArgs.dtype_str='float16') runs on one process (the torch "
                             "optimizer); with several CUDA processes the dense part uses Megatron's optimizer, "
                             "which this loss scaler does not drive: use bf16 (the default)")
        if parallel.sparse.updates_in_backward:
            raise ValueError("TrainerArgs.fp16=True (NetworkArgs.dtype_str='float16') with sharded embedding tables "
                             "(ParallelismArgs.shard_single_process or several processes): their optimizer updates "
                             "inside backward, before the loss scaler can skip a step with inf/nan gradients; keep "
                             "the tables unsharded on one process, or use bf16 (the default)")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss that backward starts from: multiplied by the loss scale in fp16, else ``loss`` itself."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaled(loss).backward()

    def step(self, parallel) -> Any:
        """The optimizer steps of ``parallel`` (a ParallelModel) after backward and the gradient reduction; returns
        the gradient norm that clipping computed (of the unscaled gradients), else None."""
        if self.scaler is None:
            return parallel.step()
        for optimizer in parallel.torch_optimizers():
            self.scaler.unscale_(optimizer)  # before clipping, which must see the true gradients
        grad_norm = parallel.step(self.scaler.step)
        self.scaler.update()
        return grad_norm

    def loss_scale(self) -> Optional[torch.Tensor]:
        """The current scale as a device tensor (no sync), or None without loss scaling."""
        return None if self.scaler is None else self.scaler._get_scale_async()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"loss_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "loss_scaler" in state:
            self.scaler.load_state_dict(state["loss_scaler"])


__all__ = ["FP16_DEVICE_TYPES", "Precision"]
