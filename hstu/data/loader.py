"""From processed sequences to :class:`~hstu.data.batch.JaggedBatch` es.

``SequenceDataset`` turns a processed directory plus a split into samples (one per user and split) and assembles a
whole batch at once with vectorised numpy gathers from the memory-mapped columns. ``make_dataloader`` adds the
distributed plan: a per-epoch permutation shared by all ranks (seeded by ``(seed, epoch)``), cut into global batches
of ``batch_size * world_size`` samples; each global batch is dealt to the ranks (round robin, or by greedy
longest-processing-time on Σ L² with ``balance_workload``), so every rank sees a disjoint shard and the same number
of batches. The loader is a cursor: ``state_dict()`` records (epoch, batches consumed), and iterating again after a
``load_state_dict`` continues exactly after the last batch handed out.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.data.batch import SEQUENCE_KEYS, JaggedBatch
from hstu.data.processed import ProcessedData
from hstu.data.splits import SPLITS, STRATEGIES, TASKS, split_windows

TRUNCATIONS = ("recent", "oldest")


def ranges_to_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l), without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nonzero = lengths > 0
    starts, lengths = np.asarray(starts, dtype=np.int64)[nonzero], lengths[nonzero]
    step = np.ones(total, dtype=np.int64)
    boundaries = np.cumsum(lengths)[:-1]
    step[0] = starts[0]
    step[boundaries] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(step)


class SequenceDataset(torch.utils.data.Dataset):
    """Samples of one split of a processed dataset.

    Sample layout (see docs/data.md): retrieval train = the train window (truncated to ``max_seqlen``);
    retrieval valid/test = the history before the held-out item (truncated) with ``target_item`` = that item;
    ranking = history (truncated to ``max_seqlen``) followed by up to ``num_candidates`` candidates whose actions
    are the labels. ``truncate="recent"`` keeps the latest history, ``"oldest"`` the earliest (the seed's choice).
    """

    def __init__(
        self,
        data_dir: os.PathLike | str,
        split: str = "train",
        task: str = "retrieval",
        max_seqlen: int = 200,
        num_candidates: int = 0,
        split_strategy: str = "leave_one_out",
        truncate: str = "recent",
        *,
        train_ratio: float = 0.7,
        time_quantiles: tuple[float, float] = (0.8, 0.9),
    ):
        if split not in SPLITS or task not in TASKS or split_strategy not in STRATEGIES or truncate not in TRUNCATIONS:
            raise ValueError(
                f"split in {SPLITS}, task in {TASKS}, split_strategy in {STRATEGIES}, truncate in {TRUNCATIONS}"
            )
        if max_seqlen < 1:
            raise ValueError("max_seqlen must be >= 1")
        if task == "ranking" and num_candidates < 1:
            raise ValueError("ranking needs num_candidates >= 1")
        if task == "retrieval" and num_candidates:
            raise ValueError("retrieval samples have no candidates; leave num_candidates=0")
        self.data_dir = os.fspath(data_dir)
        self.split, self.task, self.max_seqlen = split, task, int(max_seqlen)
        self.num_candidates, self.split_strategy, self.truncate = int(num_candidates), split_strategy, truncate
        self._data: Optional[ProcessedData] = None
        data = self.data
        self.metadata = data.metadata
        windows = split_windows(
            data.offsets, data.timestamp, split, task=task, strategy=split_strategy, num_candidates=num_candidates,
            train_ratio=train_ratio, time_quantiles=time_quantiles,
        )
        self.user = windows.user
        is_eval_retrieval = task == "retrieval" and split != "train"
        if task == "ranking":
            cand = np.minimum(windows.held_out, num_candidates)
        else:
            cand = np.zeros(len(windows.user), dtype=np.int64)
        history_end = windows.hi - cand - (1 if is_eval_retrieval else 0)
        self.target_pos = windows.hi - 1 if is_eval_retrieval else None
        self.candidate_start, self.candidate_end = history_end, history_end + cand
        history_start = windows.lo
        if truncate == "recent":
            history_start = np.maximum(history_start, history_end - self.max_seqlen)
        else:
            history_end = np.minimum(history_end, history_start + self.max_seqlen)
        self.history_start, self.history_end = history_start, history_end

    # Memory maps are reopened lazily in each worker process instead of being pickled (which would copy them).
    @property
    def data(self) -> ProcessedData:
        if self._data is None:
            self._data = ProcessedData.open(self.data_dir)
        return self._data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    # ---- what the model code needs to size itself --------------------------------------------------------------
    @property
    def num_items(self) -> int:
        """Item vocabulary size (max item id + 1)."""
        return int(self.metadata["num_items"])

    @property
    def action_spec(self) -> dict:
        return self.metadata["action"]

    @property
    def action_vocab_size(self) -> int:
        return int(self.metadata["action"]["vocab_size"])

    @property
    def contextual_feature_names(self) -> list[str]:
        return [f["name"] for f in self.metadata["contextual_features"]]

    @property
    def contextual_vocab_sizes(self) -> dict[str, int]:
        return {f["name"]: int(f["vocab_size"]) for f in self.metadata["contextual_features"]}

    @property
    def max_sequence_length(self) -> int:
        """Upper bound on a sample's sequence length (history + candidates)."""
        return self.max_seqlen + (self.num_candidates if self.task == "ranking" else 0)

    # ---- samples ------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.user)

    def sample_lengths(self) -> np.ndarray:
        return (self.history_end - self.history_start) + (self.candidate_end - self.candidate_start)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        raw = self.collate([index % len(self)])
        n = int(raw["lengths"][0])
        values = raw["values"].numpy()
        sample = {key: values[i * n : (i + 1) * n] for i, key in enumerate(SEQUENCE_KEYS)}
        sample["num_candidates"] = int(raw["num_candidates"][0])
        sample["user_row"] = int(self.user[index])
        sample["contextual"] = {name: int(v) for name, v in zip(self.contextual_feature_names, raw["contextual_values"])}
        if raw["target_item"] is not None:
            sample["target_item"] = int(raw["target_item"][0])
        return sample

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        """Assemble samples ``indices`` (-1 = padding) into plain tensors; see :func:`to_jagged_batch`."""
        idx = np.asarray(indices, dtype=np.int64)
        padding = idx < 0
        if len(self) == 0 and not padding.all():
            raise IndexError("this split has no samples")

        def per_sample(values: np.ndarray, fill: int = 0) -> np.ndarray:
            if len(values) == 0:
                return np.full(len(idx), fill, dtype=np.int64)
            return np.where(padding, fill, values[np.where(padding, 0, idx)])

        data = self.data
        hist_start, cand_start = per_sample(self.history_start), per_sample(self.candidate_start)
        hist_len = per_sample(self.history_end) - hist_start
        cand_len = per_sample(self.candidate_end) - cand_start
        positions = ranges_to_positions(
            np.stack([hist_start, cand_start], axis=1).ravel(), np.stack([hist_len, cand_len], axis=1).ravel()
        )
        columns = [np.asarray(getattr(data, key)[positions], dtype=np.int64) for key in SEQUENCE_KEYS]
        ticks = data.timestamp_ticks_per_second
        if ticks != 1:  # batches carry unix seconds whatever unit the dataset stores
            timestamp = SEQUENCE_KEYS.index("timestamp")
            columns[timestamp] = columns[timestamp] // ticks
        users = per_sample(self.user)
        contextual = [np.where(padding, 0, data.contextual[name][users]) for name in self.contextual_feature_names]
        target = None
        if self.target_pos is not None:
            rows = per_sample(self.target_pos)
            target = torch.from_numpy(np.where(padding, -1, np.asarray(data.item[rows], dtype=np.int64)))
        return {
            "values": torch.from_numpy(np.concatenate(columns)),
            "lengths": torch.from_numpy(hist_len + cand_len),
            "num_candidates": torch.from_numpy(cand_len),
            "is_padding": torch.from_numpy(padding),
            "contextual_values": torch.from_numpy(np.concatenate(contextual).astype(np.int64)) if contextual else None,
            "contextual_keys": self.contextual_feature_names,
            "target_item": target,
            "max_seqlen": self.max_sequence_length,
        }

    def batch(self, indices: Sequence[int]) -> JaggedBatch:
        return to_jagged_batch(self.collate(indices))


def to_jagged_batch(raw: dict[str, Any]) -> JaggedBatch:
    lengths = raw["lengths"]
    batch_size = len(lengths)
    sequence = KeyedJaggedTensor(
        keys=list(SEQUENCE_KEYS), values=raw["values"], lengths=lengths.repeat(len(SEQUENCE_KEYS))
    )
    contextual = None
    if raw["contextual_values"] is not None:
        keys = raw["contextual_keys"]
        contextual = KeyedJaggedTensor(
            keys=list(keys), values=raw["contextual_values"], lengths=torch.ones(len(keys) * batch_size, dtype=torch.int64)
        )
    return JaggedBatch(
        sequence=sequence,
        num_candidates=raw["num_candidates"],
        is_padding=raw["is_padding"],
        max_seqlen=int(raw["max_seqlen"]),
        contextual=contextual,
        target_item=raw["target_item"],
    )


def balance_global_batch(sample_ids: np.ndarray, costs: np.ndarray, world_size: int, batch_size: int) -> np.ndarray:
    """Deal ``world_size * batch_size`` samples to ranks minimising the largest Σ cost (greedy LPT).

    Samples go in decreasing cost (ties: earlier position first) to the least-loaded rank that still has room
    (ties: lowest rank), so every rank gets exactly ``batch_size`` samples and the result is deterministic.
    """
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable")
    loads = [0.0] * world_size
    counts = [0] * world_size
    assigned = np.full((world_size, batch_size), -1, dtype=np.int64)
    for j in order.tolist():
        rank = min((r for r in range(world_size) if counts[r] < batch_size), key=lambda r: (loads[r], r))
        assigned[rank, counts[rank]] = sample_ids[j]
        counts[rank] += 1
        loads[rank] += float(costs[j])
    return assigned


class _BatchAssembler(torch.utils.data.Dataset):
    """Runs in the worker processes: one "index" = the sample ids of one whole batch."""

    def __init__(self, dataset: SequenceDataset):
        self.dataset = dataset

    def __getitem__(self, sample_ids):
        return self.dataset.collate(sample_ids)

    def __len__(self):
        return len(self.dataset)


def _keep_as_is(raw):
    return raw


class _CurrentPlan(torch.utils.data.Sampler):
    """The batches of the pass about to start; read by the persistent worker loader each time it is iterated."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class JaggedDataLoader:
    """Iterable of :class:`JaggedBatch` for one data-parallel rank (built by :func:`make_dataloader`)."""

    def __init__(
        self,
        dataset: SequenceDataset,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = False,
        balance_workload: bool = False,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.drop_last, self.balance_workload, self.pin_memory = bool(drop_last), bool(balance_workload), bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self._plan = _CurrentPlan()
        self._workers: Optional[torch.utils.data.DataLoader] = None  # created on first use, kept for every pass
        self.epoch = 0
        self.batches_consumed = 0
        self._costs = dataset.sample_lengths().astype(np.float64) ** 2 if balance_workload else None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        n = len(self.dataset)
        return n // self.global_batch_size if self.drop_last else math.ceil(n / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle; moving to another epoch restarts it from its first batch."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch, "batches_consumed": self.batches_consumed, "seed": self.seed,
            "batch_size": self.batch_size, "world_size": self.world_size, "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "batch_size", "world_size", "num_samples"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: checkpoint has {key}={state[key]}, this loader {mine}")
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(n).astype(np.int64)

    def global_batch(self, order: np.ndarray, index: int) -> np.ndarray:
        """(world_size, batch_size) sample ids of global batch ``index`` (-1 = padding)."""
        gbs = self.global_batch_size
        ids = np.full(gbs, -1, dtype=np.int64)
        chunk = order[index * gbs : (index + 1) * gbs]
        ids[: len(chunk)] = chunk
        if self.balance_workload:
            costs = np.where(ids >= 0, self._costs[np.maximum(ids, 0)], 0.0)
            return balance_global_batch(ids, costs, self.world_size, self.batch_size)
        # Round robin spreads the padding of the last global batch over all ranks.
        return ids.reshape(self.batch_size, self.world_size).T

    def rank_batches(self, epoch: Optional[int] = None, rank: Optional[int] = None, start: int = 0) -> Iterator[list[int]]:
        """Sample ids of each batch this rank (or ``rank``) gets in ``epoch``, from batch ``start`` on."""
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        order = self.epoch_order(epoch)
        for index in range(start, len(self)):
            yield self.global_batch(order, index)[rank].tolist()

    def __iter__(self) -> Iterator[JaggedBatch]:
        start = self.batches_consumed
        plan = self.rank_batches(self.epoch, self.rank, start)
        if self.num_workers > 0:
            # Persistent workers: starting worker processes at every epoch costs more than a short epoch's
            # batches (ML-1M: 48 steps per epoch).
            if self._workers is None:
                kwargs = {} if self.prefetch_factor is None else {"prefetch_factor": self.prefetch_factor}
                self._workers = torch.utils.data.DataLoader(
                    _BatchAssembler(self.dataset), sampler=self._plan, batch_size=None, collate_fn=_keep_as_is,
                    num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=True, **kwargs,
                )
            self._plan.batches = list(plan)
            raws = self._workers
        else:
            raws = (self.dataset.collate(ids) for ids in plan)
        for raw in raws:
            batch = to_jagged_batch(raw)
            if self.pin_memory and self.num_workers == 0:
                batch = batch.pin_memory()
            self.batches_consumed += 1
            yield batch
        # A completed pass moves the cursor to the next epoch (set_epoch with that number is then a no-op).
        self.epoch, self.batches_consumed = self.epoch + 1, 0


def make_dataloader(
    dataset: SequenceDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last: bool = False,
    balance_workload: bool = False,
    pin_memory: bool = False,
    prefetch_factor: Optional[int] = None,
) -> JaggedDataLoader:
    """A rank's loader of :class:`JaggedBatch` es; see :class:`JaggedDataLoader` and docs/data.md."""
    return JaggedDataLoader(
        dataset, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
        drop_last=drop_last, balance_workload=balance_workload, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
    )
