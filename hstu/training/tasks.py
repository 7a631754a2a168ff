"""What differs between retrieval and ranking: datasets, model, evaluation and the popularity baseline."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from hstu.data.loader import SequenceDataset, make_dataloader, ranges_to_positions
from hstu.metrics import RankingMetrics, RetrievalMetrics, seen_item_mask, target_ranks
from hstu.models import MultiTaskLoss, RankingModel, RetrievalModel, SampledSoftmaxLoss, bitmask_to_labels
from hstu.modules.encoder import EncoderConfig
from hstu.training.config import KUAIRAND_TASKS, AllArgs
from hstu.training.distributed import ParallelContext

PREPARE_HINTS = {
    "synthetic": "python -m hstu.data prepare synthetic --out-dir {dir}",
    "ml-1m": "python -m hstu.data prepare ml-1m --raw-dir <folder with ratings.dat, users.dat, movies.dat> --out-dir {dir}"
    "   (or add --download)",
    "ml-20m": "python -m hstu.data prepare ml-20m --raw-dir <folder with ratings.csv> --out-dir {dir}   (or add --download)",
    "kuairand-pure": "python -m hstu.data prepare kuairand-pure --raw-dir <KuaiRand-Pure folder> --out-dir {dir}",
    "kuairand-1k": "python -m hstu.data prepare kuairand-1k --raw-dir <KuaiRand-1K folder> --out-dir {dir}",
    "kuairand-27k": "python -m hstu.data prepare kuairand-27k --raw-dir <KuaiRand-27K folder> --out-dir {dir}",
}


class DatasetMissingError(SystemExit):
    pass


def ensure_dataset(args: AllArgs, ctx: ParallelContext) -> None:
    """Generate the synthetic data when allowed, else stop with the command that prepares the data."""
    d = args.dataset
    present = os.path.isfile(os.path.join(d.dataset_dir, "metadata.json"))
    if not present and d.prepare_if_missing and d.dataset_name == "synthetic":
        if ctx.is_main:
            from hstu.data.synthetic import write_synthetic

            print(f"[hstu] generating the synthetic dataset into {d.dataset_dir}", flush=True)
            write_synthetic(d.dataset_dir, overwrite=False, show_progress=False, **dict(d.synthetic_options))
        ctx.barrier()
        present = True
    if not present:
        hint = PREPARE_HINTS.get(d.dataset_name, "python -m hstu.data prepare <dataset> --out-dir {dir}")
        raise DatasetMissingError(
            f"error: no processed dataset at {os.path.abspath(d.dataset_dir)} (metadata.json missing).\n"
            f"Prepare it first:\n    {hint.format(dir=d.dataset_dir)}\n"
            f"or point DatasetArgs.dataset_dir at a prepared directory (--gin-param DatasetArgs.dataset_dir='\"...\"')."
        )


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
        target_group_size=n.target_group_size, interleave_actions=interleave_actions,
        recompute_layers=list(n.recompute_layers), l2_normalize_output=l2_normalize,
        l2_norm_eps=args.retrieval.l2_norm_eps,
    )  # fmt: skip


class Task:
    name = ""
    headline_metrics: tuple[str, ...] = ()

    def __init__(self, args: AllArgs, ctx: ParallelContext):
        self.args, self.ctx = args, ctx
        ensure_dataset(args, ctx)
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
        names = list(self.args.network.contextual_features)
        missing = [n for n in names if n not in available]
        if missing:
            raise ValueError(f"NetworkArgs.contextual_features {missing} not in the dataset (has {sorted(available)})")
        return {n: available[n] for n in names}

    def num_items(self) -> int:
        return self.args.embeddings.item_vocab_size or self.train_dataset.num_items

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
            if self.args.dataset.split_strategy != "leave_one_out" or self.args.trainer.eval_split != "test":
                raise ValueError("train_through_validation needs split_strategy='leave_one_out' and eval_split='test'")
            train = _extend_training_through_validation(train)
        return train, self._dataset(self.args.trainer.eval_split)

    def build_model(self) -> RetrievalModel:
        r = self.args.retrieval
        num_items, low = self.num_items(), self.item_id_low()
        max_tokens = self.args.dataset.max_seqlen + len(self.contextual_vocab_sizes)
        loss = SampledSoftmaxLoss(
            low, num_items, num_uniform_negatives=r.num_negatives, num_in_batch_negatives=r.num_in_batch_negatives,
            temperature=r.temperature, share_uniform_negatives=r.share_negatives, l2_normalize_embeddings=r.l2_normalize,
            l2_norm_eps=r.l2_norm_eps,
        )  # fmt: skip
        return RetrievalModel(
            num_items, build_encoder_config(self.args, max_tokens, False, r.l2_normalize), loss,
            contextual_vocab_sizes=self.contextual_vocab_sizes, embedding_init_std=self.args.embeddings.init_std,
            item_id_low=low, l2_norm_eps=r.l2_norm_eps,
        )  # fmt: skip

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
        r, action = args.ranking, self.metadata["action"]
        self.task_type = r.task_type or ("bitmask" if action.get("kind") == "bitmask" else "rating")
        if self.task_type == "bitmask":
            self.task_names = list(r.task_names or action.get("tasks") or KUAIRAND_TASKS)
            self.num_outputs = len(self.task_names)
        else:
            self.num_classes = int(r.num_classes or action.get("num_classes") or action["vocab_size"])
            self.num_outputs = self.num_classes
            self.threshold = (r.positive_rating_threshold if r.positive_rating_threshold is not None
                              else int(round(0.6 * self.num_classes)))
            self.task_names = ["rating_positive"]
        self.headline_metrics = tuple(f"AUC/{n}" for n in self.task_names[:2])

    def build_model(self) -> RankingModel:
        r, d = self.args.ranking, self.args.dataset
        max_tokens = 2 * d.max_seqlen + d.num_candidates + len(self.contextual_vocab_sizes)
        loss = MultiTaskLoss(self.task_type, self.num_outputs, r.task_weights)
        return RankingModel(
            self.num_items(), self.train_dataset.action_vocab_size, build_encoder_config(self.args, max_tokens, True, False),
            loss, r.head_hidden_dims, r.head_dropout, contextual_vocab_sizes=self.contextual_vocab_sizes,
            embedding_init_std=self.args.embeddings.init_std,
        )  # fmt: skip

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
        users_seen = 0
        loader.set_epoch(0)
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and self.args.trainer.bf16):
                logits, _ = model.predict(batch)
            actions = batch.labels()
            loss, _ = model.loss(logits.float(), actions)
            probabilities, labels = self.binary_targets(logits, actions)
            users = torch.repeat_interleave(torch.arange(batch.batch_size, device=device), batch.num_candidates) + users_seen
            users_seen += batch.batch_size
            metrics.update(probabilities, labels, users, loss_sum=float(loss) * logits.shape[0])
            if baseline is not None:
                candidates = batch.sequence["item"].values()[_candidate_rows(batch)]
                baseline.update(rates[candidates.clamp(max=rates.shape[0] - 1)].float(), labels, users)
        loader.set_epoch(-1)
        out = metrics.compute(self.ctx.dp_group)
        if baseline is not None:
            out.update({f"baseline/popularity/{k}": v for k, v in baseline.compute(self.ctx.dp_group).items()})
        return out


def _candidate_rows(batch) -> torch.Tensor:
    from hstu.ops import candidate_mask

    return candidate_mask(batch.seq_offsets, batch.num_candidates)


TASKS = {"retrieval": RetrievalTask, "ranking": RankingTask}


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
