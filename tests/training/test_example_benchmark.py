"""The NVIDIA example's random benchmark data (BenchmarkDatasetArgs, FeatureArgs, RandomDistribution and per-table
EmbeddingArgs): a config in its names parses onto a synthetic dataset of the same layout, which is generated on
first use and trains; layouts the example rejects or this stack cannot reproduce are named errors."""

import json
import math
import re

import gin
import numpy as np
import pytest

from hstu.training.config import NotSupportedYetError, parse_gin

# A small ranking benchmark in the example's field names: jagged Zipf lengths, Zipf item ids, two contextual features.
BENCHMARK = """
TrainerArgs.train_batch_size = 4
TrainerArgs.eval_batch_size = 6
TrainerArgs.log_interval = 1
TrainerArgs.eval_interval = 3
TrainerArgs.max_train_iters = 3
TrainerArgs.max_eval_iters = 2
TrainerArgs.pipeline_type = 'none'
TrainerArgs.seed = 7

lens/RandomDistribution.dist_type = 'zipf'
lens/RandomDistribution.alpha = 1.2
lens/RandomDistribution.low = 2
vals/RandomDistribution.dist_type = 'zipf'
vals/RandomDistribution.alpha = 1.3
seq/FeatureArgs.feature_names = ['item', 'action']
seq/FeatureArgs.max_sequence_length = 24
seq/FeatureArgs.is_jagged = True
seq/FeatureArgs.seqlen_dist = @lens/RandomDistribution()
seq/FeatureArgs.value_dists = {'item': @vals/RandomDistribution()}
user/FeatureArgs.feature_names = ['user_id', 'user_age']
user/FeatureArgs.max_sequence_length = 1
BenchmarkDatasetArgs.feature_args = [@seq/FeatureArgs(), @user/FeatureArgs()]

item_table/EmbeddingArgs.feature_names = ['item']
item_table/EmbeddingArgs.table_name = 'item'
item_table/EmbeddingArgs.item_vocab_size_or_capacity = 500
item_table/EmbeddingArgs.sharding_type = 'model_parallel'
action_table/EmbeddingArgs.feature_names = ['action']
action_table/EmbeddingArgs.table_name = 'action'
action_table/EmbeddingArgs.item_vocab_size_or_capacity = 100
action_table/EmbeddingArgs.sharding_type = 'data_parallel'
user_table/EmbeddingArgs.feature_names = ['user_id']
user_table/EmbeddingArgs.table_name = 'user_id'
user_table/EmbeddingArgs.item_vocab_size_or_capacity = 50
user_table/EmbeddingArgs.sharding_type = 'data_parallel'
age_table/EmbeddingArgs.feature_names = ['user_age']
age_table/EmbeddingArgs.table_name = 'user_age_table'
age_table/EmbeddingArgs.item_vocab_size_or_capacity = 10
age_table/EmbeddingArgs.sharding_type = 'model_parallel'
BenchmarkDatasetArgs.embedding_args = [@item_table/EmbeddingArgs(), @action_table/EmbeddingArgs(),
                                       @user_table/EmbeddingArgs(), @age_table/EmbeddingArgs()]

BenchmarkDatasetArgs.item_feature_name = 'item'
BenchmarkDatasetArgs.contextual_feature_names = ['user_id', 'user_age']
BenchmarkDatasetArgs.action_feature_name = 'action'
BenchmarkDatasetArgs.max_num_candidates = 0
BenchmarkDatasetArgs.num_generated_batches = 5

NetworkArgs.num_layers = 1
NetworkArgs.num_attention_heads = 2
NetworkArgs.hidden_size = 16
NetworkArgs.kv_channels = 8
NetworkArgs.item_embedding_dim = 8
NetworkArgs.contextual_embedding_dim = 12
NetworkArgs.scaling_seqlen = 60
RankingArgs.prediction_head_arch = [16, 8]
RankingArgs.num_tasks = 8
OptimizerArgs.optimizer_str = 'adam'
OptimizerArgs.learning_rate = 1e-3
"""

CPU_RUN = ["TrainerArgs.device='cpu'", "TrainerArgs.progress_bar=False", "TrainerArgs.tensorboard=False",
           "TrainerArgs.plot=False", "TrainerArgs.compute_baseline=False"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _parse(tmp_path, text=BENCHMARK, bindings=()):
    path = tmp_path / "benchmark.gin"
    path.write_text(text)
    return parse_gin([str(path)], list(bindings))


def test_the_layout_maps_onto_a_synthetic_dataset(tmp_path):
    args = _parse(tmp_path)
    d, options = args.dataset, args.dataset.synthetic_options
    assert (d.dataset_name, d.prepare_if_missing, d.split_strategy) == ("synthetic", True, "user_ratio")
    assert re.fullmatch(r"data/benchmark-[0-9a-f]{12}", d.dataset_dir)
    # 4 x 5 training users, then 6 x 5 evaluation users
    assert (options["num_users"], d.train_ratio) == (50, pytest.approx(20 / 50))
    assert (options["num_items"], options["actions"], options["seed"]) == (499, "bitmask", 7)
    assert args.embeddings.item_vocab_size == 500  # the example's table rows
    assert options["contextual_vocab"] == {"user_id": 50, "user_age": 10}
    assert (options["length_distribution"], options["length_alpha"], options["min_length"], options["max_length"]) \
        == ("zipf", 1.2, 2, 24)
    assert options["zipf_exponent"] == 1.3
    # ranking without candidates: the last item is the one candidate
    assert (d.max_seqlen, d.num_candidates, d.batch_size, d.eval_batch_size) == (23, 1, 4, 6)
    assert tuple(args.network.contextual_features) == ("user_id", "user_age")
    assert (args.ranking.task_type, len(args.ranking.task_names)) == ("bitmask", 8)
    assert args.parallelism.embedding_sharding == {"action": "data_parallel", "user_id": "data_parallel"}
    # the same layout is the same directory; another seed is another dataset
    gin.clear_config()
    assert _parse(tmp_path).dataset.dataset_dir == d.dataset_dir
    gin.clear_config()
    assert _parse(tmp_path, bindings=["TrainerArgs.seed=8"]).dataset.dataset_dir != d.dataset_dir


@pytest.mark.parametrize("lines, expected", [
    (["seq/FeatureArgs.is_jagged = False"], {"length_distribution": "fixed", "min_length": 24, "max_length": 24}),
    (["lens/RandomDistribution.dist_type = 'uniform'", "lens/RandomDistribution.high = 20"],
     {"length_distribution": "uniform", "min_length": 2, "max_length": 19}),
    (["lens/RandomDistribution.dist_type = 'normal'", "lens/RandomDistribution.mean = 12.0",
      "lens/RandomDistribution.std = 3.0"],
     {"length_distribution": "normal", "mean_length": 12.0, "length_std": 3.0, "max_length": 24}),
    (["lens/RandomDistribution.dist_type = 'lognormal'", "lens/RandomDistribution.mean = 10.0"],
     {"length_distribution": "lognormal", "mean_length": 10.0, "length_sigma": math.sqrt(math.log(1.25))}),
    (["vals/RandomDistribution.dist_type = 'uniform'"], {"zipf_exponent": 0.0}),
])
def test_each_length_and_value_distribution(tmp_path, lines, expected):
    options = _parse(tmp_path, BENCHMARK + "\n".join(lines) + "\n").dataset.synthetic_options
    for key, value in expected.items():
        assert options[key] == pytest.approx(value), key


@pytest.mark.parametrize("kind, params, low, high, mean", [
    ("zipf", dict(length_alpha=1.5), 3, 40, None),
    ("normal", dict(mean_length=20.0, length_std=4.0), 1, 40, 20.0),
    ("lognormal", dict(mean_length=12.0, length_sigma=math.sqrt(math.log(1.25))), 1, 400, 12.0),
    ("uniform", dict(mean_length=10.0), 5, 9, 7.0),
])
def test_the_generated_lengths_follow_the_examples_distribution(kind, params, low, high, mean):
    from hstu.data.synthetic import SyntheticConfig, sample_lengths

    config = SyntheticConfig(num_users=4000, length_distribution=kind, min_length=low, max_length=high, **params)
    lengths = sample_lengths(config, np.random.default_rng(0))
    assert lengths.min() >= low and lengths.max() <= high
    if kind == "zipf":  # P(k) ~ k^-1.5 shifted to start at low: about 38% of the draws are exactly low
        assert 0.33 < np.mean(lengths == low) < 0.43
    else:
        assert abs(lengths.mean() - mean) < 0.05 * mean


def test_a_benchmark_config_trains_on_cpu(tmp_path, monkeypatch):
    from hstu.data.processed import ProcessedData
    from hstu.training.trainer import run

    monkeypatch.chdir(tmp_path)
    args = _parse(tmp_path, bindings=CPU_RUN + [f"TrainerArgs.ckpt_save_dir={str(tmp_path / 'run')!r}"])
    run("ranking", args)
    data = ProcessedData.open(args.dataset.dataset_dir)
    lengths = np.diff(data.offsets)
    assert len(lengths) == 50 and lengths.min() >= 2 and lengths.max() <= 24
    assert [(f["name"], f["vocab_size"]) for f in data.metadata["contextual_features"]] == \
        [("user_id", 50), ("user_age", 10)]
    assert data.metadata["num_items"] <= 500 and args.embeddings.item_vocab_size == 500
    with open(tmp_path / "run" / "train_log.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_a_retrieval_benchmark_keeps_whole_sequences(tmp_path):
    text = re.sub(r"RankingArgs\.\w+ = .*\n", "", BENCHMARK)
    args = _parse(tmp_path, text)
    assert (args.dataset.max_seqlen, args.dataset.num_candidates) == (24, 0)
    assert args.dataset.synthetic_options["actions"] == "rating"


@pytest.mark.parametrize("old, new, error, field", [
    ("BenchmarkDatasetArgs.num_generated_batches = 5", "DatasetArgs.dataset_name = 'ml-1m'", ValueError,
     "DatasetArgs.dataset_name"),
    ("TrainerArgs.max_eval_iters = 2", "", ValueError, "TrainerArgs.max_eval_iters"),
    ("BenchmarkDatasetArgs.item_feature_name = 'item'", "BenchmarkDatasetArgs.item_feature_name = 'movie'",
     ValueError, "BenchmarkDatasetArgs.item_feature_name"),
    ("@user_table/EmbeddingArgs(), ", "", ValueError, "'user_id'"),
    ("user/FeatureArgs.max_sequence_length = 1", "user/FeatureArgs.max_sequence_length = 3", NotSupportedYetError,
     "FeatureArgs.max_sequence_length"),
    ("['user_id', 'user_age']\nBenchmarkDatasetArgs.action", "['user_id']\nBenchmarkDatasetArgs.action",
     NotSupportedYetError, "'user_age'"),
    ("{'item': @vals/RandomDistribution()}", "{'action': @vals/RandomDistribution()}", NotSupportedYetError,
     "FeatureArgs.value_dists['action']"),
    ("lens/RandomDistribution.low = 2", "lens/RandomDistribution.high = 30", ValueError, "RandomDistribution.high"),
    ("seq/FeatureArgs.max_sequence_length = 24", "seq/FeatureArgs.max_sequence_length = 1", ValueError,
     "FeatureArgs.max_sequence_length"),
    ("[16, 8]\nRankingArgs.num_tasks = 8", "[16, 9]\nRankingArgs.num_tasks = 9", NotSupportedYetError,
     "RankingArgs.num_tasks=9"),
    ("item_table/EmbeddingArgs.feature_names = ['item']", "item_table/EmbeddingArgs.feature_names = ['item', 'x']",
     NotSupportedYetError, "EmbeddingArgs.feature_names"),
])
def test_bad_layouts_are_named_errors(tmp_path, old, new, error, field):
    assert old in BENCHMARK
    with pytest.raises(error, match=re.escape(field)):
        _parse(tmp_path, BENCHMARK.replace(old, new))


@pytest.mark.parametrize("ours", ["DatasetArgs.max_seqlen=10", "DatasetArgs.dataset_dir='data/x'",
                                  "NetworkArgs.contextual_features=['user_id']"])
def test_benchmark_data_and_our_name_for_one_setting_is_an_error_naming_both(tmp_path, ours):
    with pytest.raises(ValueError, match=re.escape(ours.split("=")[0]) + ".*bind only one") as info:
        _parse(tmp_path, bindings=[ours])
    assert "BenchmarkDatasetArgs" in str(info.value)
