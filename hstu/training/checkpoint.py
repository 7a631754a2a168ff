"""Run checkpoints: ``hstu.distributed`` checkpoints (sharded tables, dense part, optimizers) + the trainer's state.

Layout: ``<run_dir>/checkpoints/step_00000100/`` (``sparse/``, ``dense_tp<t>.pt``, ``meta.pt`` from
``hstu.distributed.save_checkpoint``; ``rank<r>.pt`` = the trainer's per-rank extra state: train state, data position,
RNG states) and ``<run_dir>/checkpoints/latest`` (the directory name of the newest complete checkpoint, written last
and atomically). The LR schedule is a function of the step, so it needs no state.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"


def capture_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        tracker = _megatron_rng_tracker()
        if tracker is not None:
            state["megatron_cuda"] = tracker.get_states()
    return state


def _megatron_rng_tracker():
    """Megatron's tensor-parallel CUDA RNG tracker when seeded (TP dropout), else None."""
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if getattr(tracker, "states_", None) else None


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        tracker = _megatron_rng_tracker()
        if "megatron_cuda" in state and tracker is not None:
            tracker.set_states(state["megatron_cuda"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    pointer = os.path.join(run_dir, CHECKPOINT_DIR, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, CHECKPOINT_DIR, name)
    return path if os.path.isdir(path) else None


def save_checkpoint(run_dir: str, step: int, parallel, extra_state: dict, keep_last: int = 2) -> str:
    """Collective: write ``step_<step>/`` through :func:`hstu.distributed.save_checkpoint`, then point ``latest`` at it.

    ``extra_state`` is this rank's own state (data position, RNG states, step counters).
    """
    from hstu.distributed import save_checkpoint as save_parallel

    ctx = parallel.ctx
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    path = os.path.join(root, f"step_{step:08d}")
    save_parallel(path, parallel, extra_state=extra_state)  # ends with a barrier: every rank has written
    if ctx.is_main:
        tmp = os.path.join(root, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path))
        os.replace(tmp, os.path.join(root, "latest"))
        steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in steps[: max(0, len(steps) - keep_last)]:
            if os.path.join(root, old) != path:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    ctx.barrier()
    return path


def load_checkpoint(path: str, parallel) -> dict:
    """Collective: restore tables, optimizers and the dense part; returns this rank's extra state."""
    from hstu.distributed import load_checkpoint as load_parallel

    if not os.path.isfile(os.path.join(path, "meta.pt")):
        raise FileNotFoundError(f"{path} is not a checkpoint of hstu.distributed (meta.pt missing)")
    extra = load_parallel(path, parallel)
    if not extra:
        raise FileNotFoundError(f"{path}: no state for rank {parallel.ctx.rank}: was the checkpoint written with "
                                "another world size? (tables and dense weights reshard, the data position does not)")
    return extra
