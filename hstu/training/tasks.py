"""What differs between retrieval and ranking: datasets, model, evaluation and the popularity baseline."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hstu.data.loader import SequenceDataset, make_dataloader, ranges_to_positions
from hstu.distributed.agreement import run_agreed
from hstu.metrics import RankingMetrics, RetrievalMetrics, seen_item_mask, target_ranks
from hstu.models import MultiTaskLoss, RankingModel, RetrievalModel, SampledSoftmaxLoss, bitmask_to_labels
from hstu.modules.encoder import EncoderConfig
from hstu.modules.token_layout import sequence_tokens
from hstu.training.config import KUAIRAND_TASKS, AllArgs, RankingArgs
from hstu.training.distributed import ParallelContext

PREPARE_HINTS = {
    "synthetic": "python -m hstu.data prepare synthetic --out-dir {dir}",
    "ml-1m": "python -m hstu.data prepare ml-1m --raw-dir <folder with ratings.dat, users.dat, movies.dat> --out-dir {dir}"
    "   (or add --download)",
    "ml-20m": "python -m hstu.data prepare ml-20m --raw-dir <folder with ratings.csv> --out-dir {dir}   (or add --download)",
    **{name: f"python -m hstu.data prepare {name} --raw-dir <{folder} folder> --out-dir {{dir}}   (add "
           "--kuairand-users every-log --timestamp-unit milliseconds for the data NVIDIA's example trains on)"
       for name, folder in (("kuairand-pure", "KuaiRand-Pure"), ("kuairand-1k", "KuaiRand-1K"),
                            ("kuairand-27k", "KuaiRand-27K"))},
}


class DatasetMissingError(SystemExit):
    pass


def ensure_dataset(args: AllArgs, ctx: ParallelContext) -> None:
    """Generate the synthetic data when allowed, else stop with the command that prepares the data.

    Collective when it generates: rank 0 writes, and every rank agrees on the outcome, so a failed write stops
    every rank (rank 0 with its error, the others with an ``OtherRankFailedError`` naming it)."""
    d = args.dataset
    present = os.path.isfile(os.path.join(d.dataset_dir, "metadata.json"))
    if not present and d.prepare_if_missing and d.dataset_name == "synthetic":

        def generate() -> None:
            if ctx.is_main:
                from hstu.data.synthetic import write_synthetic

                print(f"[hstu] generating the synthetic dataset into {d.dataset_dir}", flush=True)
                write_synthetic(d.dataset_dir, overwrite=False, show_progress=False, **dict(d.synthetic_options))

        run_agreed(ctx, f"generating the synthetic dataset in {d.dataset_dir}", generate)
        present = True
    if not present:
        hint = PREPARE_HINTS.get(d.dataset_name, "python -m hstu.data prepare <dataset> --out-dir {dir}")
        raise DatasetMissingError(
            f"error: no processed dataset at {os.path.abspath(d.dataset_dir)} (metadata.json missing).\n"
            f"Prepare it first:\n    {hint.format(dir=d.dataset_dir)}\n"
            f"or point DatasetArgs.dataset_dir at a prepared directory (--gin-param DatasetArgs.dataset_dir='\"...\"')."
        )


# ---- configuration against the task and the dataset ---------------------------------------------------------------
FP32_BYTES = 4


@dataclass
class RankingSetup:
    """What the ranking head predicts, resolved from RankingArgs and the dataset's action kind."""

    task_type: str  # bitmask | rating
    task_names: list[str]  # the binary tasks AUC is reported for
    num_outputs: int  # head outputs: one logit per bitmask task, or one per rating class
    threshold: Optional[int] = None  # rating: class >= threshold counts as positive


def check_task_config(task_name: str, args: AllArgs) -> Optional[RankingSetup]:
    """Check the configuration against the task and, when it is prepared, the dataset (its metadata.json only).

    Opens no column and starts no process group, so a launcher can call it before any set-up. Raises a
    ValueError naming the field(s) and the dataset's metadata. Returns the ranking set-up (None for retrieval or
    when the dataset is not prepared yet).
    """
    _check_task_args(task_name, args)
    path = _metadata_path(args)
    metadata = read_metadata(path)
    return None if metadata is None else check_against_dataset(task_name, args, metadata, path)


def _metadata_path(args: AllArgs) -> str:
    return os.path.join(args.dataset.dataset_dir, "metadata.json")


def read_metadata(path: str) -> Optional[dict]:
    """A dataset's metadata.json at ``path`` (None when absent); a file that is not a JSON object is a named error."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the dataset's metadata ({e})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: the dataset's metadata is not a JSON object")
    return metadata


def _check_task_args(task_name: str, args: AllArgs) -> None:
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {sorted(TASKS)}")
    d, t = args.dataset, args.trainer
    if task_name == "ranking" and d.num_candidates < 1:
        raise ValueError("DatasetArgs.num_candidates must be >= 1 for ranking (the candidates are what the model "
                         f"scores), got {d.num_candidates}")
    if task_name == "retrieval":
        if d.num_candidates != 0:
            raise ValueError("DatasetArgs.num_candidates must be 0 for retrieval (the whole catalogue is ranked), "
                             f"got {d.num_candidates}")
        widths = [f"NetworkArgs.{name}={getattr(args.network, name)}" for name in
                  ("item_embedding_width", "contextual_embedding_width") if getattr(args.network, name) is not None]
        if widths:
            raise ValueError(f"{' and '.join(widths)} (the example's NetworkArgs.item_embedding_dim / "
                             "contextual_embedding_dim): retrieval scores outputs against the item table itself, so "
                             "its tables are as wide as NetworkArgs.hidden_dim (as in the NVIDIA example); leave them "
                             "unset (the example's -1)")
        if "item" in args.embeddings.dynamic_tables:
            raise ValueError("EmbeddingArgs.dynamic_tables['item'] (the example's DynamicEmbeddingArgs for the item "
                             "table): retrieval scores every row of the item table as an item, so its ids must be the "
                             "rows; leave the item table static")
        if not args.network.causal:
            raise ValueError("NetworkArgs.causal=False (the example's NetworkArgs.is_causal=False) lets every position "
                             "attend to the item it is trained to predict: retrieval needs causal attention")
        if d.train_through_validation and (d.split_strategy != "leave_one_out" or t.eval_split != "test"):
            raise ValueError("DatasetArgs.train_through_validation needs DatasetArgs.split_strategy='leave_one_out' "
                             f"and TrainerArgs.eval_split='test', got {d.split_strategy!r} and {t.eval_split!r}")


def _metadata_int(metadata: dict, source: str, *keys: str) -> int:
    value = metadata
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{source}: field {'.'.join(keys)} must be a non-negative integer, got {value!r}")
    return value


def check_against_dataset(task_name: str, args: AllArgs, metadata: dict, source: str) -> Optional[RankingSetup]:
    """The configuration's item vocabulary, features, tasks and table sizes against ``metadata`` (read from
    ``source``, the dataset's metadata.json)."""
    e = args.embeddings
    num_items = _metadata_int(metadata, source, "num_items")
    if e.item_vocab_size is not None and e.item_vocab_size < num_items:
        raise ValueError(f"EmbeddingArgs.item_vocab_size={e.item_vocab_size} is smaller than the dataset's item "
                         f"vocabulary ({source}: num_items={num_items}): its item ids would fall outside the table")
    item_rows = e.item_vocab_size or num_items
    if e.item_id_low is not None and e.item_id_low >= item_rows:
        raise ValueError(f"EmbeddingArgs.item_id_low={e.item_id_low} leaves no item: the item table has {item_rows} "
                         "rows")
    features = metadata.get("contextual_features") or []
    available = {f.get("name"): f.get("vocab_size") for f in features if isinstance(f, dict)}
    names = contextual_feature_names(args.network.contextual_features, list(available), source)
    origin = "EmbeddingArgs.item_vocab_size" if e.item_vocab_size else f"num_items in {source}"
    tables = {"item": (item_rows, origin)}
    setup = None
    if task_name == "ranking":
        setup = resolve_ranking(args.ranking, metadata.get("action"), source)
        tables["action"] = (_metadata_int(metadata, source, "action", "vocab_size"), f"action.vocab_size in {source}")
    for name in names:
        size = available[name]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{source}: contextual feature {name!r} has vocab_size {size!r}, not a positive integer")
        tables[name] = (size, f"contextual_features[{name!r}].vocab_size in {source}")
    n = args.network
    widths = {name: (n.item_embedding_width if name in ("item", "action") else n.contextual_embedding_width) or
              n.hidden_dim for name in tables}
    check_embedding_memory(tables, n.hidden_dim, e.max_embedding_bytes,
                           widths if set(widths.values()) != {n.hidden_dim} else None)
    return setup


def contextual_feature_names(requested: Sequence[str], available: Sequence[str], source: str) -> list[str]:
    """NetworkArgs.contextual_features resolved against the dataset's features (in its order): ["*"] takes every
    one; a name the dataset lacks is a ValueError naming it and ``source``."""
    requested = list(requested)
    if "*" in requested:
        if requested != ["*"]:
            raise ValueError(f"NetworkArgs.contextual_features {requested}: '*' (every feature of the dataset) "
                             "stands alone")
        return [str(n) for n in available]
    missing = [n for n in requested if n not in available]
    if missing:
        raise ValueError(f"NetworkArgs.contextual_features {missing} not in the dataset ({source} has "
                         f"{sorted(map(str, available))})")
    return requested


def resolve_ranking(r: RankingArgs, action, source: str) -> RankingSetup:
    """Tasks of the ranking head from RankingArgs and the dataset's ``action`` spec; mismatches are ValueErrors."""
    kind = action.get("kind") if isinstance(action, dict) else None
    if kind not in ("bitmask", "rating"):
        raise ValueError(f"{source}: action.kind must be 'bitmask' or 'rating', got {kind!r}")
    described = f"the dataset's action kind is {kind!r} ({source})"
    if r.task_type is not None and r.task_type != kind:
        raise ValueError(f"RankingArgs.task_type={r.task_type!r} does not match the data: {described}. Set "
                         f"RankingArgs.task_type={kind!r} (or None to follow the data), or point "
                         "DatasetArgs.dataset_dir at a dataset with the intended labels")
    if kind == "bitmask":
        for name in ("num_classes", "positive_rating_threshold"):
            if getattr(r, name) is not None:
                raise ValueError(f"RankingArgs.{name}={getattr(r, name)!r} applies to rating labels, but {described}")
        data_tasks = action.get("tasks") if isinstance(action.get("tasks"), list) else None
        bits = action.get("num_tasks") or (len(data_tasks) if data_tasks else 0)
        if not bits and isinstance(action.get("vocab_size"), int):
            bits = max(0, action["vocab_size"] - 1).bit_length()
        if not isinstance(bits, int) or bits < 1:
            raise ValueError(f"{source}: a bitmask action needs num_tasks, tasks or vocab_size, got {action!r}")
        names = list(r.task_names or data_tasks or KUAIRAND_TASKS[:bits])
        if len(names) > bits:
            raise ValueError(f"RankingArgs.task_names has {len(names)} tasks {names}, but {described} with {bits} "
                             f"action bits{' ' + str(data_tasks) if data_tasks else ''}")
        if r.task_weights is not None and len(r.task_weights) != len(names):
            raise ValueError(f"RankingArgs.task_weights has {len(r.task_weights)} weights for {len(names)} tasks "
                             f"{names} (RankingArgs.task_names, else the tasks of {source})")
        return RankingSetup("bitmask", names, len(names))
    for name in ("task_names", "task_weights"):
        if getattr(r, name) is not None:
            raise ValueError(f"RankingArgs.{name}={getattr(r, name)!r} applies to bitmask tasks, but {described}")
    classes = action.get("num_classes") or action.get("vocab_size")
    if not isinstance(classes, int) or classes < 2:
        raise ValueError(f"{source}: a rating action needs num_classes >= 2, got {action!r}")
    if r.num_classes is not None and r.num_classes != classes:
        raise ValueError(f"RankingArgs.num_classes={r.num_classes} does not match the data: {described} with "
                         f"num_classes={classes}. Set RankingArgs.num_classes={classes} (or None to follow the data)")
    threshold = r.positive_rating_threshold if r.positive_rating_threshold is not None else int(round(0.6 * classes))
    if not 1 <= threshold < classes:
        raise ValueError(f"RankingArgs.positive_rating_threshold={threshold} leaves no positive or no negative class: "
                         f"{described} with classes 0..{classes - 1}; it must be in 1..{classes - 1}")
    return RankingSetup("rating", ["rating_positive"], classes, threshold)


def host_memory_bytes() -> Optional[int]:
    """Memory this host grants: the smaller of physical memory and the cgroup limit (None when unknown)."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else None


def check_embedding_memory(tables: dict[str, tuple[int, str]], dim: int, max_bytes: Optional[int],
                           widths: Optional[dict[str, int]] = None) -> None:
    """Stop before allocating embedding tables larger than ``max_bytes`` (default: host memory per process).

    ``tables``: name -> (rows, where the row count comes from); ``widths``: name -> width where the tables differ
    (None: all ``dim`` wide). Every process builds its full tables on the host before they are sharded, so the fp32
    weights of all tables must fit in one process's share of the host.
    """
    if widths is None:
        total = sum(rows for rows, _ in tables.values()) * dim * FP32_BYTES
    else:
        total = sum(rows * widths[name] for name, (rows, _) in tables.items()) * FP32_BYTES
    if max_bytes is not None:
        limit, limit_text = max_bytes, "EmbeddingArgs.max_embedding_bytes"
    else:
        memory = host_memory_bytes()
        if memory is None:
            return
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        processes = max(1, int(local)) if local.isdigit() else 1
        limit = memory // processes
        limit_text = (f"this host's memory per process ({_human_bytes(memory)} / {processes} process"
                      f"{'es' if processes > 1 else ''}; EmbeddingArgs.max_embedding_bytes overrides the limit)")
    if total <= limit:
        return
    parts = "; ".join(f"{name}: {rows:,} rows ({origin})" for name, (rows, origin) in tables.items())
    width = (f"{dim} (NetworkArgs.hidden_dim)" if widths is None else
             "their widths (NetworkArgs.hidden_dim, item_embedding_width, contextual_embedding_width)")
    raise ValueError(f"the embedding tables need {total:,} bytes ({_human_bytes(total)}: rows x {width} "
                     f"x {FP32_BYTES} bytes; {parts}), more than {limit_text} "
                     f"= {limit:,} bytes. Item ids should be dense (0..num_items - 1): re-map huge ids when "
                     "preparing the data, or lower NetworkArgs.hidden_dim")


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _extend_training_through_validation(dataset: SequenceDataset) -> SequenceDataset:
    """Turn retrieval *validation* samples into training samples that end with the validation item.

    Meta's protocol trains on everything but the test item; the loader's leave-one-out train split also holds the
    validation item out. This adapter reuses the validation windows (history + target) as training sequences.
    """
    target = dataset.target_pos
    old_start, old_end = dataset.history_start, dataset.history_end
    new_end = target + 1
    if dataset.truncate == "recent":
        was_full = (old_end - old_start) >= dataset.max_seqlen
        new_start = np.where(was_full, old_start + 1, old_start)
    else:
        new_start = old_start
        new_end = np.minimum(new_end, old_start + dataset.max_seqlen)
    dataset.history_start, dataset.history_end = new_start, new_end
    dataset.candidate_start = dataset.candidate_end = new_end
    dataset.target_pos = None
    dataset.split = "train"
    return dataset


def build_encoder_config(args: AllArgs, max_tokens: int, interleave_actions: bool, l2_normalize: bool) -> EncoderConfig:
    n = args.network
    return EncoderConfig(
        embedding_dim=n.hidden_dim, num_layers=n.num_layers, num_heads=n.num_heads, qk_dim=n.qk_dim, v_dim=n.v_dim,
        dropout=n.dropout, input_dropout=n.input_dropout, attention_dropout=n.attention_dropout, alpha=n.alpha,
        scaling_seqlen=n.scaling_seqlen, layer_norm_eps=n.layer_norm_eps, max_tokens=max_tokens,
        position_encoding=n.position_encoding, num_time_buckets=n.num_time_buckets, input_scale=n.input_scale,
        relative_attention_bias=n.relative_attention_bias, rab_num_time_buckets=n.rab_num_time_buckets,
        rab_time_reference=n.rab_time_reference, rab_use_position=n.rab_use_position, rab_use_time=n.rab_use_time,
        target_group_size=n.target_group_size, causal=n.causal, contextual_mask=n.contextual_mask,
        attention_backend=n.attention_backend, interleave_actions=interleave_actions,
        recompute_layers=list(n.recompute_layers), recompute_input_norm=n.recompute_input_norm,
        recompute_silu=n.recompute_silu, l2_normalize_output=l2_normalize,
        l2_norm_eps=args.retrieval.l2_norm_eps,
    )  # fmt: skip


class Task:
    name = ""
    headline_metrics: tuple[str, ...] = ()

    def __init__(self, args: AllArgs, ctx: ParallelContext):
        self.args, self.ctx = args, ctx
        _check_task_args(self.name, args)
        if args.network.attention_backend == "triton" and ctx.device.type != "cuda":
            raise ValueError(f"NetworkArgs.attention_backend='triton' (Meta's Triton kernel) needs a CUDA device, the "
                             f"run is on {ctx.device.type}; use 'fused' or 'reference'")
        ensure_dataset(args, ctx)
        path = _metadata_path(args)
        self.ranking_setup = check_against_dataset(self.name, args, read_metadata(path), path)
        self.train_dataset, self.eval_dataset = self.build_datasets()
        self.metadata = self.train_dataset.metadata
        self.contextual_vocab_sizes = self._contextual_vocab_sizes()

    def _dataset(self, split: str) -> SequenceDataset:
        d = self.args.dataset
        return SequenceDataset(
            d.dataset_dir, split, self.name, d.max_seqlen, num_candidates=d.num_candidates if self.name == "ranking" else 0,
            split_strategy=d.split_strategy, truncate=d.truncate, train_ratio=d.train_ratio,
        )  # fmt: skip

    def build_datasets(self):
        return self._dataset("train"), self._dataset(self.args.trainer.eval_split)

    def loaders(self):
        d, t = self.args.dataset, self.args.trainer
        common = dict(rank=self.ctx.dp_rank, world_size=self.ctx.dp_size,
                      num_workers=d.num_workers, pin_memory=self.ctx.device.type == "cuda")
        train = make_dataloader(self.train_dataset, d.batch_size, shuffle=d.shuffle, seed=t.seed,
                                balance_workload=d.balance_workload, drop_last=False, **common)
        evaluation = make_dataloader(self.eval_dataset, d.eval_batch_size or d.batch_size, shuffle=False, seed=t.seed,
                                     **common)
        return train, evaluation

    def _contextual_vocab_sizes(self) -> dict[str, int]:
        available = self.train_dataset.contextual_vocab_sizes
        names = contextual_feature_names(self.args.network.contextual_features, list(available), "the dataset")
        return {n: available[n] for n in names}

    def num_items(self) -> int:
        return self.args.embeddings.item_vocab_size or self.train_dataset.num_items

    def _with_dynamic_tables(self, model):
        """``model`` with the tables of EmbeddingArgs.dynamic_tables remapped by TorchRec's managed-collision
        modules (SparseEmbeddings.manage_collisions)."""
        tables = dict(self.args.embeddings.dynamic_tables)
        if not tables:
            return model
        if self.ctx.world_size > 1:
            from hstu.training.config import NotSupportedYetError

            raise NotSupportedYetError(
                f"EmbeddingArgs.dynamic_tables {sorted(tables)} (the example's DynamicEmbeddingArgs) with "
                f"{self.ctx.world_size} processes is not supported yet: every process would remap ids on its own; "
                "train them with one process")
        try:
            model.embeddings.manage_collisions(tables)
        except ValueError as e:
            raise ValueError(f"EmbeddingArgs.dynamic_tables: {e}") from None
        return model

    def item_id_low(self) -> int:
        if self.args.embeddings.item_id_low is not None:
            return self.args.embeddings.item_id_low
        return 1 if "0 unused" in str(self.metadata.get("item_ids", "")) or self.metadata.get("dataset") in (
            "ml-1m", "ml-20m") else 0

    def train_item_counts(self) -> np.ndarray:
        """How often each item id occurs in the training samples (what a popularity model may know)."""
        ds = self.train_dataset
        starts = np.concatenate([ds.history_start, ds.candidate_start])
        lengths = np.concatenate([ds.history_end - ds.history_start, ds.candidate_end - ds.candidate_start])
        items = np.asarray(ds.data.item[ranges_to_positions(starts, lengths)], dtype=np.int64)
        return np.bincount(items, minlength=self.num_items())[: self.num_items()]


class RetrievalTask(Task):
    name = "retrieval"
    headline_metrics = ("HR@10", "NDCG@10")

    def build_datasets(self):
        train = self._dataset("valid" if self.args.dataset.train_through_validation else "train")
        if self.args.dataset.train_through_validation:
            train = _extend_training_through_validation(train)
        return train, self._dataset(self.args.trainer.eval_split)

    def build_model(self) -> RetrievalModel:
        r = self.args.retrieval
        num_items, low = self.num_items(), self.item_id_low()
        max_tokens = sequence_tokens(self.args.dataset.max_seqlen, 0, len(self.contextual_vocab_sizes), False)
        loss = SampledSoftmaxLoss(
            low, num_items, num_uniform_negatives=r.num_negatives, num_in_batch_negatives=r.num_in_batch_negatives,
            temperature=r.temperature, share_uniform_negatives=r.share_negatives, l2_normalize_embeddings=r.l2_normalize,
            l2_norm_eps=r.l2_norm_eps,
        )  # fmt: skip
        return self._with_dynamic_tables(RetrievalModel(
            num_items, build_encoder_config(self.args, max_tokens, False, r.l2_normalize), loss,
            contextual_vocab_sizes=self.contextual_vocab_sizes, embedding_init_std=self.args.embeddings.init_std,
            item_id_low=low, l2_norm_eps=r.l2_norm_eps,
        ))  # fmt: skip

    def target_timestamps(self, sample_ids) -> torch.Tensor:
        """Timestamps of the held-out items of evaluation samples ``sample_ids`` (-1: padding, time 0)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        ds = self.eval_dataset
        rows = ds.target_pos[np.maximum(ids, 0)]
        times = np.asarray(ds.data.timestamp[rows], dtype=np.int64)
        return torch.from_numpy(np.where(ids >= 0, times, 0))

    def head_flops(self, num_queries: int) -> float:
        r = self.args.retrieval
        return 2.0 * num_queries * (1 + r.num_negatives + r.num_in_batch_negatives) * self.args.network.hidden_dim

    @torch.no_grad()
    def evaluate(self, model, loader, max_batches: Optional[int] = None, with_baseline: bool = False) -> dict:
        device = self.ctx.device
        metrics = RetrievalMetrics(self.args.retrieval.eval_top_k, device=device)
        baseline = RetrievalMetrics(self.args.retrieval.eval_top_k, device=device) if with_baseline else None
        catalogue = model.catalogue_embeddings()
        low = model.item_id_low
        popularity = None
        if with_baseline:
            counts = torch.from_numpy(self.train_item_counts()[low:]).to(device, torch.float64)
            # Ties broken by item id so that the baseline is a strict ranking.
            popularity = counts + torch.linspace(0, 0.5, counts.numel(), device=device, dtype=torch.float64)
        loader.set_epoch(0)
        needs_request_time = self.args.network.relative_attention_bias and self.args.network.rab_time_reference == "next"
        plan = loader.rank_batches(epoch=0) if needs_request_time else None
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(device, non_blocking=True)
            request_times = None
            if plan is not None:
                # The loader's plan names each batch's samples: look up the held-out events' timestamps.
                request_times = self.target_timestamps(next(plan)).to(device)
            users = model.user_embeddings(batch, request_times)
            valid = (~batch.is_padding) & (batch.target_item >= low)
            if not bool(valid.any()):
                continue
            target_columns = batch.target_item[valid] - low
            exclude = None
            if self.args.retrieval.filter_seen_items:
                exclude = seen_item_mask(batch.sequence["item"].values(), batch.seq_lengths, low, catalogue.shape[0])[valid]
            with torch.autocast(device.type, enabled=False):
                scores = users[valid].float() @ catalogue.T
            metrics.update(target_ranks(scores, target_columns, exclude))
            if baseline is not None:
                scores = popularity.unsqueeze(0).expand(target_columns.numel(), -1)
                baseline.update(target_ranks(scores, target_columns, exclude))
        loader.set_epoch(-1)  # leave the cursor so the next evaluation starts from the beginning again
        out = metrics.compute(self.ctx.dp_group)
        if baseline is not None:
            out.update({f"baseline/popularity/{k}": v for k, v in baseline.compute(self.ctx.dp_group).items()
                        if k != "num_samples"})
        return out


class RankingTask(Task):
    name = "ranking"
    headline_metrics = ()

    def __init__(self, args: AllArgs, ctx: ParallelContext):
        super().__init__(args, ctx)
        setup = self.ranking_setup
        self.task_type, self.task_names, self.num_outputs = setup.task_type, setup.task_names, setup.num_outputs
        if self.task_type == "rating":
            self.num_classes, self.threshold = setup.num_outputs, setup.threshold
        self.headline_metrics = tuple(f"AUC/{n}" for n in self.task_names[:2])

    def build_model(self) -> RankingModel:
        r, d = self.args.ranking, self.args.dataset
        max_tokens = sequence_tokens(d.max_seqlen, d.num_candidates, len(self.contextual_vocab_sizes), True)
        loss = MultiTaskLoss(self.task_type, self.num_outputs, r.task_weights)
        return self._with_dynamic_tables(RankingModel(
            self.num_items(), self.train_dataset.action_vocab_size, build_encoder_config(self.args, max_tokens, True, False),
            loss, r.head_hidden_dims, r.head_dropout, contextual_vocab_sizes=self.contextual_vocab_sizes,
            embedding_init_std=self.args.embeddings.init_std, head_activation=r.head_activation, head_bias=r.head_bias,
            item_embedding_dim=self.args.network.item_embedding_width,
            contextual_embedding_dim=self.args.network.contextual_embedding_width,
        ))  # fmt: skip

    def head_flops(self, num_candidates: int) -> float:
        dims = [self.args.network.hidden_dim, *self.args.ranking.head_hidden_dims, self.num_outputs]
        return 2.0 * num_candidates * sum(a * b for a, b in zip(dims[:-1], dims[1:]))

    def binary_targets(self, logits: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, labels), both (N, tasks), for the AUC metrics."""
        if self.task_type == "bitmask":
            return torch.sigmoid(logits.float()), bitmask_to_labels(actions, self.num_outputs)
        probabilities = F.softmax(logits.float(), dim=-1)[:, self.threshold:].sum(-1, keepdim=True)
        return probabilities, (actions >= self.threshold).unsqueeze(1).float()

    def item_label_rates(self) -> torch.Tensor:
        """(num_items, tasks) smoothed positive rate of each item over the training events (the baseline)."""
        ds = self.train_dataset
        starts = np.concatenate([ds.history_start, ds.candidate_start])
        lengths = np.concatenate([ds.history_end - ds.history_start, ds.candidate_end - ds.candidate_start])
        rows = ranges_to_positions(starts, lengths)
        items = torch.from_numpy(np.asarray(ds.data.item[rows], dtype=np.int64))
        actions = torch.from_numpy(np.asarray(ds.data.action[rows], dtype=np.int64))
        if self.task_type == "bitmask":
            labels = bitmask_to_labels(actions, self.num_outputs)
        else:
            labels = (actions >= self.threshold).unsqueeze(1).float()
        n = self.num_items()
        counts = torch.bincount(items, minlength=n)[:n].double()
        positives = torch.zeros(n, labels.shape[1], dtype=torch.float64).index_add_(0, items, labels.double())
        prior = labels.double().mean(0)
        return (positives + 10 * prior) / (counts.unsqueeze(1) + 10)

    @torch.no_grad()
    def evaluate(self, model, loader, max_batches: Optional[int] = None, with_baseline: bool = False) -> dict:
        device = self.ctx.device
        metrics = RankingMetrics(self.task_names, device=device)
        baseline = RankingMetrics(self.task_names, device=device) if with_baseline else None
        rates = self.item_label_rates().to(device) if with_baseline else None
        accuracy = _Accuracy(self.accuracy_names(), device) if "ACC" in self.args.ranking.eval_metrics else None
        users_seen = 0
        loader.set_epoch(0)
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and self.args.trainer.bf16):
                logits, outputs = model.predict(batch)
            layout = outputs.layout
            actions = batch.labels()
            loss, _ = model.loss(logits.float(), actions)
            probabilities, labels = self.binary_targets(logits, actions)
            users = layout.candidate_sequence_ids() + users_seen
            users_seen += batch.batch_size
            metrics.update(probabilities, labels, users, loss_sum=float(loss) * logits.shape[0])
            if accuracy is not None:
                accuracy.update(self.correct_predictions(logits, actions, probabilities, labels))
            if baseline is not None:
                candidates = batch.sequence["item"].values()[layout.candidate_rows()]
                baseline.update(rates[candidates.clamp(max=rates.shape[0] - 1)].float(), labels, users)
        loader.set_epoch(-1)
        out = metrics.compute(self.ctx.dp_group)
        if accuracy is not None:
            out.update(accuracy.compute(self.ctx.dp_group))
        if baseline is not None:
            out.update({f"baseline/popularity/{k}": v for k, v in baseline.compute(self.ctx.dp_group).items()})
        return out

    def accuracy_names(self) -> list[str]:
        """The ACC metrics: one per bitmask task, or one for the rating classes."""
        return [f"ACC/{n}" for n in self.task_names] if self.task_type == "bitmask" else ["ACC/rating"]

    def correct_predictions(self, logits: torch.Tensor, actions: torch.Tensor, probabilities: torch.Tensor,
                            labels: torch.Tensor) -> torch.Tensor:
        """(N, len(accuracy_names())) bool: bitmask tasks, probability > 0.5 agrees with the bit; ratings, the most
        probable class is the rating."""
        if self.task_type == "bitmask":
            return (probabilities > 0.5) == (labels > 0.5)
        return (logits.argmax(dim=-1) == actions).unsqueeze(1)


class _Accuracy:
    """Correct / evaluated counts per metric name, summed over the data-parallel group."""

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = list(names)
        self.counts = torch.zeros(2, len(self.names), dtype=torch.float64, device=device)  # [correct, evaluated]

    def update(self, correct: torch.Tensor) -> None:
        self.counts[0] += correct.sum(0).to(torch.float64)
        self.counts[1] += correct.shape[0]

    def compute(self, group) -> dict[str, float]:
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        correct, evaluated = counts.tolist()
        return {name: c / n for name, c, n in zip(self.names, correct, evaluated) if n > 0}


TASKS = {"retrieval": RetrievalTask, "ranking": RankingTask}


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
