"""Run checkpoints: ``hstu.distributed`` checkpoints (sharded tables, dense part, optimizers) + the trainer's state,
written atomically and verified before use.

Layout of ``<run_dir>/checkpoints/``:

* ``step_00000100/``: ``sparse/``, ``dense_tp<t>.pt``, ``meta.pt`` from ``hstu.distributed.save_checkpoint``;
  ``rank<r>.pt`` = the trainer's per-rank extra state (train state, data position, RNG states); ``manifest.json``
  (written last): step, world / TP / DP sizes, the table sharding plan, and the size and sha256 of every other file
  of the directory. The LR schedule is a function of the step, so it needs no state.
* ``latest``: the directory name of the newest complete checkpoint (informational: resume picks the newest
  checkpoint that verifies, whatever ``latest`` says).
* ``.step_00000100.partial/``: a checkpoint being written. Every rank writes its files there (fsynced); after a
  barrier rank 0 hashes them into the manifest and renames the directory to ``step_00000100``, so a ``step_*``
  directory is complete by construction and a crash leaves at most a ``.partial`` one, which is never resumed from
  (and replaced by the next save of that step).

Verification = the manifest is present and readable, names this step, and every file it lists has its recorded
size and sha256 (read in 1 MiB chunks). Rotation (``keep_last``) deletes, after the new checkpoint is complete, only
older ``step_*`` directories whose manifest is ours, and only the files that manifest lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch

from hstu.distributed.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    raise_if_any_rank_failed,
    write_error,
)
from hstu.training.run_logging import free_sibling_name, fsync_directory, utc_stamp, write_text_atomic

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_FORMAT = "hstu-checkpoint"
MANIFEST_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# A verified checkpoint moved aside while the same step is written again (see _commit). A crash between the two
# renames leaves it as the only complete copy of that step, so it counts as that step while step_N is absent.
_REPLACED_DIR = re.compile(r"^\.step_(\d{8,})\.replaced$")
_CHUNK = 1 << 20

__all__ = ["CHECKPOINT_DIR", "CheckpointError", "CheckpointWriteError", "MANIFEST", "capture_rng_state",
           "check_compatible", "choose_checkpoint", "choose_init_checkpoint", "load_checkpoint", "restore_rng_state",
           "save_checkpoint",
           "sharding_plan", "step_directories", "verify_checkpoint"]


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


# ---- files ----------------------------------------------------------------------------------------------------------
def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _files_under(directory: str) -> list[str]:
    """Relative POSIX paths of the regular files under ``directory`` (the manifest excluded), sorted."""
    found = []
    for parent, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(parent, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


# ---- manifest and verification --------------------------------------------------------------------------------------
def sharding_plan(parallel) -> dict[str, dict]:
    """{table: {"sharding": row_wise|table_wise|column_wise|data_parallel|replicated, "ranks": [...] or None}}."""
    plan = parallel.sparse.plan.plan
    described = {}
    for d in parallel.sparse.decisions:
        module_plan = plan.get(d.collection)
        ranks = getattr(module_plan[d.table], "ranks", None) if module_plan and d.table in module_plan else None
        described[d.table] = {"sharding": d.sharding, "ranks": list(ranks) if ranks is not None else None}
    return described


def _build_manifest(directory: str, step: int, ctx, sharding: dict) -> dict:
    files = {}
    for rel in _files_under(directory):
        size, sha = file_digest(os.path.join(directory, rel))
        files[rel] = {"size": size, "sha256": sha}
    return {"format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "step": int(step),
            "world_size": ctx.world_size, "tp_size": ctx.tp_size, "dp_size": ctx.dp_size, "sharding": sharding,
            "written_at": utc_stamp(), "files": files}


def read_manifest(path: str) -> dict:
    """The manifest of checkpoint directory ``path``; :class:`CheckpointError` when it is missing or not ours."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{manifest_path} missing (not a complete checkpoint of this trainer)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{manifest_path}: not a manifest of this trainer (format {MANIFEST_FORMAT!r} expected)")
    for rel, entry in manifest["files"].items():
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts or rel == MANIFEST or not isinstance(entry, dict) or \
                not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{manifest_path}: bad entry for {rel!r} (a relative path inside the checkpoint "
                                  "with an integer size and a sha256 expected)")
    return manifest


def verify_checkpoint(path: str) -> dict:
    """Check ``path`` against its manifest (sizes and sha256 of every file); returns the manifest.

    Raises :class:`CheckpointError` naming the first file that is missing or differs.
    """
    manifest = read_manifest(path)
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(f"{os.path.join(path, MANIFEST)}: describes step {manifest['step']}, not the directory's")
    for rel, entry in sorted(manifest["files"].items()):
        file_path = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{file_path}: missing (listed in the manifest)")
        size = os.path.getsize(file_path)
        if size != entry["size"]:
            raise CheckpointError(f"{file_path}: {size} bytes, the manifest says {entry['size']} (truncated?)")
        if file_digest(file_path)[1] != entry["sha256"]:
            raise CheckpointError(f"{file_path}: sha256 differs from the manifest (corrupt)")
    return manifest


def check_compatible(manifest: dict, path: str, ctx, sharding: Optional[dict] = None) -> None:
    """ValueError naming what differs when checkpoint ``path`` was written by another world size / TP / DP split
    or (when ``sharding`` is given) another table sharding plan."""
    mine = (ctx.world_size, ctx.tp_size, ctx.dp_size)
    theirs = (manifest.get("world_size"), manifest.get("tp_size"), manifest.get("dp_size"))
    if mine != theirs:
        raise CheckpointError(
            f"checkpoint {path} was written with world size {theirs[0]} (tp {theirs[1]}, dp {theirs[2]}), this run has "
            f"world size {mine[0]} (tp {mine[1]}, dp {mine[2]}): resuming on another world size is not supported (the "
            "data-loader position, random streams and sharded-table optimizer state are per rank); relaunch with "
            f"{theirs[0]} processes, or pass --fresh to start a new run")
    if sharding is None:
        return
    saved = manifest.get("sharding") or {}
    differences = []
    for table in sorted(set(saved) | set(sharding)):
        old = (saved.get(table) or {}).get("sharding", "absent")
        new = (sharding.get(table) or {}).get("sharding", "absent")
        if old != new:
            differences.append(f"table {table!r}: {old} in the checkpoint, {new} in this run")
    if differences:
        raise CheckpointError(
            f"checkpoint {path} was written with another table sharding plan ({'; '.join(differences)}): resuming "
            "with another sharding is not supported; use the checkpoint's ParallelismArgs sharding settings")


# ---- choosing a checkpoint to resume from ----------------------------------------------------------------------------
def step_directories(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every ``step_*`` directory under ``<run_dir>/checkpoints``, newest first, plus each
    ``.step_*.replaced`` directory whose ``step_*`` is absent (a re-save of that step interrupted between its
    renames)."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = os.listdir(root)
    found = []
    for name in names:
        match = _STEP_DIR.match(name)
        replaced = _REPLACED_DIR.match(name)
        if replaced and f"step_{replaced.group(1)}" in names:
            continue
        match = match or replaced
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def _latest_name(run_dir: str) -> Optional[str]:
    pointer = os.path.join(run_dir, CHECKPOINT_DIR, LATEST)
    try:
        with open(pointer) as f:
            return f.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def choose_checkpoint(run_dir: str, purpose: str = "--resume") -> tuple[Optional[str], dict, list[str]]:
    """The newest checkpoint of ``run_dir`` that verifies: (path or None, its manifest, notes on what was skipped).

    None when there is no ``step_*`` directory at all. When there are some and none verifies, raises
    :class:`CheckpointError` listing each one and why (nothing is changed on disk). ``purpose`` starts the error
    message (what the checkpoint is for).
    """
    notes, skipped = [], []
    latest = _latest_name(run_dir)
    candidates = step_directories(run_dir)
    names = {os.path.basename(p) for _, p in candidates}
    if latest is not None and latest not in names:
        notes.append(f"{os.path.join(run_dir, CHECKPOINT_DIR, LATEST)} names {latest}, which does not exist")
    for _, path in candidates:
        try:
            manifest = verify_checkpoint(path)
        except CheckpointError as err:
            skipped.append(f"{os.path.basename(path)}: {err}")
            notes.append(f"skipped {path}: {err}")
            continue
        if latest is not None and latest != os.path.basename(path) and latest in names:
            notes.append(f"{os.path.join(run_dir, CHECKPOINT_DIR, LATEST)} names {latest}; resuming from the newest "
                         f"checkpoint that verifies, {os.path.basename(path)}")
        return path, manifest, notes
    if candidates:
        advice = " Pass --fresh to move this run aside and start anew." if purpose == "--resume" else ""
        raise CheckpointError(
            f"{purpose}: no checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)} verifies (nothing was changed): "
            + "; ".join(skipped) + "." + advice)
    return None, {}, notes


def choose_init_checkpoint(directory: str) -> tuple[str, dict, list[str]]:
    """The checkpoint that starts a run from another run's state (``TrainerArgs.init_from``): ``directory`` itself
    when it is a checkpoint (it holds a manifest), else the newest checkpoint of run directory ``directory`` that
    verifies. Returns (path, manifest, notes); only reads. A :class:`CheckpointError` naming the directory when
    there is no such checkpoint."""
    what = f"TrainerArgs.init_from={directory!r}"
    if not os.path.isdir(directory):
        raise CheckpointError(f"{what}: no such directory (a run directory or one of its {CHECKPOINT_DIR}/step_N "
                              "directories expected)")
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        try:
            return directory, verify_checkpoint(directory), []
        except CheckpointError as err:
            raise CheckpointError(f"{what}: {err}") from None
    path, manifest, notes = choose_checkpoint(directory, purpose=what)
    if path is None:
        raise CheckpointError(f"{what}: no checkpoint in {os.path.join(directory, CHECKPOINT_DIR)} (a run directory "
                              f"or one of its {CHECKPOINT_DIR}/step_N directories expected)")
    return path, manifest, notes


# ---- saving ---------------------------------------------------------------------------------------------------------
def _remove_described(path: str, manifest: dict) -> list[str]:
    """Delete the files ``manifest`` lists (and the manifest), then the directories left empty; returns what was
    left in place because no manifest of ours describes it."""
    for rel in manifest["files"]:
        file_path = os.path.join(path, *rel.split("/"))
        if os.path.isfile(file_path):
            os.remove(file_path)
    os.remove(os.path.join(path, MANIFEST))
    for parent, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count(os.sep)):
        try:
            os.rmdir(parent)
        except OSError:
            pass  # holds files the manifest does not list: left as they are
    return [os.path.join(parent, name) for parent, _, files in os.walk(path) for name in files]


def _rotate(root: str, step: int, keep_last: int) -> None:
    """Keep the ``keep_last`` newest checkpoints up to ``step`` (the new one included) among those described by a
    manifest of ours; later steps (skipped by a resume) are left alone."""
    described = []
    for older, path in step_directories(os.path.dirname(root)):
        if older >= step:
            continue
        try:
            described.append((path, read_manifest(path)))
        except CheckpointError:
            continue  # not ours (or not complete): never deleted
    for path, manifest in described[max(0, keep_last - 1):]:
        try:
            left = _remove_described(path, manifest)
        except OSError as err:
            print(f"[hstu] could not remove the old checkpoint {path}: {err}", flush=True)
            continue
        if left:
            print(f"[hstu] old checkpoint {path}: kept {len(left)} file(s) its manifest does not list", flush=True)


def _commit(tmp: str, final: str, step: int, ctx, sharding: dict) -> Optional[tuple[str, dict]]:
    """Rank 0: manifest, rename ``tmp`` -> ``final``, then ``latest``. A checkpoint already at ``final`` (the same
    step written again, e.g. after a resume from an older one) is moved aside first: to ``.step_N.replaced`` when it
    verifies (returned with its manifest, for deletion once the new one is in place), else to
    ``step_N.invalid-<UTC time>``, kept."""
    root = os.path.dirname(final)
    manifest = _build_manifest(tmp, step, ctx, sharding)
    write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
    for parent, _, _ in os.walk(tmp):
        fsync_directory(parent)
    replaced, aside = None, None
    interrupted = os.path.join(root, f".{os.path.basename(final)}.replaced")
    if not os.path.lexists(final) and os.path.isdir(interrupted):
        # An earlier re-save of this step stopped between its renames: that copy is replaced by this one (deleted
        # once this one is in place when it verifies; else left as it is).
        try:
            replaced, aside = verify_checkpoint(interrupted), interrupted
        except CheckpointError:
            pass
    elif os.path.lexists(final):
        try:
            replaced = verify_checkpoint(final)
            aside = os.path.join(root, f".{os.path.basename(final)}.replaced")
            if os.path.lexists(aside):
                shutil.rmtree(aside)  # a replaced checkpoint of ours that a crash left behind
        except CheckpointError as err:
            aside = free_sibling_name(f"{final}.invalid-{utc_stamp()}")
            print(f"[hstu] {final} does not verify ({err}): kept as {aside}", flush=True)
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except OSError:
        if aside is not None:
            os.rename(aside, final)
        raise
    fsync_directory(root)
    write_text_atomic(os.path.join(root, LATEST), os.path.basename(final))
    return (aside, replaced) if replaced is not None else None


def save_checkpoint(run_dir: str, step: int, parallel, extra_state: dict, keep_last: int = 2) -> str:
    """Collective: write ``step_<step>/`` atomically with its manifest, point ``latest`` at it, rotate.

    ``extra_state`` is this rank's own state (data position, RNG states, step counters). A failed write raises
    :class:`CheckpointWriteError` on every rank; the checkpoints already there are untouched.
    """
    from hstu.distributed import save_checkpoint as save_parallel

    ctx = parallel.ctx
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".step_{step:08d}.partial")
    sharding = sharding_plan(parallel)
    intact = f"the checkpoints already in {root} are untouched; continue with --resume once the cause is fixed"
    error = None
    if ctx.is_main:
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)  # a save of this step that never completed (same name: ours)
            os.makedirs(tmp)
        except OSError as err:
            error = err
    try:
        raise_if_any_rank_failed(ctx, error, tmp)
        save_parallel(tmp, parallel, extra_state=extra_state)  # every rank's files, fsynced; agreed on every rank
        error, aside = None, None
        if ctx.is_main:
            try:
                aside = _commit(tmp, final, step, ctx, sharding)
            except Exception as err:  # any failure must reach the other ranks, which wait for the outcome
                error = write_error(final, err)
        raise_if_any_rank_failed(ctx, error, final)
    except CheckpointWriteError as err:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # this save's own partial files
        raise CheckpointWriteError(err.errno, f"{err.strerror}; {intact}") from err
    if ctx.is_main:
        if aside is not None:
            try:
                _remove_described(*aside)
            except OSError as err:
                print(f"[hstu] could not remove the replaced checkpoint {aside[0]}: {err}", flush=True)
        _rotate(root, step, keep_last)
    ctx.barrier()
    return final


def load_checkpoint(path: str, parallel, manifest: Optional[dict] = None) -> dict:
    """Collective: restore tables, optimizers and the dense part; returns this rank's extra state.

    Verifies ``path`` first unless its ``manifest`` (already verified) is given; refuses another world size or
    sharding plan with a :class:`CheckpointError` (a ValueError) naming what differs.
    """
    from hstu.distributed import load_checkpoint as load_parallel

    if manifest is None:
        manifest = verify_checkpoint(path)
    check_compatible(manifest, path, parallel.ctx, sharding_plan(parallel))
    extra = load_parallel(path, parallel)
    if not extra:
        raise CheckpointError(f"{path}: no state for rank {parallel.ctx.rank} (rank{parallel.ctx.rank}.pt)")
    return extra
