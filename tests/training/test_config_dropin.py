"""Gin files in the field names of NVIDIA's recsys-examples HSTU example: every field of every one of its argument
classes is accepted with its meaning and default, maps onto our fields, and every value we cannot reproduce yet, every
unknown field and every setting bound under both names is an error naming the fields."""

import glob
import os
import re
import warnings

import gin
import pytest

from hstu.training.cli import build_parser
from hstu.training.config import (
    EXAMPLE_FIELDS,
    ExampleDefaultWarning,
    NotSupportedYetError,
    example_field_table,
    parse_gin,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every field of the example's TrainerArgs, DatasetArgs, NetworkArgs, OptimizerArgs, TensorModelParallelArgs,
# RankingArgs and RetrievalArgs, with values this stack reproduces.
EVERY_MAIN_FIELD = """
TrainerArgs.train_batch_size = 6
TrainerArgs.eval_batch_size = 10
TrainerArgs.eval_interval = 7
TrainerArgs.log_interval = 3
TrainerArgs.max_train_iters = 40
TrainerArgs.max_eval_iters = 5
TrainerArgs.seed = 99
TrainerArgs.profile = False
TrainerArgs.profile_step_start = 2
TrainerArgs.profile_step_end = 4
TrainerArgs.ckpt_save_interval = 20
TrainerArgs.ckpt_save_dir = 'runs/every_field'
TrainerArgs.ckpt_load_dir = ''
TrainerArgs.pipeline_type = 'none'
TrainerArgs.enable_balanced_shuffler = True

DatasetArgs.dataset_name = 'kuairand-1k'
DatasetArgs.max_history_seqlen = 64
DatasetArgs.dataset_path = 'prepared'
DatasetArgs.max_num_candidates = 5
DatasetArgs.shuffle = True

NetworkArgs.num_layers = 3
NetworkArgs.hidden_size = 48
NetworkArgs.num_attention_heads = 2
NetworkArgs.kv_channels = 24
NetworkArgs.hidden_dropout = 0.1
NetworkArgs.norm_epsilon = 1e-4
NetworkArgs.is_causal = True
NetworkArgs.dtype_str = 'bfloat16'
NetworkArgs.kernel_backend = 'cutlass'
NetworkArgs.target_group_size = 1
NetworkArgs.num_position_buckets = 512
NetworkArgs.recompute_input_layernorm = False
NetworkArgs.recompute_input_silu = False
NetworkArgs.item_embedding_dim = -1
NetworkArgs.contextual_embedding_dim = -1
NetworkArgs.scaling_seqlen = 300
NetworkArgs.embedding_backend = None
NetworkArgs.disable_contextual_mask = False

OptimizerArgs.optimizer_str = 'sgd'
OptimizerArgs.learning_rate = 0.01
OptimizerArgs.adam_beta1 = 0.8
OptimizerArgs.adam_beta2 = 0.95
OptimizerArgs.adam_eps = 1e-7

TensorModelParallelArgs.tensor_model_parallel_size = 2

RankingArgs.prediction_head_arch = [256, 64, 4]
RankingArgs.prediction_head_act_type = 'gelu'
RankingArgs.prediction_head_bias = True
RankingArgs.num_tasks = 4
RankingArgs.eval_metrics = ('auc',)

RetrievalArgs.num_negatives = 32
RetrievalArgs.eval_metrics = ('HR@5', 'NDCG@50', 'MRR')
"""

# Every field of the example's per-table and random-data classes.
EVERY_BENCHMARK_FIELD = """
lengths/RandomDistribution.dist_type = 'zipf'
lengths/RandomDistribution.low = 1
lengths/RandomDistribution.high = 100
lengths/RandomDistribution.mean = 20.0
lengths/RandomDistribution.std = 5.0
lengths/RandomDistribution.alpha = 1.3
items/RandomDistribution.dist_type = 'uniform'
items/RandomDistribution.high = 1000

seq/FeatureArgs.feature_names = ['item', 'action']
seq/FeatureArgs.max_sequence_length = 100
seq/FeatureArgs.is_jagged = True
seq/FeatureArgs.seqlen_dist = @lengths/RandomDistribution()
seq/FeatureArgs.value_dists = {'item': @items/RandomDistribution()}

item_table/DynamicEmbeddingArgs.feature_names = ['item']
item_table/DynamicEmbeddingArgs.table_name = 'item'
item_table/DynamicEmbeddingArgs.item_vocab_size_or_capacity = 100000
item_table/DynamicEmbeddingArgs.sharding_type = 'model_parallel'
item_table/DynamicEmbeddingArgs.global_hbm_for_values = 1048576
item_table/DynamicEmbeddingArgs.item_vocab_gpu_capacity = 5000.0
item_table/DynamicEmbeddingArgs.item_vocab_gpu_capacity_ratio = 0.05
item_table/DynamicEmbeddingArgs.evict_strategy = 'lfu'
item_table/DynamicEmbeddingArgs.caching = True
item_table/DynamicEmbeddingArgs.dist_type = 'hash_roundrobin'

action_table/EmbeddingArgs.feature_names = ['action']
action_table/EmbeddingArgs.table_name = 'action'
action_table/EmbeddingArgs.item_vocab_size_or_capacity = 256
action_table/EmbeddingArgs.sharding_type = 'data_parallel'

BenchmarkDatasetArgs.feature_args = [@seq/FeatureArgs()]
BenchmarkDatasetArgs.embedding_args = [@item_table/DynamicEmbeddingArgs(), @action_table/EmbeddingArgs()]
BenchmarkDatasetArgs.item_feature_name = 'item'
BenchmarkDatasetArgs.contextual_feature_names = []
BenchmarkDatasetArgs.action_feature_name = 'action'
BenchmarkDatasetArgs.max_num_candidates = 0
BenchmarkDatasetArgs.num_generated_batches = 10
"""

# The same small ranking model written twice: in the example's names and in ours.
EXAMPLE_STYLE = """
TrainerArgs.train_batch_size = 16
TrainerArgs.eval_batch_size = 32
TrainerArgs.eval_interval = 5
TrainerArgs.log_interval = 1
TrainerArgs.max_train_iters = 5
TrainerArgs.ckpt_save_dir = 'runs/same_model'
DatasetArgs.dataset_name = 'synthetic'
DatasetArgs.dataset_path = 'data/roots'
DatasetArgs.max_history_seqlen = 20
DatasetArgs.max_num_candidates = 4
NetworkArgs.num_layers = 1
NetworkArgs.hidden_size = 32
NetworkArgs.num_attention_heads = 2
NetworkArgs.kv_channels = 16
NetworkArgs.hidden_dropout = 0.0
NetworkArgs.scaling_seqlen = 60
OptimizerArgs.optimizer_str = 'adam'
OptimizerArgs.learning_rate = 1e-3
RankingArgs.prediction_head_arch = [64, 8]
RankingArgs.num_tasks = 8
RetrievalArgs.num_negatives = 16
RetrievalArgs.eval_metrics = ('HR@10', 'NDCG@10')
"""
OUR_STYLE = """
TrainerArgs.run_dir = 'runs/same_model'
TrainerArgs.max_epochs = 5
TrainerArgs.max_steps = 5
TrainerArgs.eval_interval_steps = 5
TrainerArgs.eval_every_epochs = 0
TrainerArgs.log_interval_steps = 1
TrainerArgs.checkpoint_interval_steps = -1
TrainerArgs.save_final_checkpoint = False
TrainerArgs.pipeline = 'sparse_dist'
DatasetArgs.dataset_name = 'synthetic'
DatasetArgs.dataset_dir = 'data/roots/synthetic'
DatasetArgs.batch_size = 16
DatasetArgs.eval_batch_size = 32
DatasetArgs.max_seqlen = 20
DatasetArgs.num_candidates = 4
DatasetArgs.shuffle = False
DatasetArgs.split_strategy = 'user_ratio'
DatasetArgs.train_ratio = 0.7
NetworkArgs.num_layers = 1
NetworkArgs.hidden_dim = 32
NetworkArgs.num_heads = 2
NetworkArgs.qk_dim = 16
NetworkArgs.v_dim = 16
NetworkArgs.dropout = 0.0
NetworkArgs.input_dropout = 0.0
NetworkArgs.scaling_seqlen = 60
NetworkArgs.layer_norm_eps = 1e-5
NetworkArgs.position_encoding = 'reverse'
NetworkArgs.relative_attention_bias = False
NetworkArgs.contextual_features = ('*',)
OptimizerArgs.optimizer = 'adam'
OptimizerArgs.learning_rate = 1e-3
OptimizerArgs.betas = (0.9, 0.999)
RankingArgs.task_type = 'bitmask'
RankingArgs.head_hidden_dims = (64,)
RankingArgs.head_activation = 'relu'
RetrievalArgs.num_negatives = 0
RetrievalArgs.num_in_batch_negatives = 16
RetrievalArgs.eval_top_k = (10,)
"""


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _write(tmp_path, text, name="c.gin"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _bound_keys(text):
    return {re.sub(r"^[\w]+/", "", line.split("=", 1)[0].strip()) for line in text.splitlines() if "=" in line}


def test_the_test_files_bind_every_example_field():
    bound = _bound_keys(EVERY_MAIN_FIELD) | _bound_keys(EVERY_BENCHMARK_FIELD) | {f"EmbeddingArgs.{n}" for n in (
            "feature_names", "table_name", "item_vocab_size_or_capacity", "sharding_type")}
    assert bound == {f.key for f in EXAMPLE_FIELDS}


def test_every_main_field_parses_and_maps_onto_ours(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parse_gin([_write(tmp_path, EVERY_MAIN_FIELD)])
    # Every field is bound: no example default is left to warn about.
    assert not [w for w in caught if issubclass(w.category, ExampleDefaultWarning)]
    t, d, n, o, r, k = args.trainer, args.dataset, args.network, args.optimizer, args.retrieval, args.ranking
    assert (d.batch_size, d.eval_batch_size) == (12, 20)  # per GPU x tensor_model_parallel_size
    assert (t.eval_interval_steps, t.eval_every_epochs, t.log_interval_steps) == (7, 0, 3)
    assert (t.max_steps, t.eval_max_batches, t.seed, t.run_dir) == (40, 5, 99, "runs/every_field")
    assert (t.checkpoint_interval_steps, t.save_final_checkpoint, t.bf16) == (20, False, True)
    assert d.balance_workload and d.shuffle
    assert (d.dataset_name, d.dataset_dir, d.max_seqlen, d.num_candidates) == \
        ("kuairand-1k", os.path.join("prepared", "kuairand-1k"), 64, 5)
    assert (n.num_layers, n.hidden_dim, n.num_heads, n.qk_dim, n.v_dim) == (3, 48, 2, 24, 24)
    assert (n.dropout, n.input_dropout, n.layer_norm_eps, n.scaling_seqlen) == (0.1, 0.1, 1e-4, 300)
    assert (n.position_encoding, n.relative_attention_bias) == ("reverse", False)
    assert (o.optimizer, o.learning_rate, tuple(o.betas), o.eps) == ("sgd", 0.01, (0.8, 0.95), 1e-7)
    assert args.parallelism.tensor_model_parallel_size == 2
    assert (k.task_type, tuple(k.head_hidden_dims), tuple(k.task_names)) == \
        ("bitmask", (256, 64), ("click", "like", "follow", "comment"))
    assert (k.head_activation, k.head_bias, tuple(k.eval_metrics)) == ("gelu", True, ("AUC",))
    assert (r.num_negatives, r.num_in_batch_negatives, tuple(r.eval_top_k)) == (0, 32, (5, 50))


BENCHMARK_RUN = ["TrainerArgs.train_batch_size=4", "TrainerArgs.eval_batch_size=4", "TrainerArgs.max_train_iters=2",
                 "TrainerArgs.max_eval_iters=1"]


def test_every_benchmark_field_parses_onto_a_synthetic_dataset(tmp_path):
    # ranking (RankingArgs bound): a dynamic item table; the same config as retrieval would score its rows as items
    args = parse_gin([_write(tmp_path, EVERY_BENCHMARK_FIELD)],
                     BENCHMARK_RUN + ["RankingArgs.prediction_head_arch=[8, 8]", "RankingArgs.num_tasks=8"])
    d, options = args.dataset, args.dataset.synthetic_options
    assert (d.dataset_name, d.max_seqlen, d.num_candidates, options["num_users"]) == ("synthetic", 99, 1, 80)
    assert (options["length_distribution"], options["length_alpha"], options["zipf_exponent"]) == ("zipf", 1.3, 0.0)
    assert (args.embeddings.dynamic_tables, args.embeddings.item_vocab_size) == ({"item": "lfu"}, 100000)
    gin.clear_config()
    with pytest.raises(NotSupportedYetError, match="DynamicEmbeddingArgs for the item table"):
        parse_gin([_write(tmp_path, EVERY_BENCHMARK_FIELD)], BENCHMARK_RUN)


@pytest.mark.parametrize("old, new, field", [
    ("items/RandomDistribution.dist_type = 'uniform'", "items/RandomDistribution.dist_type = 'poisson'",
     "RandomDistribution.dist_type"),
    ("item_table/DynamicEmbeddingArgs.evict_strategy = 'lfu'", "item_table/DynamicEmbeddingArgs.evict_strategy = 'x'",
     "DynamicEmbeddingArgs.evict_strategy"),
    ("action_table/EmbeddingArgs.sharding_type = 'data_parallel'", "", "EmbeddingArgs.sharding_type"),
    ("seq/FeatureArgs.max_sequence_length = 100", "seq/FeatureArgs.max_sequence_length = 0",
     "FeatureArgs.max_sequence_length"),
])
def test_benchmark_objects_are_checked_before_the_not_supported_error(tmp_path, old, new, field):
    text = EVERY_BENCHMARK_FIELD.replace(old, new)
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        parse_gin([_write(tmp_path, text)])
    assert not isinstance(info.value, NotSupportedYetError)


@pytest.mark.parametrize("binding, field", [
    ("NetworkArgs.num_position_buckets=100", "NetworkArgs.num_position_buckets"),
    ("NetworkArgs.scaling_seqlen=-1", "NetworkArgs.scaling_seqlen"),
    ("NetworkArgs.embedding_backend='dynamicemb'", "NetworkArgs.embedding_backend"),
    ("RankingArgs.eval_metrics=('NDCG',)", "RankingArgs.eval_metrics"),
    ("RankingArgs.eval_metrics=('AUC', 'F1Score')", "RankingArgs.eval_metrics"),
])
def test_values_we_cannot_reproduce_yet_are_named_errors(tmp_path, binding, field):
    with pytest.raises(NotSupportedYetError, match=re.escape(field) + ".*not supported yet"):
        parse_gin([_write(tmp_path, EVERY_MAIN_FIELD)], [binding])


@pytest.mark.parametrize("layernorm, silu", [(False, False), (True, False), (False, True), (True, True)])
def test_the_example_s_layernorm_and_silu_recompute_set_ours(tmp_path, layernorm, silu):
    args = parse_gin([_write(tmp_path, EVERY_MAIN_FIELD)], ["TensorModelParallelArgs.tensor_model_parallel_size=1",
                                                            f"NetworkArgs.recompute_input_layernorm={layernorm}",
                                                            f"NetworkArgs.recompute_input_silu={silu}"])
    assert (args.network.recompute_input_norm, args.network.recompute_silu) == (layernorm, silu)
    # Unbound, the example's default (False) holds.
    args = parse_gin([], ["TrainerArgs.log_interval=5"])
    assert (args.network.recompute_input_norm, args.network.recompute_silu) == (False, False)


@pytest.mark.parametrize("field", ["NetworkArgs.recompute_input_layernorm", "NetworkArgs.recompute_input_silu"])
def test_the_example_s_layernorm_and_silu_recompute_under_tensor_parallelism_are_not_supported_yet(tmp_path, field):
    with pytest.raises(NotSupportedYetError, match=re.escape(field) + "=True with TensorModelParallelArgs"
                       r"\.tensor_model_parallel_size=2 is not supported yet"):
        parse_gin([_write(tmp_path, EVERY_MAIN_FIELD)],
                  [f"{field}=True", "TensorModelParallelArgs.tensor_model_parallel_size=2"])


@pytest.mark.parametrize("example, ours", [
    ("TrainerArgs.train_batch_size=8", "DatasetArgs.batch_size=8"),
    ("TrainerArgs.eval_batch_size=8", "DatasetArgs.eval_batch_size=8"),
    ("NetworkArgs.hidden_size=64", "NetworkArgs.hidden_dim=64"),
    ("NetworkArgs.kv_channels=16", "NetworkArgs.v_dim=16"),
    ("DatasetArgs.dataset_path='root'", "DatasetArgs.dataset_dir='root/x'"),
    ("OptimizerArgs.adam_beta2=0.9", "OptimizerArgs.betas=(0.9, 0.9)"),
    ("TensorModelParallelArgs.tensor_model_parallel_size=1", "ParallelismArgs.tensor_model_parallel_size=1"),
    ("RetrievalArgs.num_negatives=8", "RetrievalArgs.num_in_batch_negatives=8"),
    ("NetworkArgs.recompute_input_layernorm=True", "NetworkArgs.recompute_input_norm=True"),
    ("NetworkArgs.recompute_input_silu=False", "NetworkArgs.recompute_silu=True"),
])
def test_an_example_name_and_ours_for_one_setting_is_an_error_naming_both(example, ours):
    # TrainerArgs.log_interval (a name only the example has) puts the config in the example's style, where
    # RetrievalArgs.num_negatives means in-batch negatives.
    with pytest.raises(ValueError) as info:
        parse_gin([], ["TrainerArgs.log_interval=5", example, ours])
    for binding in (example, ours):
        assert binding.split("=")[0] in str(info.value)


@pytest.mark.parametrize("binding, field", [
    ("NetworkArgs.kernel_backend='cuda'", "NetworkArgs.kernel_backend"),
    ("NetworkArgs.dtype_str='float32'", "NetworkArgs.dtype_str"),
    ("TrainerArgs.pipeline_type='async'", "TrainerArgs.pipeline_type"),
    ("OptimizerArgs.optimizer_str='lamb'", "OptimizerArgs.optimizer_str"),
    ("DatasetArgs.dataset_name='ml-100k'", "DatasetArgs.dataset_name"),
    ("RetrievalArgs.eval_metrics=('HR@0',)", "RetrievalArgs.eval_metrics"),
    ("TrainerArgs.train_batch_size='8'", "TrainerArgs.train_batch_size"),
    ("RankingArgs.prediction_head_arch=[512, 3]", "RankingArgs.num_tasks"),
])
def test_bad_example_values_are_named(tmp_path, binding, field):
    with pytest.raises((ValueError, TypeError), match=re.escape(field)) as info:
        parse_gin([_write(tmp_path, EVERY_MAIN_FIELD)], [binding])
    assert not isinstance(info.value, NotSupportedYetError)


@pytest.mark.parametrize("binding", ["TrainerArgs.train_batch_sizes=8", "NetworkArgs.hidden=8",
                                     "TensorModelParallelArgs.size=2", "BenchmarkDatasetArgs.features=[]"])
def test_an_unknown_field_stays_an_error(binding):
    name = binding.split("=")[0].split(".")[1]
    with pytest.raises(ValueError, match=f"doesn't have a parameter named '{name}'"):
        parse_gin([], [binding])


def test_an_example_config_and_ours_of_one_model_parse_to_the_same_args(tmp_path):
    example = parse_gin([_write(tmp_path, EXAMPLE_STYLE, "example.gin")])
    gin.clear_config()
    ours = parse_gin([_write(tmp_path, OUR_STYLE, "ours.gin")])
    assert example.to_dict() == ours.to_dict()


def test_example_defaults_apply_to_unbound_example_fields():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parse_gin([], ["NetworkArgs.hidden_size=64", "DatasetArgs.dataset_name='ml-1m'",
                              "DatasetArgs.max_history_seqlen=5000"])
    assert tuple(args.optimizer.betas) == (0.9, 0.999) and args.network.layer_norm_eps == 1e-5
    assert (args.network.dropout, args.dataset.shuffle, args.trainer.max_epochs) == (0.2, False, 1)
    assert args.dataset.dataset_dir == os.path.join("data", "ml-1m")
    assert (args.trainer.checkpoint_interval_steps, args.trainer.save_final_checkpoint) == (-1, False)
    warned = " ".join(str(w.message) for w in caught if issubclass(w.category, ExampleDefaultWarning))
    # Unbound defaults we cannot reproduce are said out loud, not applied silently.
    assert "NetworkArgs.scaling_seqlen" in warned and "NetworkArgs.num_position_buckets" in warned


def test_our_style_keeps_our_meaning_of_shared_names():
    args = parse_gin([], ["RetrievalArgs.num_negatives=64", "DatasetArgs.dataset_name='ml-1m'"])
    assert (args.retrieval.num_negatives, args.retrieval.num_in_batch_negatives) == (64, 0)
    assert args.dataset.shuffle and tuple(args.optimizer.betas) == (0.9, 0.98)


def test_dataset_path_holding_a_prepared_dataset_is_used_as_it_is(tmp_path):
    (tmp_path / "metadata.json").write_text("{}")
    args = parse_gin([], ["DatasetArgs.dataset_name='ml-1m'", f"DatasetArgs.dataset_path={str(tmp_path)!r}"])
    assert args.dataset.dataset_dir == str(tmp_path)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "training", "configs", "*.gin"))),
                         ids=os.path.basename)
def test_the_example_command_lines_parse(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    name = os.path.basename(path)
    task = "retrieval" if "retrieval" in name else "ranking"
    script = f"./training/pretrain_gr_{task}.py"
    assert os.path.isfile(script)
    options = build_parser(task).parse_args(["--gin-config-file", f"./training/configs/{name}"])
    args = parse_gin(options.gin_config_file, options.gin_param)
    assert args.dataset.dataset_dir == os.path.join("data", args.dataset.dataset_name)
    assert args.trainer.run_dir == os.path.join("runs", name[:-4])


def test_the_migration_page_holds_the_generated_table():
    with open(os.path.join(ROOT, "docs", "migrating.md")) as f:
        assert example_field_table() in f.read()
