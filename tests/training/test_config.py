"""gin argument groups: every field settable, unknown fields rejected, every shipped config parses."""

import dataclasses
import glob
import os

import gin
import pytest

from hstu.training.config import ARG_CLASSES, parse_gin

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
def test_shipped_configs_parse(path):
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
