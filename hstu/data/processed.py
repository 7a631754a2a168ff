"""The processed dataset format: a directory of memory-mappable numpy columns plus ``metadata.json``.

Layout (N interactions, U users, documented in docs/data.md)::

    offsets.npy     int64 (U+1)  user u owns rows offsets[u]:offsets[u+1], time ordered
    item.npy        int64 (N)
    timestamp.npy   int64 (N)    unix seconds
    action.npy      int64 (N)    rating class or KuaiRand 8-bit action mask
    user_id.npy     int64 (U)    raw user id
    <feature>.npy   int64 (U)    one per contextual feature listed in metadata (ids in 0..vocab_size-1)
    metadata.json
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from hstu.data.errors import DataFormatError

FORMAT_VERSION = 1
SEQUENCE_COLUMNS = ("item", "timestamp", "action")
KUAIRAND_ACTION_TASKS = ("click", "like", "follow", "comment", "forward", "hate", "long_view", "profile_enter")


def rating_action_spec(num_classes: int, description: str) -> dict[str, Any]:
    return {"kind": "rating", "num_classes": num_classes, "vocab_size": num_classes, "description": description}


def bitmask_action_spec() -> dict[str, Any]:
    return {
        "kind": "bitmask",
        "num_tasks": len(KUAIRAND_ACTION_TASKS),
        "tasks": list(KUAIRAND_ACTION_TASKS),
        "bits": {name: 1 << i for i, name in enumerate(KUAIRAND_ACTION_TASKS)},
        "vocab_size": 1 << len(KUAIRAND_ACTION_TASKS),
    }


@dataclass
class ContextualFeature:
    name: str
    values: np.ndarray  # (U,) int64 ids
    vocab_size: int
    vocabulary: Optional[list[str]] = None  # id -> original value, when the raw value was a string or a code

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "vocab_size": int(self.vocab_size)}
        if self.vocabulary is not None:
            out["vocabulary"] = list(self.vocabulary)
        return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: os.PathLike | str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temp directory next to ``out_dir``; on success it replaces ``out_dir`` in one rename.

    On any exception (including Ctrl-C) the temp directory is removed, so ``out_dir`` is either the complete
    previous content, the complete new content, or absent: never half written.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
        yield tmp
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "previous"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class NpyAppender:
    """Writes a 1-D ``.npy`` file of known length piece by piece without holding it in memory."""

    def __init__(self, path: str, length: int, dtype=np.int64):
        self.path, self.length, self.dtype = path, int(length), np.dtype(dtype)
        self.written = 0
        self._file = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.length,)}
        np.lib.format.write_array_header_1_0(self._file, header)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self.written += len(values)

    def close(self) -> None:
        self._file.close()
        if self.written != self.length:
            raise RuntimeError(f"{self.path}: wrote {self.written} values, declared {self.length}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def write_user_columns(
    out: str, offsets: np.ndarray, user_id: np.ndarray, contextual: list[ContextualFeature]
) -> None:
    np.save(os.path.join(out, "offsets.npy"), np.asarray(offsets, dtype=np.int64))
    np.save(os.path.join(out, "user_id.npy"), np.asarray(user_id, dtype=np.int64))
    for feature in contextual:
        if feature.name == "user_id":
            continue
        if len(feature.values) != len(user_id):
            raise ValueError(f"contextual feature {feature.name} has {len(feature.values)} values for {len(user_id)} users")
        np.save(os.path.join(out, f"{feature.name}.npy"), np.asarray(feature.values, dtype=np.int64))


def write_metadata(out: str, *, dataset: str, action: dict, contextual: list[ContextualFeature], extra: dict) -> dict:
    """Write ``metadata.json`` with counts computed from the columns already in ``out``."""
    offsets = np.load(os.path.join(out, "offsets.npy"))
    item = np.load(os.path.join(out, "item.npy"), mmap_mode="r")
    num_items = int(_chunked_max(item)) + 1 if len(item) else 0
    metadata = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "num_users": int(len(offsets) - 1),
        "num_interactions": int(offsets[-1]),
        "num_items": num_items,
        "num_distinct_items": int(count_distinct(item, num_items)),
        "timestamp_unit": "seconds",
        "action": action,
        "contextual_features": [f.describe() for f in contextual],
        **extra,
    }
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    return metadata


def _chunked_max(values: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(values[i : i + chunk].max()) for i in range(0, len(values), chunk))


def count_distinct(values: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> int:
    seen = np.zeros(vocab_size, dtype=bool)
    for i in range(0, len(values), chunk):
        seen[values[i : i + chunk]] = True
    return int(seen.sum())


def write_in_memory(
    out: str,
    *,
    dataset: str,
    offsets: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    action: np.ndarray,
    user_id: np.ndarray,
    contextual: list[ContextualFeature],
    action_spec: dict,
    extra: dict,
) -> dict:
    """Write a dataset already held in memory (synthetic data, small MovieLens inputs) into directory ``out``."""
    for name, column in (("item", item), ("timestamp", timestamp), ("action", action)):
        if len(column) != offsets[-1]:
            raise ValueError(f"{name} has {len(column)} rows, offsets say {offsets[-1]}")
        np.save(os.path.join(out, f"{name}.npy"), np.asarray(column, dtype=np.int64))
    write_user_columns(out, offsets, user_id, contextual)
    return write_metadata(out, dataset=dataset, action=action_spec, contextual=contextual, extra=extra)


@dataclass
class ProcessedData:
    """Read access to a processed directory; sequence columns are memory-mapped, user columns loaded."""

    path: str
    metadata: dict
    offsets: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    action: np.ndarray
    user_id: np.ndarray
    contextual: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def open(cls, path: os.PathLike | str, mmap: bool = True) -> "ProcessedData":
        path = os.fspath(path)
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.isfile(meta_path):
            raise DataFormatError(meta_path, "not a processed dataset (metadata.json missing); run `python -m hstu.data prepare`")
        with open(meta_path) as f:
            metadata = json.load(f)
        if metadata.get("format_version") != FORMAT_VERSION:
            raise DataFormatError(meta_path, f"format_version {metadata.get('format_version')} != {FORMAT_VERSION}; re-run prepare")
        mode = "r" if mmap else None

        def load(name: str, mode=mode) -> np.ndarray:
            file = os.path.join(path, f"{name}.npy")
            if not os.path.isfile(file):
                raise DataFormatError(file, "column file is missing")
            return np.load(file, mmap_mode=mode)

        user_id = load("user_id", None)
        contextual = {}
        for feature in metadata["contextual_features"]:
            name = feature["name"]
            contextual[name] = user_id if name == "user_id" else load(name, None)
        return cls(
            path=path,
            metadata=metadata,
            offsets=load("offsets", None),
            item=load("item"),
            timestamp=load("timestamp"),
            action=load("action"),
            user_id=user_id,
            contextual=contextual,
        )

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def seq_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def user_sequence(self, user: int) -> dict[str, np.ndarray]:
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return {name: np.asarray(getattr(self, name)[lo:hi]) for name in SEQUENCE_COLUMNS}


def compute_stats(path: os.PathLike | str) -> dict[str, Any]:
    """The ``stats`` command's numbers, counted on the processed columns."""
    data = ProcessedData.open(path)
    lengths = data.seq_lengths
    num_items = int(data.metadata["num_items"])
    return {
        "users": int(data.num_users),
        "items": count_distinct(data.item, num_items) if len(data.item) else 0,
        "interactions": int(data.offsets[-1]),
        "seqlen": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "median": float(np.median(lengths)) if len(lengths) else 0.0,
        },
    }
