"""gin argument groups: every field settable, unknown fields rejected, every shipped config parses; every bad value
(wrong type, out of range, unknown choice, missing include, syntax error) is a TypeError / ValueError naming it."""

import dataclasses
import glob
import os
import re
import typing

import gin
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hstu.training.config import ARG_CLASSES, NetworkArgs, parse_gin

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("cls", ARG_CLASSES, ids=lambda c: c.__name__)
def test_unknown_field_is_an_error(cls):
    with pytest.raises(ValueError, match="doesn't have a parameter named 'no_such_field'"):
        parse_gin([], [f"{cls.__name__}.no_such_field=1"])


def test_every_field_is_settable():
    bindings = []
    for cls in ARG_CLASSES:
        defaults = cls()
        for field in dataclasses.fields(cls):
            bindings.append(f"{cls.__name__}.{field.name}={getattr(defaults, field.name)!r}")
    parse_gin([], bindings)  # gin rejects a binding for any parameter the constructor does not take


def test_bindings_reach_the_dataclasses():
    args = parse_gin([], ["TrainerArgs.max_epochs=7", "OptimizerArgs.betas=(0.8, 0.9)",
                          "NetworkArgs.contextual_features=['user_id']", "DatasetArgs.dataset_dir='x/y'",
                          "ParallelismArgs.embedding_sharding={'item': 'row_wise'}"])
    assert args.trainer.max_epochs == 7
    assert tuple(args.optimizer.betas) == (0.8, 0.9)
    assert list(args.network.contextual_features) == ["user_id"]
    assert args.dataset.dataset_dir == "x/y"
    assert args.parallelism.embedding_sharding == {"item": "row_wise"}


def test_layer_recompute_options_reach_the_dataclass():
    assert (NetworkArgs().recompute_input_norm, NetworkArgs().recompute_silu) == (False, False)
    args = parse_gin([], ["NetworkArgs.recompute_input_norm=True", "NetworkArgs.recompute_silu=True",
                          "NetworkArgs.recompute_layers=[0]"])
    assert (args.network.recompute_input_norm, args.network.recompute_silu) == (True, True)
    assert list(args.network.recompute_layers) == [0]
    with pytest.raises(TypeError, match="NetworkArgs.recompute_silu"):
        parse_gin([], ["NetworkArgs.recompute_silu=1"])


def test_bindings_override_files(tmp_path):
    path = tmp_path / "a.gin"
    path.write_text("TrainerArgs.max_epochs = 3\nTrainerArgs.seed = 5\n")
    args = parse_gin([str(path)], ["TrainerArgs.max_epochs=4"])
    assert (args.trainer.max_epochs, args.trainer.seed) == (4, 5)


def test_malformed_binding_is_an_error():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_gin([], ["TrainerArgs.max_epochs"])


CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.gin")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_parse(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any working directory: includes resolve next to the including file
    args = parse_gin([path])
    assert args.dataset.max_seqlen > 0


def test_required_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    required = {"movielen_retrieval.gin", "movielen_ranking.gin", "synthetic_retrieval.gin", "synthetic_ranking.gin",
                "ml1m_retrieval.gin", "ml20m_retrieval.gin", "ml1m_ranking.gin", "ml20m_ranking.gin",
                "kuairand_pure_ranking.gin", "kuairand_1k_ranking.gin", "kuairand_27k_ranking.gin"}
    assert required <= names, required - names


def test_paper_recipe_in_ml1m_config():
    args = parse_gin([os.path.join(ROOT, "configs", "ml1m_retrieval.gin")])
    n, o, r = args.network, args.optimizer, args.retrieval
    assert (n.num_layers, n.num_heads, n.hidden_dim, n.qk_dim, n.v_dim) == (2, 1, 50, 50, 50)
    assert n.dropout == n.input_dropout == 0.2 and n.relative_attention_bias and n.rab_num_time_buckets == 128
    assert args.dataset.max_seqlen == 200 and args.dataset.batch_size == 128
    assert (r.num_negatives, r.temperature, r.l2_normalize) == (128, 0.05, True)
    assert (o.learning_rate, tuple(o.betas), o.weight_decay) == (1e-3, (0.9, 0.98), 0.0)
    assert args.trainer.max_epochs == 101


# ---- types -------------------------------------------------------------------------------------------------------
def _fields():
    for cls in ARG_CLASSES:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            yield cls.__name__, field.name, hints[field.name]


def _accepts(hint, python_type):
    args = typing.get_args(hint)
    return hint is python_type or python_type in args


@pytest.mark.parametrize("binding,message", [
    ('TrainerArgs.max_epochs="3"', "TrainerArgs.max_epochs must be an int, got str '3'"),
    ("TrainerArgs.max_epochs=True", "TrainerArgs.max_epochs must be an int, got bool True"),
    ("TrainerArgs.max_steps='10'", "TrainerArgs.max_steps must be None or an int, got str '10'"),
    ("TrainerArgs.progress_bar=1", "TrainerArgs.progress_bar must be a bool"),
    ("OptimizerArgs.learning_rate='1e-3'", "OptimizerArgs.learning_rate must be a float, got str '1e-3'"),
    ("OptimizerArgs.betas=(0.9, '0.98')", "OptimizerArgs.betas must be a list or tuple of float"),
    ("NetworkArgs.contextual_features='user_id'", "NetworkArgs.contextual_features must be a list or tuple"),
    ("DatasetArgs.dataset_dir=3", "DatasetArgs.dataset_dir must be a string, got int 3"),
    ("DatasetArgs.synthetic_options=[1]", "DatasetArgs.synthetic_options must be a dict"),
])
def test_wrong_types_are_type_errors_naming_the_field(binding, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        parse_gin([], [binding])


def test_string_number_in_a_gin_file_is_a_type_error(tmp_path):
    path = tmp_path / "lr.gin"
    path.write_text('OptimizerArgs.learning_rate = "1e-3"\n')
    with pytest.raises(TypeError, match=r"OptimizerArgs.learning_rate must be a float, got str '1e-3' \(write numbers"):
        parse_gin([str(path)])


def test_every_non_string_field_rejects_a_quoted_number():
    for cls, name, hint in _fields():
        if _accepts(hint, str) or hint is typing.Any:
            continue
        with pytest.raises(TypeError, match=re.escape(f"{cls}.{name} must be")):
            parse_gin([], [f'{cls}.{name}="1"'])


def test_ints_are_floats_and_bools_are_not_ints():
    args = parse_gin([], ["OptimizerArgs.learning_rate=1", "NetworkArgs.alpha=2"])
    assert type(args.optimizer.learning_rate) is float and args.optimizer.learning_rate == 1.0
    assert type(args.network.alpha) is float
    for cls, name, hint in _fields():
        if _accepts(hint, int) and not _accepts(hint, bool):
            with pytest.raises(TypeError, match=re.escape(f"{cls}.{name}")):
                parse_gin([], [f"{cls}.{name}=True"])


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(-10, 10, allow_nan=False),
                    st.text(max_size=4), st.lists(st.integers(-2, 5), max_size=3),
                    st.tuples(st.floats(0, 1), st.floats(0, 1)), st.dictionaries(st.text(max_size=3), st.integers()))


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(list(_fields())), value=_VALUES)
def test_any_value_is_accepted_with_its_type_or_named(field, value):
    cls, name, hint = field
    try:
        args = parse_gin([], [f"{cls}.{name}={value!r}"])
    except (TypeError, ValueError) as e:
        assert name in str(e), str(e)
        return
    group = next(getattr(args, f.name) for f in dataclasses.fields(args) if type(getattr(args, f.name)).__name__ == cls)
    got = getattr(group, name)
    if got is not None and hint in (int, float, bool, str):
        assert type(got) is hint, (cls, name, got)


# ---- values ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("binding,field,allowed", [
    ("TrainerArgs.eval_split='train'", "TrainerArgs.eval_split", "'valid', 'test'"),
    ("TrainerArgs.device='gpu'", "TrainerArgs.device", "'auto', 'cpu', 'cuda'"),
    ("DatasetArgs.split_strategy='random'", "DatasetArgs.split_strategy", "'leave_one_out'"),
    ("DatasetArgs.truncate='middle'", "DatasetArgs.truncate", "'recent', 'oldest'"),
    ("NetworkArgs.position_encoding='rope'", "NetworkArgs.position_encoding", "'absolute', 'reverse', 'none'"),
    ("NetworkArgs.rab_time_reference='key'", "NetworkArgs.rab_time_reference", "'query', 'next'"),
    ("OptimizerArgs.optimizer='adagrad'", "OptimizerArgs.optimizer", "'adam', 'adamw', 'sgd'"),
    ("OptimizerArgs.decay='step'", "OptimizerArgs.decay", "'constant', 'linear', 'cosine'"),
    ("RankingArgs.task_type='multiclass'", "RankingArgs.task_type", "'bitmask', 'rating'"),
])
def test_unknown_choices_name_the_field_and_the_allowed_values(binding, field, allowed):
    with pytest.raises(ValueError, match=re.escape(field) + ".*" + re.escape(allowed)):
        parse_gin([], [binding])


@pytest.mark.parametrize("binding", [
    "NetworkArgs.num_heads=0", "NetworkArgs.hidden_dim=0", "NetworkArgs.qk_dim=-1", "NetworkArgs.v_dim=0",
    "NetworkArgs.num_layers=0", "NetworkArgs.dropout=-0.1", "NetworkArgs.dropout=1.0", "NetworkArgs.input_dropout=1",
    "NetworkArgs.attention_dropout=1.5", "NetworkArgs.layer_norm_eps=0.0", "DatasetArgs.max_seqlen=0",
    "DatasetArgs.batch_size=0", "DatasetArgs.eval_batch_size=-4", "DatasetArgs.train_ratio=1.0",
    "OptimizerArgs.learning_rate=0.0", "OptimizerArgs.learning_rate=-1e-3", "OptimizerArgs.learning_rate=1e999",
    "OptimizerArgs.betas=(0.9,)", "OptimizerArgs.betas=(0.9, 1.0)", "OptimizerArgs.eps=0.0",
    "TrainerArgs.log_interval_steps=0", "TrainerArgs.keep_last_checkpoints=0", "TrainerArgs.max_epochs=-1",
    "RetrievalArgs.temperature=0.0", "RetrievalArgs.eval_top_k=()", "RetrievalArgs.eval_top_k=(10, 0)",
    "RankingArgs.head_hidden_dims=(512, 0)", "RankingArgs.num_classes=1", "RankingArgs.task_names=['a', 'a']",
    "EmbeddingArgs.item_vocab_size=0", "EmbeddingArgs.init_std=0.0", "ParallelismArgs.tensor_model_parallel_size=0",
])
def test_out_of_range_values_name_the_field(binding):
    field = binding.split("=")[0]
    with pytest.raises(ValueError, match=re.escape(field) + " must be"):
        parse_gin([], [binding])


@pytest.mark.parametrize("bindings,fields", [
    (["RetrievalArgs.num_negatives=0", "RetrievalArgs.num_in_batch_negatives=0"],
     ["RetrievalArgs.num_negatives", "RetrievalArgs.num_in_batch_negatives"]),
    (["NetworkArgs.num_layers=2", "NetworkArgs.recompute_layers=[2]"], ["NetworkArgs.recompute_layers"]),
    (["RankingArgs.task_names=['a', 'b']", "RankingArgs.task_weights=[1.0]"],
     ["RankingArgs.task_weights", "RankingArgs.task_names"]),
    (["RankingArgs.num_classes=5", "RankingArgs.positive_rating_threshold=5"],
     ["RankingArgs.positive_rating_threshold", "RankingArgs.num_classes"]),
    (["ParallelismArgs.embedding_sharding={'item': 'rows'}"], ["ParallelismArgs", "embedding_sharding"]),
    (["NetworkArgs.recompute_input_norm=True", "ParallelismArgs.tensor_model_parallel_size=2"],
     ["NetworkArgs.recompute_input_norm", "ParallelismArgs.tensor_model_parallel_size"]),
    (["NetworkArgs.recompute_silu=True", "ParallelismArgs.tensor_model_parallel_size=2"],
     ["NetworkArgs.recompute_silu", "ParallelismArgs.tensor_model_parallel_size"]),
])
def test_inconsistent_fields_are_named(bindings, fields):
    with pytest.raises(ValueError) as info:
        parse_gin([], bindings)
    for field in fields:
        assert field in str(info.value)


def test_unknown_configurable_is_named():
    with pytest.raises(ValueError, match="NoSuchArgs"):
        parse_gin([], ["NoSuchArgs.max_epochs=1"])


@pytest.mark.parametrize("binding", ["TrainerArgs.max_epochs=abc", "TrainerArgs.max_epochs=3 4",
                                     "TrainerArgs.max_epochs=(1,"])
def test_unparseable_binding_is_a_value_error_naming_it(binding):
    with pytest.raises(ValueError, match=re.escape(binding)):
        parse_gin([], [binding])


# ---- files and includes ------------------------------------------------------------------------------------------
def test_include_resolves_next_to_the_including_file(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    (sub / "base.gin").write_text("TrainerArgs.max_epochs = 3\nTrainerArgs.seed = 5\n")
    (sub / "child.gin").write_text("include 'base.gin'\nTrainerArgs.seed = 6\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    args = parse_gin([str(sub / "child.gin")])
    assert (args.trainer.max_epochs, args.trainer.seed) == (3, 6)


def test_missing_include_names_both_files(tmp_path):
    child = tmp_path / "child.gin"
    child.write_text("include 'nowhere.gin'\n")
    with pytest.raises(ValueError) as info:
        parse_gin([str(child)])
    message = str(info.value)
    assert str(child) in message and "'nowhere.gin'" in message and str(tmp_path / "nowhere.gin") in message


def test_include_cycle_is_named(tmp_path):
    (tmp_path / "a.gin").write_text("include 'b.gin'\n")
    (tmp_path / "b.gin").write_text("include 'a.gin'\n")
    with pytest.raises(ValueError, match="include cycle: .*a.gin -> .*b.gin -> .*a.gin"):
        parse_gin([str(tmp_path / "a.gin")])


def test_missing_or_broken_file_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nothere.gin"):
        parse_gin([str(tmp_path / "nothere.gin")])
    broken = tmp_path / "broken.gin"
    broken.write_text("TrainerArgs.seed = (1,\n")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        parse_gin([str(broken)])


def test_a_single_path_or_binding_may_be_a_string():
    # a string used to be iterated per character ("gin config file 'c' not found")
    args = parse_gin(os.path.join(ROOT, "configs", "synthetic_retrieval.gin"), "TrainerArgs.max_steps=3")
    assert args.trainer.max_steps == 3 and args.network.hidden_dim == 64


@pytest.mark.parametrize("name", ["e2e_retrieval.gin", "e2e_ranking.gin"])
def test_end_to_end_configs_hold_nvidias_published_setting(name):
    args = parse_gin([os.path.join(ROOT, "configs", name)])
    n = args.network
    assert (n.num_layers, n.hidden_dim, n.num_heads, n.qk_dim, n.v_dim) == (8, 1024, 4, 256, 256)
    assert args.dataset.batch_size == 32 and args.trainer.bf16
    assert args.dataset.synthetic_options["num_items"] == 1_000_000
