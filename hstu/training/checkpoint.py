"""Checkpoints: model + optimizer + LR schedule (rank 0), data position + RNG states (every rank).

Layout: ``<run_dir>/checkpoints/step_00000100/{state.pt, rank_<r>.pt}`` and ``<run_dir>/checkpoints/latest``
(the directory name of the newest complete checkpoint, written last and atomically). Sharded embeddings (issue 6)
will need per-rank model state: ``save_checkpoint``/``load_checkpoint`` are the functions to extend.
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
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(run_dir: str) -> Optional[str]:
    pointer = os.path.join(run_dir, CHECKPOINT_DIR, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(run_dir, CHECKPOINT_DIR, name)
    return path if os.path.isdir(path) else None


def save_checkpoint(run_dir: str, step: int, *, rank: int, shared_state: dict, rank_state: dict,
                    barrier=lambda: None, keep_last: int = 2) -> str:
    """Write one checkpoint; ``shared_state`` from rank 0 only, ``rank_state`` from every rank."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    path = os.path.join(root, f"step_{step:08d}")
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    barrier()
    _atomic_save(rank_state, os.path.join(path, f"rank_{rank}.pt"))
    if rank == 0:
        _atomic_save(shared_state, os.path.join(path, "state.pt"))
    barrier()
    if rank == 0:
        tmp = os.path.join(root, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(os.path.basename(path))
        os.replace(tmp, os.path.join(root, "latest"))
        steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
        for old in steps[: max(0, len(steps) - keep_last)]:
            if os.path.join(root, old) != path:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier()
    return path


def load_checkpoint(path: str, rank: int, map_location="cpu") -> tuple[dict, dict]:
    rank_file = os.path.join(path, f"rank_{rank}.pt")
    if not os.path.isfile(rank_file):
        raise FileNotFoundError(f"{rank_file} is missing: was the checkpoint written with another world size?")
    shared = torch.load(os.path.join(path, "state.pt"), map_location=map_location, weights_only=False)
    mine = torch.load(rank_file, map_location="cpu", weights_only=False)
    return shared, mine


def _atomic_save(obj: Any, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
