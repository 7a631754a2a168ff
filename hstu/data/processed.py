"""The processed dataset format: a directory of memory-mappable numpy columns plus ``metadata.json``.

Layout (N interactions, U users, documented in docs/data.md)::

    offsets.npy     int64 (U+1)  user u owns rows offsets[u]:offsets[u+1], time ordered
    item.npy        int64 (N)
    timestamp.npy   int64 (N)    unix time in metadata's timestamp_unit (seconds, or milliseconds for KuaiRand on request)
    action.npy      int64 (N)    rating class or KuaiRand 8-bit action mask
    user_id.npy     int64 (U)    raw user id
    <feature>.npy   int64 (U)    one per contextual feature listed in metadata (ids in 0..vocab_size-1)
    metadata.json

``ProcessedData.open`` validates all of this once (see :func:`validate`); ``atomic_output_dir`` is the only way the
writers touch an output directory, and it replaces an existing one only when it holds a processed dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from hstu.data.errors import DataFormatError, OutputExistsError

FORMAT_VERSION = 1
SEQUENCE_COLUMNS = ("item", "timestamp", "action")
# Raw user ids, raw item ids (without --remap-items) and every vocabulary size are bounded by ID_LIMIT: the pipeline
# keeps tables indexed by id (per-user counts, an item bitmap) and the models size embedding tables by them.
ID_LIMIT = 1 << 27
FEATURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch
RESERVED_NAMES = SEQUENCE_COLUMNS + ("offsets", "item_raw_id", "metadata")
TIMESTAMP_UNITS = {"seconds": 1, "milliseconds": 1000}  # unit -> ticks per second
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


def is_within(path: str, ancestor: str) -> bool:
    """``path`` is ``ancestor`` or lies below it (both real, absolute paths)."""
    return path == ancestor or path.startswith(ancestor.rstrip(os.sep) + os.sep)


def _refuse(out_dir: str, why: str) -> DataFormatError:
    return DataFormatError(out_dir, f"refusing to replace --out-dir: {why}")


def looks_processed(directory: str) -> Optional[str]:
    """``None`` when ``directory`` holds exactly what a writer of this module leaves there, else the reason why not.

    That is a ``metadata.json`` object with an integer ``format_version`` and a string ``dataset``, and otherwise
    only regular ``.npy`` files of the columns prepare writes (the sequence and user columns, ``item_raw_id`` and
    the contextual features the metadata lists): a user's own arrays beside them make the directory foreign.
    """
    meta_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(meta_path) or os.path.islink(meta_path):
        return "it is not empty and holds no processed dataset (no metadata.json)"
    try:
        with open(meta_path, "rb") as f:
            metadata = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return "its metadata.json is not valid JSON"
    if not (isinstance(metadata, dict) and _is_int(metadata.get("format_version"))
            and isinstance(metadata.get("dataset"), str)):
        return "its metadata.json lacks the format_version and dataset fields that prepare writes"
    features = metadata.get("contextual_features")
    columns = {"offsets", "user_id", "item_raw_id", *SEQUENCE_COLUMNS}
    if isinstance(features, list):
        columns.update(f["name"] for f in features if isinstance(f, dict) and isinstance(f.get("name"), str))
    foreign = sorted(
        name for name in os.listdir(directory)
        if name != "metadata.json" and not (
            name.endswith(".npy") and name[: -len(".npy")] in columns
            and os.path.isfile(os.path.join(directory, name)) and not os.path.islink(os.path.join(directory, name))
        )
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return f"it holds {shown}, which prepare does not write; move them away or choose another --out-dir"
    return None


def check_output_dir(out_dir: os.PathLike | str, *, overwrite: bool, protected: Sequence[str] = ()) -> None:
    """Raise unless ``out_dir`` may be created, or (with ``overwrite``) replaced.

    An existing ``out_dir`` is replaced only when it is an empty directory or holds a processed dataset (see
    :func:`looks_processed`), and never when it is a symbolic link, the working directory or one of its parents, or
    one of the ``protected`` paths (the raw inputs) or one of their parents. Refusals are :class:`DataFormatError`
    naming ``--out-dir``; an existing ``out_dir`` without ``overwrite`` is an :class:`OutputExistsError`.
    """
    out_dir = os.fspath(out_dir)
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise OutputExistsError(out_dir, "--out-dir already exists (pass --overwrite to replace it)")
    if os.path.islink(out_dir):
        raise _refuse(out_dir, "it is a symbolic link; pass the directory it points to")
    if not os.path.isdir(out_dir):
        raise _refuse(out_dir, "it is not a directory")
    real = os.path.realpath(out_dir)
    if is_within(os.path.realpath(os.getcwd()), real):
        raise _refuse(out_dir, "it is the current working directory or one of its parents")
    for path in protected:
        if is_within(os.path.realpath(path), real):
            raise _refuse(out_dir, f"it is the raw input {path} or one of its parents")
    if os.listdir(out_dir):
        why = looks_processed(out_dir)
        if why is not None:
            raise _refuse(out_dir, why)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: str, out_dir: str) -> None:
    """Put directory ``tmp`` at ``out_dir``; a previous ``out_dir`` is moved aside first and comes back on failure."""
    parent = os.path.dirname(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
    previous = os.path.join(old, "previous")
    try:
        os.rename(out_dir, previous)
        os.rename(tmp, out_dir)
    except BaseException:
        # Decided by what is on disk, so an interrupt between the two renames is covered as well.
        if os.path.lexists(previous) and not os.path.lexists(out_dir):
            os.rename(previous, out_dir)
        with contextlib.suppress(OSError):
            os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: os.PathLike | str, overwrite: bool = False, protected: Sequence[str] = ()
) -> Iterator[str]:
    """Yield a fresh temp directory next to ``out_dir``; on success it replaces ``out_dir`` in one rename.

    ``out_dir`` is checked by :func:`check_output_dir` (``protected``: the raw input paths) before anything is
    written and again just before the replacement. The new files are fsynced before the rename. On any exception
    (including Ctrl-C) the temp directory is removed, so ``out_dir`` is either the complete previous content, the
    complete new content, or absent: never half written.
    """
    check_output_dir(out_dir, overwrite=overwrite, protected=protected)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the result private
        yield tmp
        _fsync_tree(tmp)
        check_output_dir(out_dir, overwrite=overwrite, protected=protected)
        _replace(tmp, out_dir)
        _fsync_dir(parent)
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


def write_metadata(
    out: str, *, dataset: str, action: dict, contextual: list[ContextualFeature], extra: dict, timestamp_unit: str = "seconds"
) -> dict:
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
        "timestamp_unit": timestamp_unit,
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metadata_int(meta_path: str, mapping: dict, key: str, where: str = "", low: int = 0, high: Optional[int] = None) -> int:
    value = mapping.get(key)
    name = f"{where}{key}"
    if not _is_int(value):
        raise DataFormatError(meta_path, f"field {name!r} must be an integer, found {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise DataFormatError(meta_path, f"field {name!r} = {value} must be >= {low}{upper}")
    return value


def read_metadata(meta_path: str) -> dict:
    """Parse and check ``metadata.json``: every field the readers use is present and typed."""
    try:
        with open(meta_path, "rb") as f:
            metadata = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise DataFormatError(meta_path, f"not valid JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise DataFormatError(meta_path, f"expected a JSON object, found {type(metadata).__name__}")
    if metadata.get("format_version") != FORMAT_VERSION or not _is_int(metadata.get("format_version")):
        raise DataFormatError(meta_path, f"format_version {metadata.get('format_version')!r} != {FORMAT_VERSION}; re-run prepare")
    if not isinstance(metadata.get("dataset"), str):
        raise DataFormatError(meta_path, f"field 'dataset' must be a string, found {metadata.get('dataset')!r}")
    for key in ("num_users", "num_interactions", "num_items", "num_distinct_items"):
        _metadata_int(meta_path, metadata, key)
    unit = metadata.get("timestamp_unit", "seconds")
    if not isinstance(unit, str) or unit not in TIMESTAMP_UNITS:
        raise DataFormatError(meta_path, f"field 'timestamp_unit' must be one of {sorted(TIMESTAMP_UNITS)}, found {unit!r}")
    action = metadata.get("action")
    if not isinstance(action, dict) or action.get("kind") not in ("rating", "bitmask"):
        raise DataFormatError(meta_path, "field 'action' must be an object with kind 'rating' or 'bitmask'")
    _metadata_int(meta_path, action, "vocab_size", "action.", low=1, high=ID_LIMIT)
    if action["kind"] == "rating":
        _metadata_int(meta_path, action, "num_classes", "action.", low=1, high=action["vocab_size"])
    else:
        tasks = action.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise DataFormatError(meta_path, "field 'action.tasks' must be a list of task names")
        _metadata_int(meta_path, action, "num_tasks", "action.", low=len(tasks), high=len(tasks))
        if action["vocab_size"] > 1 << len(tasks):
            raise DataFormatError(meta_path, f"field 'action.vocab_size' = {action['vocab_size']} exceeds 2**num_tasks")
    features = metadata.get("contextual_features")
    if not isinstance(features, list):
        raise DataFormatError(meta_path, "field 'contextual_features' must be a list")
    seen = set()
    for i, feature in enumerate(features):
        where = f"contextual_features[{i}]."
        name = feature.get("name") if isinstance(feature, dict) else None
        if not isinstance(name, str) or not FEATURE_NAME.fullmatch(name) or name in seen or name in RESERVED_NAMES:
            raise DataFormatError(meta_path, f"field '{where}name' must be a unique identifier, found {name!r}")
        seen.add(name)
        size = _metadata_int(meta_path, feature, "vocab_size", where, low=1, high=ID_LIMIT)
        vocabulary = feature.get("vocabulary")
        if vocabulary is not None and (not isinstance(vocabulary, list) or len(vocabulary) != size):
            raise DataFormatError(meta_path, f"field '{where}vocabulary' must be a list of vocab_size = {size} values")
    return metadata


def _load_column(path: str, name: str, mmap: bool) -> np.ndarray:
    """``<name>.npy`` as a 1-D native int64 array (memory-mapped with ``mmap``)."""
    file = os.path.join(path, f"{name}.npy")
    if not os.path.isfile(file):
        raise DataFormatError(file, "column file is missing")
    try:
        column = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(file, f"not a readable .npy file ({e})") from None
    if not isinstance(column, np.ndarray) or column.dtype != np.dtype(np.int64) or column.ndim != 1:
        raise DataFormatError(
            file, f"expected a 1-D int64 column, found {getattr(column, 'dtype', None)} of shape {getattr(column, 'shape', None)}"
        )
    return column


def _check_range(file: str, column: np.ndarray, low: int, high: int, what: str, chunk: int = 1 << 22) -> int:
    """Raise unless ``low <= column < high`` everywhere (the error names the first bad row); return the maximum."""
    top = low - 1
    for start in range(0, len(column), chunk):
        part = np.asarray(column[start : start + chunk])
        part_min, part_max = int(part.min()), int(part.max())
        if part_min < low or part_max >= high:
            row = start + int(np.flatnonzero((part < low) | (part >= high))[0])
            raise DataFormatError(file, f"row {row}: {what} {int(column[row])} outside [{low}, {high})")
        top = max(top, part_max)
    return top


def validate(data: "ProcessedData") -> None:
    """Check the columns of ``data`` against each other and against its metadata; raise :class:`DataFormatError`.

    Offsets start at 0, never decrease and end at the number of interactions; every id lies inside its vocabulary
    (items in [0, num_items), actions in [0, action.vocab_size), contextual features in [0, vocab_size)); the counts
    in metadata.json match the columns. Costs a few sequential passes over the item and action columns.
    """
    meta, path = data.metadata, data.path
    meta_path = os.path.join(path, "metadata.json")
    offsets_file = os.path.join(path, "offsets.npy")
    offsets = data.offsets
    if len(offsets) == 0 or offsets[0] != 0:
        raise DataFormatError(offsets_file, "must start with 0")
    decreasing = offsets[1:] < offsets[:-1]  # compared, not subtracted: a difference could overflow
    if decreasing.any():
        user = int(np.flatnonzero(decreasing)[0])
        raise DataFormatError(offsets_file, f"decreases at user {user}: {offsets[user]} -> {offsets[user + 1]}")
    num_users, total = len(offsets) - 1, int(offsets[-1])
    # A count that disagrees with every other column is blamed on offsets.npy, otherwise on the odd column out.
    lengths = {name: len(getattr(data, name)) for name in SEQUENCE_COLUMNS}
    if len(set(lengths.values())) == 1 and total != lengths["item"]:
        raise DataFormatError(offsets_file, f"ends at {total}, but item/timestamp/action.npy have {lengths['item']} rows")
    for name, length in lengths.items():
        if length != total:
            raise DataFormatError(os.path.join(path, f"{name}.npy"), f"has {length} rows, offsets.npy ends at {total}")
    if len(data.user_id) == meta["num_users"] != num_users:
        raise DataFormatError(offsets_file, f"describes {num_users} users, user_id.npy and metadata.json have {len(data.user_id)}")
    for name, column in [("user_id", data.user_id)] + list(data.contextual.items()):
        if len(column) != num_users:
            raise DataFormatError(os.path.join(path, f"{name}.npy"), f"has {len(column)} rows for {num_users} users")
    if meta["num_users"] != num_users:
        raise DataFormatError(meta_path, f"num_users = {meta['num_users']} but the columns hold {num_users} users")
    if meta["num_interactions"] != total:
        raise DataFormatError(meta_path, f"num_interactions = {meta['num_interactions']} but the columns hold {total}")
    num_items = meta["num_items"]
    if num_items > max(ID_LIMIT, total + 1):
        raise DataFormatError(meta_path, f"num_items = {num_items} is larger than any dataset prepare writes")
    item_file = os.path.join(path, "item.npy")
    top = _check_range(item_file, data.item, 0, num_items, "item id")
    if top + 1 != num_items:
        raise DataFormatError(meta_path, f"num_items = {num_items} but the largest id in item.npy is {top}")
    if meta["num_distinct_items"] != count_distinct(data.item, num_items):
        raise DataFormatError(meta_path, f"num_distinct_items = {meta['num_distinct_items']} does not match item.npy")
    _check_range(os.path.join(path, "action.npy"), data.action, 0, meta["action"]["vocab_size"], "action")
    _check_range(os.path.join(path, "user_id.npy"), data.user_id, 0, np.iinfo(np.int64).max, "user id")
    for feature in meta["contextual_features"]:
        name = feature["name"]
        _check_range(os.path.join(path, f"{name}.npy"), data.contextual[name], 0, feature["vocab_size"], name)


# Directories validated in this process, by real path, with the (name, inode, size, mtime, ctime) of their files:
# a dataset reopened unchanged (every split, every loader worker) is not validated again.
_VALIDATED: dict[str, tuple] = {}


def _signature(path: str) -> tuple:
    entries = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                st = entry.stat()
            except OSError:  # a dangling link: opening the dataset reports it
                entries.append((entry.name,))
                continue
            entries.append((entry.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(entries))


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
        """Open and validate a processed directory (see :func:`validate`); raises :class:`DataFormatError`."""
        path = os.fspath(path)
        meta_path = os.path.join(path, "metadata.json")
        if not os.path.isfile(meta_path):
            raise DataFormatError(meta_path, "not a processed dataset (metadata.json missing); run `python -m hstu.data prepare`")
        signature = _signature(path)
        metadata = read_metadata(meta_path)
        user_id = _load_column(path, "user_id", False)
        contextual = {}
        for feature in metadata["contextual_features"]:
            name = feature["name"]
            contextual[name] = user_id if name == "user_id" else _load_column(path, name, False)
        data = cls(
            path=path,
            metadata=metadata,
            offsets=_load_column(path, "offsets", False),
            item=_load_column(path, "item", mmap),
            timestamp=_load_column(path, "timestamp", mmap),
            action=_load_column(path, "action", mmap),
            user_id=user_id,
            contextual=contextual,
        )
        key = os.path.realpath(path)
        if _VALIDATED.get(key) != signature:
            validate(data)
            _VALIDATED[key] = signature
        return data

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def timestamp_ticks_per_second(self) -> int:
        """1 when ``timestamp.npy`` holds seconds, 1000 when it holds milliseconds (``timestamp_unit``; absent =
        seconds)."""
        return TIMESTAMP_UNITS[self.metadata.get("timestamp_unit", "seconds")]

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
