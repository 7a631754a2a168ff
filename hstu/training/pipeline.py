"""The step loop of one training segment: our own step (``TrainerArgs.pipeline = "none"``) or one of TorchRec's train
pipelines (``"sparse_dist"``: ``TrainPipelineSparseDist``, ``"prefetch_sparse_dist"``:
``PrefetchTrainPipelineSparseDist``; the NVIDIA example's ``pipeline_type`` 'native' and 'prefetch').

TorchRec's pipelines run ``progress(batches)``: the host-to-device copy of batch i+2 (memcpy stream) and the input
distribution (the ids' all-to-all) of the sharded tables for batch i+1 (data-dist stream) overlap the forward and
backward of batch i; the prefetch variant also prefetches batch i+1's rows into the tables' cache. They ask of the
model: forward(batch) -> (losses, output); a batch type with ``to(device, non_blocking)``, ``record_stream`` and
``pin_memory``; and each pipelined sharded module's input an attribute of that batch, found by tracing the model's
forward with torch.fx. They call ``optimizer.zero_grad()`` before the forward and ``optimizer.step()`` after the
backward. The adapter of this module provides each:

* :class:`PipelineBatch`: the :class:`~hstu.data.batch.JaggedBatch` plus ``features``, the KJT that each pipelined
  sharded collection looks up, built on the host by the model's own feature function (so the same ids), pinned and
  copied with the batch.
* :class:`PipelinedStep`: the module the pipeline drives. Traced, its forward shows each pipelined collection reading
  ``batch.features[path]`` (what TorchRec's tracer looks for); run, it is the model's own training forward under the
  run's autocast, returning (the loss as backward sees it, the step output). Inside the model's forward the pipelined
  collection returns the embeddings of the input TorchRec distributed ahead, which is the KJT the model builds.
* :class:`StepUpdate`: the "optimizer" TorchRec calls: ``zero_grad()`` sets the learning rates of the step and clears
  the gradients, ``step()`` reduces the gradients and steps the optimizers (clipping, fp16 loss scaling) as the
  plain step does.

A collection is pipelined only when the forward looks it up once, with the batch's ids: the item table of a retrieval
model with uniform negatives (looked up again for the negatives drawn in the forward) and dynamic tables (remapped
inside the forward) keep their own lookup, logged; the pipeline still overlaps the copy of the next batches.

The pipelines change when the input distribution of a batch runs, not what is computed: the losses are those of
the plain step. The trainer drains the pipeline before anything else uses the model (evaluation, checkpoints, the
run's end), so no batch is in flight then and the data loader's position is that of the trained batches.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from hstu.data.batch import JaggedBatch

logger = logging.getLogger(__name__)

PIPELINES = ("none", "sparse_dist", "prefetch_sparse_dist")


@dataclasses.dataclass
class PipelineBatch(Pipelineable):
    """A batch as TorchRec's pipelines move it: the model's batch and the input KJT of each pipelined collection
    (by module path inside :class:`PipelinedStep`)."""

    batch: JaggedBatch
    features: dict[str, KeyedJaggedTensor]

    def to(self, device: torch.device, non_blocking: bool = False) -> "PipelineBatch":
        return PipelineBatch(self.batch.to(device, non_blocking=non_blocking),
                             {path: kjt.to(device, non_blocking=non_blocking) for path, kjt in self.features.items()})

    def pin_memory(self) -> "PipelineBatch":
        return PipelineBatch(self.batch.pin_memory(), {path: kjt.pin_memory() for path, kjt in self.features.items()})

    def record_stream(self, stream: torch.Stream) -> None:
        b = self.batch
        for value in (b.sequence, b.num_candidates, b.is_padding, b.contextual, b.target_item, *self.features.values()):
            if value is not None:
                value.record_stream(stream)


def _collections(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """The model's embedding collections in the order its sparse module splits the features: path -> (module, its
    features)."""
    embeddings = model.embeddings
    modules = {"model.embeddings.collection": embeddings.collection}
    modules.update({f"model.embeddings.extra_collections.{name}": c for name, c in embeddings.extra_collections.items()})
    out, start = {}, 0
    for (path, module), size in zip(modules.items(), embeddings.group_sizes):
        out[path] = (module, list(embeddings.feature_names[start : start + size]))
        start += size
    return out


def _features_looked_up_again(model: nn.Module) -> dict[str, str]:
    """Features whose collection the training forward calls more than once or with other ids than the batch's:
    feature -> why."""
    reasons = {name: "a dynamic table (its ids are remapped inside the forward)"
               for name in getattr(model.embeddings, "dynamic_features", [])}
    loss = getattr(model, "loss", None)
    if getattr(loss, "num_uniform_negatives", 0) > 0:
        reasons.setdefault("item", "looked up again for the uniform negatives drawn in the forward "
                                   "(RetrievalArgs.num_negatives)")
    return reasons


def pipelined_collections(model: nn.Module) -> tuple[list[str], list[str]]:
    """(paths of the sharded collections TorchRec can pipeline, notes on the sharded ones it cannot)."""
    again = _features_looked_up_again(model)
    paths, notes = [], []
    for path, (collection, features) in _collections(model).items():
        if not isinstance(collection, ShardedModule):
            continue  # unsharded: a local lookup, nothing to distribute
        blocked = {f: again[f] for f in features if f in again}
        if blocked:
            notes.append(f"{path[len('model.'):]} (tables {features}) keeps its own input distribution: " +
                         "; ".join(f"{f}: {why}" for f, why in blocked.items()))
        else:
            paths.append(path)
    return paths, notes


def _sequence_keys(model: nn.Module) -> list[str]:
    from hstu.models import RankingModel

    return ["item", "action"] if isinstance(model, RankingModel) else ["item"]


class PipelinedStep(nn.Module):
    """The module TorchRec's pipeline drives; see the module docstring."""

    def __init__(self, model: nn.Module, paths: list[str], autocast: Callable[[], Any],
                 scaled: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.paths = list(paths)
        self._autocast, self._scaled = autocast, scaled
        self._keys = _sequence_keys(model)

    def features(self, batch: JaggedBatch) -> dict[str, KeyedJaggedTensor]:
        """The input KJT of each pipelined collection for ``batch``: the model's own feature function, split by
        collection as the model's sparse module splits it."""
        if not self.paths:
            return {}
        from hstu.models.common import sparse_features

        embeddings = self.model.embeddings
        kjt = sparse_features(embeddings, batch, self._keys, self.model.contextual_keys)
        parts = kjt.split(embeddings.group_sizes) if embeddings.extra_collections else [kjt]
        by_path = dict(zip(_collections(self.model), parts))
        return {path: by_path[path] for path in self.paths}

    def forward(self, batch):
        if isinstance(batch, torch.fx.Proxy):
            # What TorchRec's tracer reads: each pipelined collection looks up a KJT of the batch.
            return [self.model.get_submodule(path[len("model."):])(batch.features[path]) for path in self.paths]
        with self._autocast():
            out = self.model(batch.batch)
        return self._scaled(out.loss), (out, batch.batch)


class StepUpdate:
    """The optimizer TorchRec's pipelines call: ``zero_grad()`` before the forward, ``step()`` after the backward."""

    def __init__(self, begin: Callable[[], Any], finish: Callable[[], Any]):
        self._begin, self._finish = begin, finish
        self.begun: Any = None  # what begin() returned for the step in progress
        self.finished: Any = None  # what finish() returned for the last step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.begun = self._begin()

    def step(self, closure=None) -> None:
        self.finished = self._finish()


class TorchRecSteps:
    """Steps of a training segment through one of TorchRec's train pipelines."""

    def __init__(self, kind: str, model: nn.Module, device: torch.device, update: StepUpdate,
                 autocast: Callable[[], Any], scaled: Callable[[torch.Tensor], torch.Tensor], pin_memory: bool,
                 announce: bool = True):
        from torchrec.distributed.train_pipeline import PrefetchTrainPipelineSparseDist, TrainPipelineSparseDist

        if kind not in ("sparse_dist", "prefetch_sparse_dist"):
            raise ValueError(f"TrainerArgs.pipeline must be one of {list(PIPELINES)}, got {kind!r}")
        paths, notes = pipelined_collections(model)
        self.step_module = PipelinedStep(model, paths, autocast, scaled)
        self.update = update
        self.pin_memory = pin_memory
        cls = TrainPipelineSparseDist if kind == "sparse_dist" else PrefetchTrainPipelineSparseDist
        if device.type != "cuda":
            # The prefetch stage runs on CUDA streams only (TorchRec skips it without them, and its pipelined
            # forward then has nothing to read); what it adds, the cache prefetch, needs a GPU cache anyway.
            notes.append(f"on {device.type} there are no streams: the stages run one after the other (same results, "
                         "nothing overlaps)" + (", and TrainPipelineSparseDist stands in for the prefetch pipeline"
                                                if cls is PrefetchTrainPipelineSparseDist else ""))
            cls = TrainPipelineSparseDist
        self.pipeline = cls(self.step_module, update, device, execute_all_batches=True)
        if announce:
            what = (f"input distribution of {[p[len('model.'):] for p in paths]} overlapped with the dense step"
                    if paths else "no sharded collection to pipeline: the copy of the next batches overlaps the step")
            lines = [f"[hstu] TrainerArgs.pipeline={kind!r} (TorchRec {cls.__name__}): {what}"]
            print("\n".join(lines + [f"[hstu]   {note}" for note in notes]), flush=True)

    def _feed(self, batches: Iterable[JaggedBatch]) -> Iterator[PipelineBatch]:
        for batch in batches:
            item = PipelineBatch(batch, self.step_module.features(batch))
            if self.pin_memory and item.features:
                item = dataclasses.replace(item, features={p: k.pin_memory() for p, k in item.features.items()})
            yield item

    def run(self, batches: Iterable[JaggedBatch]) -> Iterator[tuple[Any, JaggedBatch, Any, Any]]:
        """(step output, the batch on the device, begin()'s and finish()'s results) of every step of ``batches``;
        the pipeline is empty when the iteration ends."""
        self.step_module.train(self.step_module.model.training)
        feed = self._feed(batches)
        while True:
            try:
                out, batch = self.pipeline.progress(feed)
            except StopIteration:
                return
            yield out, batch, self.update.begun, self.update.finished

    def detached(self):
        """Context in which the model runs its own forward (evaluation): the pipeline gives the sharded modules'
        forwards back, and pipelines them again for the next segment. Only between segments (nothing in flight)."""
        return _Detached(self.pipeline)


class _Detached:
    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __enter__(self):
        self.pipeline.detach()

    def __exit__(self, *exc) -> None:
        self.pipeline.attach()


__all__ = ["PIPELINES", "PipelineBatch", "PipelinedStep", "StepUpdate", "TorchRecSteps", "pipelined_collections"]
