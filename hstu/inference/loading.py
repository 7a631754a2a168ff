"""A trained model from a training run directory, in one process, whatever world size / table sharding it was
trained with.

* ``<run_dir>/config.json`` (the trainer writes it) gives the task and every argument group; the model is built by
  the task exactly as the trainer builds it (the dataset's metadata supplies the vocabulary sizes).
* The checkpoint (the newest under ``<run_dir>/checkpoints`` that verifies against its manifest, or a given
  ``step_N`` directory) supplies the weights: the tables from the DCP directory ``sparse/`` (DCP keeps every shard
  with its global offsets, so the full tables load into plain tensors without a process group) and the dense part
  from ``dense_tp0.pt``. A tensor-parallel checkpoint (TP > 1: the dense weights split over files) is refused.
* :func:`resolve_device` / :func:`training_dtype`: the device the model serves on and its default compute dtype.

Only reads the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
import warnings
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from hstu.distributed.checkpoint import read_file
from hstu.distributed.context import ParallelContext
from hstu.distributed.dense import dense_modules
from hstu.inference.errors import UnsupportedModelError
from hstu.training import checkpoint as ckpt
from hstu.training.config import AllArgs

# config.json holds one dict per AllArgs field: the field's argument class rebuilds it.
_GROUPS = typing.get_type_hints(AllArgs)


@dataclasses.dataclass
class LoadedRun:
    task: str  # "retrieval" or "ranking"
    model: nn.Module  # RetrievalModel / RankingModel in eval mode, on the CPU, gradients off
    args: AllArgs
    checkpoint: str  # the step directory the weights come from
    step: int


def read_run_config(run_dir: str) -> tuple[str, AllArgs]:
    """(task, arguments) of the training run in ``run_dir`` from its ``config.json``."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ckpt.CheckpointError(f"{path} missing: {run_dir} is not a training run directory (the trainer writes "
                                   "config.json into it)")
    try:
        with open(path) as f:
            config = json.load(f)
        task = config["task"]
        groups = {name: cls(**config[name]) for name, cls in _GROUPS.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ckpt.CheckpointError(f"{path}: unreadable run configuration ({type(err).__name__}: {err})") from None
    if task not in ("retrieval", "ranking"):
        raise ckpt.CheckpointError(f"{path}: unknown task {task!r} (retrieval or ranking expected)")
    return task, AllArgs(**groups)


def find_checkpoint(run_dir: str, checkpoint: Optional[str] = None) -> tuple[str, dict]:
    """(path, verified manifest): ``checkpoint`` when given (a step directory), else the newest checkpoint of
    ``run_dir`` that verifies."""
    if checkpoint is not None:
        return checkpoint, ckpt.verify_checkpoint(checkpoint)
    path, manifest, _ = ckpt.choose_checkpoint(run_dir, purpose=f"loading {run_dir} for inference")
    if path is None:
        raise ckpt.CheckpointError(f"no checkpoint in {os.path.join(run_dir, ckpt.CHECKPOINT_DIR)}: train with "
                                   "TrainerArgs.save_final_checkpoint=True (or a checkpoint interval) first")
    return path, manifest


def _single_process_context() -> ParallelContext:
    """What building a task's model needs of a parallel context, for one CPU process without process groups."""
    return ParallelContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="none", tp_size=1,
                           tp_rank=0, dp_size=1, dp_rank=0, tp_group=None, dp_group=None, sequence_parallel=False)


def _load_tables(model: nn.Module, path: str) -> None:
    sparse = os.path.join(path, "sparse")
    tables = dict(model.embeddings.state_dict())
    try:
        saved = dcp.FileSystemReader(sparse).read_metadata().state_dict_metadata
    except Exception as err:  # a damaged or missing .metadata in any form
        raise ckpt.CheckpointError(f"{sparse}: unreadable table checkpoint ({type(err).__name__}: {err})") from None
    for key, value in tables.items():
        entry = saved.get(f"tables.{key}")
        if entry is None or tuple(getattr(entry, "size", ())) != tuple(value.shape):
            found = tuple(entry.size) if entry is not None and hasattr(entry, "size") else "absent"
            raise ckpt.CheckpointError(f"{sparse}: table {key} is {found} in the checkpoint, the model built from "
                                       f"config.json needs {tuple(value.shape)}")
    try:
        with warnings.catch_warnings():  # DCP warns that it loads without a process group: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"tables": tables}, checkpoint_id=sparse, no_dist=True)
    except Exception as err:  # DCP wraps reader errors in its own exception types
        raise ckpt.CheckpointError(f"{sparse}: cannot load the tables ({type(err).__name__}: {err})") from None


def _load_dense(model: nn.Module, path: str, manifest: dict) -> None:
    if manifest.get("tp_size", 1) != 1:
        raise UnsupportedModelError(f"{path}: written with tensor_model_parallel_size={manifest.get('tp_size')}; "
                                    "inference loads tp 1 checkpoints only (the dense weights are split over files)")
    dense_path = os.path.join(path, "dense_tp0.pt")
    state = read_file(dense_path)
    try:
        dense_modules(model, exclude=[model.embeddings]).load_state_dict(state["dense"])
    except (KeyError, RuntimeError) as err:
        raise ckpt.CheckpointError(f"{dense_path}: does not fit the model built from config.json: {err}") from None


def resolve_device(device) -> torch.device:
    """The torch.device of ``device``: None or "cpu" the CPU, "cuda" / "cuda:N" / a torch.device, "auto" CUDA when
    available. ValueError naming ``device`` for anything else, or CUDA on a machine without it."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be None, 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device, got "
                         f"{type(device).__name__} {device!r}")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a device name ('cpu', 'cuda', 'cuda:N' or 'auto'): {err}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: inference runs on 'cpu' or 'cuda', not {resolved.type!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def training_dtype(args: AllArgs, device: torch.device) -> torch.dtype:
    """The compute dtype a run trained in, on ``device``: the trainer autocasts on CUDA only (TrainerArgs.bf16 /
    fp16), so a run whose TrainerArgs.device is 'cpu', and any serving on the CPU, is float32; on CUDA float16 for
    an fp16 run, bfloat16 for a bf16 run, float32 otherwise."""
    t = args.trainer
    if device.type != "cuda" or t.device == "cpu":
        return torch.float32
    if t.fp16:
        return torch.float16
    return torch.bfloat16 if t.bf16 else torch.float32


def load_run(run_dir: str, checkpoint: Optional[str] = None) -> LoadedRun:
    """The model of training run ``run_dir`` with the weights of its newest verified checkpoint (or of
    ``checkpoint``), in eval mode with gradients off."""
    from hstu.training.tasks import TASKS

    if not os.path.isdir(run_dir):
        raise ckpt.CheckpointError(f"{run_dir}: no such run directory")
    task, args = read_run_config(run_dir)
    path, manifest = find_checkpoint(run_dir, checkpoint)
    torch.manual_seed(args.trainer.seed)  # the initial values are overwritten; the seed only makes builds repeatable
    model = TASKS[task](args, _single_process_context()).build_model()
    _load_tables(model, path)
    _load_dense(model, path, manifest)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return LoadedRun(task, model, args, path, int(manifest["step"]))
