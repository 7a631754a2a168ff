"""Raw dataset → processed directory: the shared pipeline behind ``python -m hstu.data prepare``."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from hstu.data.errors import DataFormatError
from hstu.data.external_sort import DEFAULT_SORT_BUFFER_ROWS, InteractionSorter
from hstu.data.processed import (
    ID_LIMIT, TIMESTAMP_UNITS, ContextualFeature, atomic_output_dir, write_metadata, write_user_columns,
)
from hstu.data.textio import DEFAULT_BLOCK_BYTES, EXACT_INT_LIMIT, as_int_ids

RAW_DATASETS = ("ml-1m", "ml-20m", "kuairand-pure", "kuairand-1k", "kuairand-27k")
DATASETS = RAW_DATASETS + ("synthetic",)
KUAIRAND_DATASETS = ("kuairand-pure", "kuairand-1k", "kuairand-27k")
# "all": every user of the standard logs; "every-log": only users with interactions in each standard log file.
KUAIRAND_USER_SETS = ("all", "every-log")
# The prepare flags that reproduce the user set and timestamps of NVIDIA's example preprocessing (its configs read a
# KuaiRand dataset built from the users found in every standard log file, with millisecond timestamps).
EXAMPLE_PREPARE_FLAGS = {
    **{name: ("--kuairand-users", "every-log", "--timestamp-unit", "milliseconds") for name in KUAIRAND_DATASETS},
    "ml-1m": (),
    "ml-20m": (),
}


@dataclass
class PrepareOptions:
    remap_items: bool = False
    sort_buffer_rows: int = DEFAULT_SORT_BUFFER_ROWS
    block_bytes: int = DEFAULT_BLOCK_BYTES
    show_progress: bool = True
    kuairand_users: str = "all"  # one of KUAIRAND_USER_SETS
    timestamp_unit: str = "seconds"  # "milliseconds" keeps KuaiRand's time_ms as it is

    def validate(self, dataset: Optional[str] = None) -> None:
        """Raise ``ValueError``/``TypeError`` naming the option; with ``dataset``, also refuse the KuaiRand-only
        options (non-default) for another dataset."""
        for name, option, value in (("sort_buffer_rows", "--sort-buffer-rows", self.sort_buffer_rows),
                                    ("block_bytes", "--block-mb", self.block_bytes)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({option}) must be a positive integer, got {value!r}")
        for name, option, value, choices in (
            ("kuairand_users", "--kuairand-users", self.kuairand_users, KUAIRAND_USER_SETS),
            ("timestamp_unit", "--timestamp-unit", self.timestamp_unit, tuple(TIMESTAMP_UNITS)),
        ):
            if not isinstance(value, str):
                raise TypeError(f"{name} ({option}) must be a string, one of {', '.join(choices)}; got {value!r}")
            if value not in choices:
                raise ValueError(f"{name} ({option}) must be one of {', '.join(choices)}, got {value!r}")
            if dataset is not None and dataset not in KUAIRAND_DATASETS and value != choices[0]:
                raise ValueError(
                    f"{name} ({option}) = {value!r} applies to the KuaiRand datasets only, not to {dataset!r}"
                    + (" (its raw timestamps are whole seconds)" if name == "timestamp_unit" else "")
                )


@dataclass
class InteractionBlock:
    user: np.ndarray
    item: np.ndarray
    time: np.ndarray  # sort key, in the source's finest unit
    action: np.ndarray


@dataclass
class RawSource:
    """What a raw-format reader provides to :func:`build_processed`."""

    dataset: str
    blocks: Callable[[PrepareOptions], Iterable[InteractionBlock]]
    time_divisor: int  # time key // divisor = the stored timestamp, in ``timestamp_unit``
    action_spec: dict
    # Given the sorted raw user ids, the per-user contextual features (user_id first).
    contextual: Callable[[np.ndarray], list[ContextualFeature]]
    extra_metadata: dict = field(default_factory=dict)
    # Input files, validated (headers, presence) before any output is written.
    check: Optional[Callable[[], None]] = None
    timestamp_unit: str = "seconds"
    # Called once every block has been read: the sorted raw ids of the users to keep (None: all users).
    keep_users: Optional[Callable[[], np.ndarray]] = None


def file_progress(paths: list[str], desc: str, enabled: bool):
    total = sum(os.path.getsize(p) for p in paths)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def build_processed(
    source: RawSource, out_dir: str, options: PrepareOptions, overwrite: bool = False, protected: Sequence[str] = ()
) -> dict:
    """Read ``source`` into the processed format at ``out_dir``; ``protected``: raw paths ``out_dir`` must not hold."""
    options.validate(source.dataset)
    if source.check is not None:
        source.check()
    with atomic_output_dir(out_dir, overwrite=overwrite, protected=protected) as tmp:
        work = os.path.join(tmp, "_work")
        os.makedirs(work)
        sorter = InteractionSorter(work, options.sort_buffer_rows, options.show_progress)
        for block in source.blocks(options):
            sorter.add(block.user, block.item, block.time, block.action)
        if sorter.num_rows == 0:
            raise DataFormatError(out_dir, f"{source.dataset}: the raw files contain no interactions")
        keep = source.keep_users() if source.keep_users is not None else None
        offsets, user_ids, item_raw_ids = sorter.finish(
            tmp, time_divisor=source.time_divisor, remap_items=options.remap_items, keep_users=keep
        )
        shutil.rmtree(work)
        contextual = source.contextual(user_ids)
        write_user_columns(tmp, offsets, user_ids, contextual)
        extra = dict(source.extra_metadata)
        extra["item_ids"] = "remapped to 1..K in raw-id order (0 unused); item_raw_id.npy maps back" if options.remap_items else "raw"
        if item_raw_ids is not None:
            np.save(os.path.join(tmp, "item_raw_id.npy"), item_raw_ids)
        return write_metadata(tmp, dataset=source.dataset, action=source.action_spec, contextual=contextual, extra=extra,
                              timestamp_unit=source.timestamp_unit)


def id_columns(path: str, block, options: PrepareOptions, user: str, item: str, time: str):
    """The (user, item, time) columns of a parsed block as int64, with the id bounds of the pipeline.

    User ids and raw item ids must be below ``ID_LIMIT`` (dense per-id tables and vocabularies); with
    ``--remap-items`` item ids may go up to 2**53 (the largest integer the text parser reads exactly).
    """
    item_limit = EXACT_INT_LIMIT if options.remap_items else ID_LIMIT
    return (
        as_int_ids(path, block, user, limit=ID_LIMIT, hint="; renumber the users below that bound"),
        as_int_ids(path, block, item, limit=item_limit, hint="" if options.remap_items else "; pass --remap-items"),
        as_int_ids(path, block, time),
    )


def user_id_feature(user_ids: np.ndarray) -> ContextualFeature:
    return ContextualFeature("user_id", np.asarray(user_ids, dtype=np.int64), int(user_ids.max()) + 1 if len(user_ids) else 1)


def prepare(dataset: str, raw_dir: str, out_dir: str, options: Optional[PrepareOptions] = None, overwrite: bool = False) -> dict:
    """Convert the raw files of ``dataset`` in ``raw_dir`` into the processed format at ``out_dir``."""
    options = options or PrepareOptions()
    if dataset in RAW_DATASETS:
        options.validate(dataset)
    if dataset in RAW_DATASETS and not os.path.isdir(raw_dir):
        raise DataFormatError(raw_dir, "--raw-dir is not a directory")
    if dataset in ("ml-1m", "ml-20m"):
        from hstu.data import movielens

        source = movielens.source(dataset, raw_dir)
    elif dataset.startswith("kuairand-"):
        from hstu.data import kuairand

        source = kuairand.source(dataset, raw_dir, options)
    else:
        raise ValueError(f"unknown raw dataset {dataset!r}; choose one of {', '.join(RAW_DATASETS)}")
    return build_processed(source, out_dir, options, overwrite=overwrite, protected=(raw_dir,))
