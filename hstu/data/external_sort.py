"""Out-of-core grouping of an interaction log by user, time ordered.

Raw logs arrive in file order (KuaiRand: by date, users interleaved). Holding a 300M-row log in memory is not an
option, so rows are processed in three streaming passes with memory bounded by ``sort_buffer_rows``:

1. ``add``: parsed blocks are appended as fixed-size binary records to a spill file; per-user counts and the set of
   items are accumulated on the side (arrays indexed by id below ``ID_LIMIT``; item ids above it, allowed when
   remapping, are kept as a sorted set).
2. Users are cut into contiguous id ranges ("buckets") of about ``sort_buffer_rows`` rows; the spill is read once
   more in chunks and each record is appended to its bucket's file (skipped when one bucket suffices).
3. Each bucket is loaded alone, stably sorted by (user, time, arrival order) and appended to the output columns.

``finish(keep_users=...)`` drops every other user's rows on the way (their items then count as unseen).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from hstu.data.processed import ID_LIMIT, NpyAppender

RECORD = np.dtype([("user", "<i8"), ("item", "<i8"), ("time", "<i8"), ("action", "<i8")])
DEFAULT_SORT_BUFFER_ROWS = 4_000_000


def _grow(array: np.ndarray, size: int) -> np.ndarray:
    if size <= len(array):
        return array
    grown = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class InteractionSorter:
    def __init__(self, work_dir: str, sort_buffer_rows: int = DEFAULT_SORT_BUFFER_ROWS, show_progress: bool = True):
        self.work_dir = work_dir
        self.sort_buffer_rows = max(1, int(sort_buffer_rows))
        self.show_progress = show_progress
        self.spill_path = os.path.join(work_dir, "spill.bin")
        self._spill = open(self.spill_path, "wb")
        self.num_rows = 0
        self.user_counts = np.zeros(1024, dtype=np.int64)  # indexed by raw user id (< ID_LIMIT)
        self.item_seen = np.zeros(1024, dtype=bool)  # indexed by raw item id below ID_LIMIT
        # Item ids >= ID_LIMIT (allowed with remapping): sorted distinct ids, plus per-block ones not merged yet.
        self._large_items = np.zeros(0, dtype=np.int64)
        self._large_pending: list[np.ndarray] = []

    def add(self, user: np.ndarray, item: np.ndarray, time: np.ndarray, action: np.ndarray) -> None:
        n = len(user)
        if n == 0:
            return
        if int(user.min()) < 0 or int(user.max()) >= ID_LIMIT or int(item.min()) < 0:
            raise ValueError(f"user ids must lie in [0, {ID_LIMIT}) and item ids must be >= 0")
        records = np.empty(n, dtype=RECORD)
        records["user"], records["item"], records["time"], records["action"] = user, item, time, action
        self._spill.write(records.tobytes())
        self.num_rows += n
        self.user_counts = _grow(self.user_counts, int(user.max()) + 1)
        self.user_counts += np.bincount(user, minlength=len(self.user_counts))
        large = item >= ID_LIMIT
        if large.any():
            self._large_pending.append(np.unique(item[large]))
            if sum(len(p) for p in self._large_pending) > max(len(self._large_items), 1 << 20):
                self._merge_large_items()
            item = item[~large]
        if len(item):
            self.item_seen = _grow(self.item_seen, int(item.max()) + 1)
            self.item_seen[item] = True

    def _merge_large_items(self) -> np.ndarray:
        if self._large_pending:
            self._large_items = np.unique(np.concatenate([self._large_items, *self._large_pending]))
            self._large_pending = []
        return self._large_items

    def _iter_spill(self, path: str, desc: str):
        chunk = self.sort_buffer_rows
        total = os.path.getsize(path) // RECORD.itemsize
        with open(path, "rb") as f, tqdm(total=total, desc=desc, unit="row", disable=not self.show_progress) as bar:
            while True:
                records = np.fromfile(f, dtype=RECORD, count=chunk)
                if len(records) == 0:
                    return
                bar.update(len(records))
                yield records

    def _keep_only(self, keep_users: np.ndarray, remap_items: bool) -> np.ndarray:
        """Restrict the counts to ``keep_users`` (raw ids); with ``remap_items`` recount the items those users have.
        Returns the per-raw-id keep mask."""
        keep_users = np.asarray(keep_users, dtype=np.int64)
        keep = np.zeros(len(self.user_counts), dtype=bool)
        keep[keep_users[(keep_users >= 0) & (keep_users < len(keep))]] = True
        self.user_counts = np.where(keep, self.user_counts, 0)
        self.num_rows = int(self.user_counts.sum())
        if remap_items:
            self.item_seen = np.zeros(len(self.item_seen), dtype=bool)
            self._large_items, self._large_pending = np.zeros(0, dtype=np.int64), []
            for records in self._iter_spill(self.spill_path, "count kept items"):
                item = records["item"][keep[records["user"]]]
                large = item >= ID_LIMIT
                if large.any():
                    self._large_pending.append(np.unique(item[large]))
                self.item_seen[item[~large]] = True
        return keep

    def finish(
        self, out_dir: str, *, time_divisor: int = 1, remap_items: bool = False, keep_users: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """Write ``item.npy``, ``timestamp.npy``, ``action.npy`` into ``out_dir``.

        ``keep_users``: raw user ids whose rows are kept (``None``: all). Returns ``(offsets, user_ids,
        item_raw_ids)``; ``item_raw_ids[new_id]`` is the raw id when remapping (new ids are 1..K in raw-id order of
        the items that occur, 0 stays unused), else ``None``.
        """
        self._spill.close()
        spilled_rows = self.num_rows
        keep = None if keep_users is None else self._keep_only(keep_users, remap_items)
        user_ids = np.flatnonzero(self.user_counts)
        lengths = self.user_counts[user_ids]
        offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])

        item_raw_ids = None
        remap = None
        large_items = self._merge_large_items()
        if remap_items:
            small_items = np.flatnonzero(self.item_seen)
            item_raw_ids = np.concatenate([[-1], small_items, large_items]).astype(np.int64)
            small_lookup = np.cumsum(self.item_seen).astype(np.int64)

            def remap(raw: np.ndarray) -> np.ndarray:
                if not len(large_items):
                    return small_lookup[raw]
                large = raw >= ID_LIMIT
                new = np.where(large, len(small_items) + 1 + np.searchsorted(large_items, raw), 0)
                new[~large] = small_lookup[raw[~large]]
                return new
        elif len(large_items):
            raise ValueError(f"item ids >= {ID_LIMIT} need remap_items=True")

        # A user never straddles two buckets, so a bucket may exceed the buffer by one user's length.
        bucket_of_user_rank = offsets[:-1] // self.sort_buffer_rows
        _, bucket_of_user_rank = np.unique(bucket_of_user_rank, return_inverse=True)
        num_buckets = int(bucket_of_user_rank.max()) + 1 if len(user_ids) else 0
        bucket_paths = [self.spill_path]
        # Dropped rows are filtered out while partitioning, so that no bucket holds more than it keeps.
        if num_buckets > 1 or (num_buckets == 1 and self.num_rows < spilled_rows):
            bucket_of_uid = np.zeros(len(self.user_counts), dtype=np.int64)
            bucket_of_uid[user_ids] = bucket_of_user_rank
            bucket_paths = [os.path.join(self.work_dir, f"bucket-{b:05d}.bin") for b in range(num_buckets)]
            files = [open(p, "wb") for p in bucket_paths]
            try:
                for records in self._iter_spill(self.spill_path, "partition by user"):
                    if keep is not None:
                        records = records[keep[records["user"]]]
                    bucket = bucket_of_uid[records["user"]]
                    order = np.argsort(bucket, kind="stable")
                    bounds = np.searchsorted(bucket[order], np.arange(num_buckets + 1))
                    for b in np.flatnonzero(np.diff(bounds)):
                        files[b].write(records[order[bounds[b] : bounds[b + 1]]].tobytes())
            finally:
                for f in files:
                    f.close()
            os.remove(self.spill_path)

        columns = {
            name: NpyAppender(os.path.join(out_dir, f"{name}.npy"), self.num_rows) for name in ("item", "timestamp", "action")
        }
        with tqdm(total=self.num_rows, desc="sort by user and time", unit="row", disable=not self.show_progress) as bar:
            for path in bucket_paths if num_buckets else []:
                records = np.fromfile(path, dtype=RECORD)
                # Two stable passes = sort by (user, time) keeping file order among equal timestamps.
                order = np.argsort(records["time"], kind="stable")
                order = order[np.argsort(records["user"][order], kind="stable")]
                records = records[order]
                del order
                item = records["item"] if remap is None else remap(records["item"])
                columns["item"].append(item)
                columns["timestamp"].append(records["time"] // time_divisor)
                columns["action"].append(records["action"])
                bar.update(len(records))
                del records, item
                os.remove(path)
        for appender in columns.values():
            appender.close()
        return offsets, user_ids, item_raw_ids
