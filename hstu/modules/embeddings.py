"""The sparse part of every model: one TorchRec ``EmbeddingCollection`` holding all embedding tables.

Everything that indexes a table goes through :class:`SparseEmbeddings` (one ``EmbeddingCollection`` call per
lookup), so the collection can be sharded by TorchRec's ``DistributedModelParallel`` without touching model code.
Each table serves exactly one feature of the same name (``item``, ``action``, one per contextual feature).

TorchRec's ``EmbeddingCollection`` holds tables of one width: tables of another width than the first table's (the
example's ``item_embedding_dim`` / ``contextual_embedding_dim``) go into one more collection per width
(``extra_collections``), and :class:`EmbeddingProjection` brings them to the model width.

Dynamic tables (the example's ``DynamicEmbeddingArgs``): :meth:`SparseEmbeddings.manage_collisions` puts TorchRec's
managed-collision modules (``MCHManagedCollisionModule`` in a ``ManagedCollisionCollection``, ``remapper``) in front
of the lookup of the named tables, so that any int64 id is remapped into one of the table's rows: in training a new id
is admitted into a free row, and once the rows are full the policy (least recently / least frequently used) evicts
ids to make room; an id that holds no row reads TorchRec's miss row. The remapping state is buffers of this module, so
it is saved and loaded with the tables.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy, LRU_EvictionPolicy, ManagedCollisionCollection, MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

EVICTION_POLICIES = {"lru": LRU_EvictionPolicy, "lfu": LFU_EvictionPolicy}


@dataclass(frozen=True)
class EmbeddingTableSpec:
    name: str  # table name == feature name
    num_embeddings: int
    embedding_dim: Optional[int] = None  # None: the SparseEmbeddings' embedding_dim


def _truncated_normal_init(weight: torch.Tensor, std: float) -> torch.Tensor:
    # Meta's HSTU initialises item embeddings with a truncated normal of std 0.02.
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


class SparseEmbeddings(nn.Module):
    """All embedding tables of a model, in one ``EmbeddingCollection`` (attribute ``collection``)."""

    def __init__(
        self,
        tables: Sequence[EmbeddingTableSpec],
        embedding_dim: int,
        init_std: float = 0.02,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if not tables:
            raise ValueError("need at least one embedding table")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate embedding table names: {names}")
        for table in tables:
            if table.num_embeddings < 1:
                raise ValueError(f"table {table.name!r} needs num_embeddings >= 1, got {table.num_embeddings}")
            if table.embedding_dim is not None and table.embedding_dim < 1:
                raise ValueError(f"table {table.name!r} needs embedding_dim >= 1, got {table.embedding_dim}")
        self.embedding_dim = int(embedding_dim)
        by_width: dict[int, list[EmbeddingTableSpec]] = {}  # in order of first appearance
        for table in tables:
            by_width.setdefault(int(table.embedding_dim or self.embedding_dim), []).append(table)
        groups = list(by_width.items())
        # Feature names grouped by collection, so that a KJT over all of them splits into one KJT per collection.
        self.feature_names: list[str] = [t.name for _, group in groups for t in group]
        self.group_sizes = [len(group) for _, group in groups]
        self.collection = _collection(groups[0][0], groups[0][1], init_std, device)
        self.extra_collections = nn.ModuleDict(
            {f"width_{width}": _collection(width, group, init_std, device) for width, group in groups[1:]})
        self.remapper: Optional[ManagedCollisionCollection] = None  # see manage_collisions
        self.dynamic_features: list[str] = []

    def manage_collisions(self, tables: dict[str, str], eviction_interval: int = 1) -> None:
        """Make the named tables dynamic: ``{table: "lru" | "lfu"}`` (the eviction policy). Their ids, any int64, are
        remapped into the table's rows by TorchRec's managed-collision modules before every lookup; eviction runs
        every ``eviction_interval`` training forwards. Call once, before the module is sharded or trained."""
        if self.remapper is not None:
            raise ValueError(f"the tables {self.dynamic_features} are dynamic already: call manage_collisions once")
        if not tables:
            return
        if not isinstance(eviction_interval, int) or isinstance(eviction_interval, bool) or eviction_interval < 1:
            raise ValueError(f"eviction_interval must be an int >= 1, got {eviction_interval!r}")
        configs = {c.name: c for ec in [self.collection, *self.extra_collections.values()]
                   for c in ec.embedding_configs()}
        modules = {}
        for name, policy in tables.items():
            if name not in configs:
                raise ValueError(f"dynamic table {name!r} is not one of the embedding tables {self.feature_names}")
            if policy not in EVICTION_POLICIES:
                raise ValueError(f"dynamic table {name!r}: eviction policy {policy!r} is not one of "
                                 f"{sorted(EVICTION_POLICIES)}")
            weight = self.table_weight(name)
            modules[name] = MCHManagedCollisionModule(
                zch_size=configs[name].num_embeddings, device=weight.device, eviction_policy=EVICTION_POLICIES[policy](),
                eviction_interval=eviction_interval, name=name)
        self.dynamic_features = [n for n in self.feature_names if n in tables]
        self.remapper = ManagedCollisionCollection(modules, [configs[n] for n in self.dynamic_features])

    def table_weight(self, name: str) -> torch.Tensor:
        """The weight (rows x width) of table ``name``."""
        for ec in [self.collection, *self.extra_collections.values()]:
            if name in ec.embeddings:
                return ec.embeddings[name].weight
        raise KeyError(f"no embedding table {name!r}; tables: {self.feature_names}")

    def _remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``features`` with the ids of the dynamic tables remapped to their rows (the others unchanged)."""
        jagged = features.to_dict()
        dynamic = [n for n in self.dynamic_features if n in jagged]
        if not dynamic:
            return features
        remapper = self.remapper
        if next(remapper.buffers()).device != features.values().device:
            remapper.to(features.values().device)  # the lookup's device (the tables move there when sharded)
        jagged.update(remapper(KeyedJaggedTensor.from_jt_dict({n: jagged[n] for n in dynamic})).to_dict())
        return KeyedJaggedTensor.from_jt_dict({n: jagged[n] for n in features.keys()})

    def forward(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Embeddings of every feature of ``features`` (keys = this module's feature names), as (N_f, D_f) values."""
        if self.remapper is not None:
            features = self._remap(features)
        if not self.extra_collections:
            return {name: jagged.values() for name, jagged in self.collection(features).items()}
        parts = features.split(self.group_sizes)
        out = {}
        for collection, part in zip([self.collection, *self.extra_collections.values()], parts):
            out.update({name: jagged.values() for name, jagged in collection(part).items()})
        return out

    def make_features(self, ids_by_feature: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> KeyedJaggedTensor:
        """KJT over all of this module's features from {name: (values, lengths)}; absent features stay empty.

        All given features must share one batch size (the KJT stride); absent ones get zero lengths.
        """
        unknown = set(ids_by_feature) - set(self.feature_names)
        if unknown:
            raise KeyError(f"no embedding table for features {sorted(unknown)}; tables: {self.feature_names}")
        first_values, first_lengths = next(iter(ids_by_feature.values()))
        stride = first_lengths.numel()
        values, lengths = [], []
        for name in self.feature_names:
            if name in ids_by_feature:
                v, l = ids_by_feature[name]
                if l.numel() != stride:
                    raise ValueError(f"feature {name!r} has batch size {l.numel()}, expected {stride}")
                values.append(v.to(torch.int64))
                lengths.append(l.to(torch.int64))
            else:
                lengths.append(torch.zeros(stride, dtype=torch.int64, device=first_lengths.device))
        return KeyedJaggedTensor(keys=list(self.feature_names), values=torch.cat(values), lengths=torch.cat(lengths))

    def lookup(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, D) of 1-D ``ids`` of one feature (e.g. negative items, the whole catalogue)."""
        lengths = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
        return self(self.make_features({feature: (ids.reshape(-1), lengths)}))[feature]


def _collection(width: int, tables: Sequence[EmbeddingTableSpec], init_std: float,
                device: Optional[torch.device]) -> EmbeddingCollection:
    return EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=t.name,
                embedding_dim=width,
                num_embeddings=int(t.num_embeddings),
                feature_names=[t.name],
                init_fn=functools.partial(_truncated_normal_init, std=init_std),
            )
            for t in tables
        ],
        device=device,
    )


class EmbeddingProjection(nn.Module):
    """Embeddings of another width to the model width, as the NVIDIA example does it: Linear(in, D) -> ReLU ->
    Linear(D, D), Xavier-uniform weights and zero biases."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(input_dim, output_dim), nn.ReLU(), nn.Linear(output_dim, output_dim))
        for layer in (self.net[0], self.net[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
