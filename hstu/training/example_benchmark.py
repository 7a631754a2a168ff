"""The NVIDIA example's random benchmark data (``BenchmarkDatasetArgs``) as a dataset of our synthetic generator.

The example draws ``num_generated_batches`` random batches per split from the feature layout of its ``FeatureArgs``
(sequence lengths, value distributions) and the table sizes of its ``EmbeddingArgs``, and cycles them. Here the same
layout becomes :class:`hstu.data.synthetic.SyntheticConfig` options: one user per sample, ``train_batch_size x
num_generated_batches`` training users followed by ``eval_batch_size x num_generated_batches`` evaluation users (a
``user_ratio`` split), sequences of the example's lengths, an item table of the example's size, one contextual
feature per contextual table. The data is generated on first use into ``data/benchmark-<hash of the options>``
(``DatasetArgs.prepare_if_missing``), so every configuration with the same layout reuses it.

Item ids follow the generator's topic model with the popularity skew of the item's value distribution, and the
labels follow its action model: the example's batches are uniform noise, ours are learnable. Shapes, sizes and
therefore the work per step are the example's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Optional

from hstu.training.config import KUAIRAND_TASKS, NotSupportedYetError

BENCHMARK_DATA_ROOT = "data"
DEFAULT_NUM_TOPICS = 24
MIN_ITEM_ROWS = 5  # the generator needs at least 4 items (one topic of 4) plus the unused row 0
DEFAULT_ZIPF_ALPHA = 1.5  # the example's Zipf exponent when RandomDistribution.alpha is unset


def benchmark_dataset_fields(benchmark: dict, features: list[dict], tables: list[tuple[str, dict]],
                             ex: dict, ranking: bool) -> dict[str, Any]:
    """Our field values for a checked ``BenchmarkDatasetArgs`` (``benchmark``, defaults filled in), its FeatureArgs
    (``features``, with ``seqlen_dist`` / ``value_dists`` entries as field dicts), its tables (``(class name,
    fields)``), the other example values ``ex`` and whether the run ranks (the example's RankingArgs are bound).

    Raises a ValueError naming the field for a layout the example itself rejects, and NotSupportedYetError for one
    this stack cannot reproduce."""
    for key in ("TrainerArgs.max_train_iters", "TrainerArgs.max_eval_iters"):
        if ex.get(key) is None:
            raise ValueError(f"BenchmarkDatasetArgs needs {key} (the number of random batches to train / evaluate "
                             "on), as in the NVIDIA example")
    table_of = _tables_by_feature(tables)
    feature_of = _features_by_name(features)
    item = benchmark["item_feature_name"]
    if item not in feature_of:
        raise ValueError(f"BenchmarkDatasetArgs.item_feature_name={item!r} is not among the FeatureArgs.feature_names "
                         f"{sorted(feature_of)}")
    sequence = feature_of[item]
    action = benchmark["action_feature_name"]
    if action is not None and action not in sequence["feature_names"]:
        raise ValueError(f"BenchmarkDatasetArgs.action_feature_name={action!r} must be in the FeatureArgs of the item "
                         f"feature {item!r} (feature_names {list(sequence['feature_names'])}): actions pair with items")
    contextual = list(benchmark["contextual_feature_names"])
    for name in contextual:
        if name not in feature_of:
            raise ValueError(f"BenchmarkDatasetArgs.contextual_feature_names: {name!r} is not among the "
                             f"FeatureArgs.feature_names {sorted(feature_of)}")
        if name in (item, action):
            raise ValueError(f"BenchmarkDatasetArgs.contextual_feature_names: {name!r} is also the item or action "
                             "feature")
        if feature_of[name]["max_sequence_length"] != 1:
            raise NotSupportedYetError(
                f"FeatureArgs.max_sequence_length={feature_of[name]['max_sequence_length']} for the contextual feature "
                f"{name!r} (several values per sample) is not supported yet: contextual features hold one value")
    used = {item, *contextual} | ({action} if action is not None else set())
    unused = sorted(set(feature_of) - used)
    if unused:
        raise NotSupportedYetError(f"FeatureArgs feature {unused[0]!r} is neither BenchmarkDatasetArgs."
                                   "item_feature_name, action_feature_name nor one of contextual_feature_names: "
                                   "other features are not supported yet")
    for name in sorted(used):
        if name not in table_of:
            raise ValueError(f"BenchmarkDatasetArgs.embedding_args has no table for the feature {name!r} (tables for "
                             f"{sorted(table_of)})")
    dynamic = {name: table["evict_strategy"].lower() for name, (cls, table) in table_of.items()
               if name in used and cls == "DynamicEmbeddingArgs"}
    if item in dynamic and not ranking:
        raise NotSupportedYetError(f"DynamicEmbeddingArgs for the item table {table_of[item][1]['table_name']!r} with "
                                   "retrieval is not supported yet: retrieval scores every row of the item table as "
                                   "an item; use EmbeddingArgs for it")
    for name, dist in sorted((sequence.get("value_dists") or {}).items()):
        if name != item:
            raise NotSupportedYetError(f"FeatureArgs.value_dists[{name!r}]: a value distribution for a feature other "
                                       f"than the item feature {item!r} is not supported yet")

    length = sequence["max_sequence_length"]
    candidates = benchmark["max_num_candidates"]
    # The example's ranking labels every item when there are no candidates; ours scores candidates, so a ranking
    # run holds the last item of each sequence out as its one candidate (one token fewer per sample).
    held_out = max(candidates, 1) if ranking else candidates
    if length - held_out < 1:
        raise ValueError(f"FeatureArgs.max_sequence_length={length} of the item feature {item!r} leaves no history "
                         f"before {held_out} candidate(s) (BenchmarkDatasetArgs.max_num_candidates={candidates})")
    item_rows = table_of[item][1]["item_vocab_size_or_capacity"]
    if item_rows < MIN_ITEM_ROWS:
        raise ValueError(f"item_vocab_size_or_capacity={item_rows} of the item table "
                         f"{table_of[item][1]['table_name']!r} is below {MIN_ITEM_ROWS} rows")
    generated = benchmark["num_generated_batches"]
    train_users = ex["TrainerArgs.train_batch_size"] * generated
    eval_users = ex["TrainerArgs.eval_batch_size"] * generated
    num_tasks = ex.get("RankingArgs.num_tasks", 1)
    if ranking and num_tasks > len(KUAIRAND_TASKS):
        raise NotSupportedYetError(f"RankingArgs.num_tasks={num_tasks} with BenchmarkDatasetArgs is not supported yet: "
                                   f"the random benchmark labels have {len(KUAIRAND_TASKS)} tasks")
    num_items = item_rows - 1  # ids 1..num_items, row 0 unused
    options = {
        "num_users": train_users + eval_users,
        "num_items": num_items,
        "num_topics": max(1, min(DEFAULT_NUM_TOPICS, num_items // 4)),
        "actions": "bitmask" if ranking else "rating",
        "seed": ex["TrainerArgs.seed"],
        "contextual_vocab": {name: table_of[name][1]["item_vocab_size_or_capacity"] for name in contextual},
        **_length_options(sequence),
        **_item_popularity(sequence.get("value_dists") or {}, item),
    }
    out: dict[str, Any] = {
        "DatasetArgs.dataset_name": "synthetic",
        "DatasetArgs.dataset_dir": benchmark_data_dir(options),
        "DatasetArgs.prepare_if_missing": True,
        "DatasetArgs.synthetic_options": options,
        "EmbeddingArgs.item_vocab_size": item_rows,
        "EmbeddingArgs.dynamic_tables": dynamic,
        "DatasetArgs.max_seqlen": length - held_out,
        "DatasetArgs.num_candidates": held_out,
        "DatasetArgs.split_strategy": "user_ratio",
        "DatasetArgs.train_ratio": train_users / (train_users + eval_users),
        "NetworkArgs.contextual_features": tuple(contextual),
        "ParallelismArgs.embedding_sharding": {
            name: "data_parallel" for name, (cls, table) in table_of.items()
            if name in used and cls == "EmbeddingArgs" and table["sharding_type"] == "data_parallel"},
    }
    if ranking:
        out.update({"RankingArgs.task_type": "bitmask", "RankingArgs.num_classes": None,
                    "RankingArgs.task_names": KUAIRAND_TASKS[:num_tasks]})
    return out


def benchmark_data_dir(options: dict) -> str:
    """Where the synthetic data of these generator options lives: one directory per distinct option set."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(BENCHMARK_DATA_ROOT, f"benchmark-{digest}")


def _tables_by_feature(tables: list[tuple[str, dict]]) -> dict[str, tuple[str, dict]]:
    out: dict[str, tuple[str, dict]] = {}
    for cls, table in tables:
        names = list(table["feature_names"])
        if len(names) != 1:
            raise NotSupportedYetError(f"{cls}.feature_names={names} of table {table['table_name']!r}: a table shared "
                                       "by several features is not supported yet (one table per feature)")
        if names[0] in out:
            raise ValueError(f"BenchmarkDatasetArgs.embedding_args: two tables for the feature {names[0]!r} "
                             f"({out[names[0]][1]['table_name']!r} and {table['table_name']!r})")
        out[names[0]] = (cls, table)
    return out


def _features_by_name(features: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for feature in features:
        for name in feature["feature_names"]:
            if name in out:
                raise ValueError(f"FeatureArgs.feature_names: the feature {name!r} appears in two FeatureArgs")
            out[name] = feature
    return out


def _length_options(sequence: dict) -> dict[str, Any]:
    """The generator's sequence-length options for the item feature's FeatureArgs (the example's lengths)."""
    length = sequence["max_sequence_length"]
    if not sequence["is_jagged"]:
        return {"length_distribution": "fixed", "mean_length": float(length), "min_length": length,
                "max_length": length}
    dist = sequence.get("seqlen_dist")
    if dist is None:  # the example: uniform over 0..length - 1; empty sequences carry no sample here
        return {"length_distribution": "uniform", "mean_length": float(length), "min_length": 1,
                "max_length": max(1, length - 1)}
    high = dist.get("high")
    if high is not None and high > length:
        raise ValueError(f"RandomDistribution.high={high} of the item feature's seqlen_dist exceeds "
                         f"FeatureArgs.max_sequence_length={length}")
    high = length if high is None else high
    low = max(1, dist.get("low", 0))
    kind = dist["dist_type"]
    if kind == "uniform":  # the example draws low..high - 1
        if high - 1 < low:
            raise ValueError(f"RandomDistribution (seqlen_dist) 'uniform' needs high > low (and lengths >= 1), got "
                             f"low={dist.get('low', 0)}, high={high}")
        return {"length_distribution": "uniform", "mean_length": float(length), "min_length": low,
                "max_length": high - 1}
    if low > high:
        raise ValueError(f"RandomDistribution (seqlen_dist) low={low} exceeds high={high}")
    if kind == "zipf":
        return {"length_distribution": "zipf", "length_alpha": float(dist.get("alpha") or DEFAULT_ZIPF_ALPHA),
                "mean_length": float(length), "min_length": low, "max_length": high}
    mean, std = dist.get("mean"), dist.get("std")
    if mean is None or mean <= 0:
        raise ValueError(f"RandomDistribution (seqlen_dist) {kind!r} needs mean > 0, got {mean!r}")
    if kind == "normal":
        if std is None or std <= 0:
            raise ValueError(f"RandomDistribution (seqlen_dist) 'normal' needs std > 0, got {std!r}")
        return {"length_distribution": "normal", "mean_length": float(mean), "length_std": float(std),
                "min_length": low, "max_length": high}
    # lognormal: the example's mean and std are those of the lengths themselves (std defaults to mean / 2)
    std = mean / 2.0 if std is None else std
    if std <= 0:
        raise ValueError(f"RandomDistribution (seqlen_dist) 'lognormal' needs std > 0, got {std!r}")
    return {"length_distribution": "lognormal", "mean_length": float(mean),
            "length_sigma": math.sqrt(math.log1p((std / mean) ** 2)), "min_length": low, "max_length": high}


def _item_popularity(value_dists: dict, item: str) -> dict[str, Any]:
    """The item ids' skew: a Zipf value distribution sets the generator's popularity exponent, uniform removes it."""
    dist: Optional[dict] = value_dists.get(item)
    if dist is None or dist["dist_type"] == "uniform":  # the example's default: uniform over the table
        return {"zipf_exponent": 0.0}
    if dist["dist_type"] == "zipf":
        return {"zipf_exponent": float(dist.get("alpha") or DEFAULT_ZIPF_ALPHA)}
    raise NotSupportedYetError(f"FeatureArgs.value_dists[{item!r}] of type {dist['dist_type']!r} is not supported "
                               "yet (item ids: 'zipf' or 'uniform')")
