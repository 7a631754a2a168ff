"""Data side of hstu: raw datasets → processed per-user sequences → jagged training batches.

Command line: ``python -m hstu.data prepare <dataset> --out-dir OUT`` and ``python -m hstu.data stats OUT``.
The batch-related names (which need torch) are imported on first use, so that preparing data stays light.
"""

import importlib

from hstu.data.errors import DataFormatError, DownloadError
from hstu.data.prepare import DATASETS, PrepareOptions, prepare
from hstu.data.processed import KUAIRAND_ACTION_TASKS, ProcessedData, compute_stats
from hstu.data.synthetic import SyntheticConfig, generate, write_synthetic

_LAZY = {
    "JaggedBatch": "hstu.data.batch",
    "SEQUENCE_KEYS": "hstu.data.batch",
    "JaggedDataLoader": "hstu.data.loader",
    "SequenceDataset": "hstu.data.loader",
    "balance_global_batch": "hstu.data.loader",
    "make_dataloader": "hstu.data.loader",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hstu.data' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "KUAIRAND_ACTION_TASKS",
    "SEQUENCE_KEYS",
    "DataFormatError",
    "DownloadError",
    "JaggedBatch",
    "JaggedDataLoader",
    "PrepareOptions",
    "ProcessedData",
    "SequenceDataset",
    "SyntheticConfig",
    "balance_global_batch",
    "compute_stats",
    "generate",
    "make_dataloader",
    "prepare",
    "write_synthetic",
]
