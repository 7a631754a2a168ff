"""Training-side data adapters, the LR schedule, and the checks of a configuration against its task and data."""

import json
import re
import shutil
from types import SimpleNamespace

import gin
import numpy as np
import pytest

from hstu.data.loader import SequenceDataset
from hstu.training.config import OptimizerArgs, parse_gin
from hstu.training.tasks import _extend_training_through_validation
from hstu.training.trainer import lr_multiplier


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from hstu.data.synthetic import write_synthetic

    path = tmp_path_factory.mktemp("d") / "synthetic"
    write_synthetic(str(path), show_progress=False, num_users=50, num_items=100, num_topics=4, mean_length=15,
                    min_length=3, max_length=40, seed=1)
    return str(path)


@pytest.mark.parametrize("truncate", ["recent", "oldest"])
def test_train_through_validation_ends_before_the_test_item(data_dir, truncate):
    max_seqlen = 10
    train = _extend_training_through_validation(SequenceDataset(data_dir, "valid", "retrieval", max_seqlen,
                                                                truncate=truncate))
    test = SequenceDataset(data_dir, "test", "retrieval", 10_000)
    data = train.data
    for k in range(len(train)):
        sample = train[k]
        user = int(train.user[k])
        end = data.offsets[user + 1] - 1  # the test item's row
        full = np.asarray(data.item[data.offsets[user] : end])
        expected = full[-max_seqlen:] if truncate == "recent" else full[:max_seqlen]
        assert sample["item"].tolist() == expected.tolist()
        assert "target_item" not in sample and sample["num_candidates"] == 0
    assert len(train) == len(test)


def test_lr_schedule():
    args = OptimizerArgs(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, args) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, args) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, args) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, args) == pytest.approx(0.55)
    assert lr_multiplier(110, 110, args) == pytest.approx(0.1)
    assert lr_multiplier(50, 110, OptimizerArgs()) == 1.0
    assert lr_multiplier(60, 110, OptimizerArgs(warmup_steps=10, decay="linear")) == pytest.approx(0.5)


# ---- configuration against the task and the dataset --------------------------------------------------------------
CTX = SimpleNamespace(is_main=True, barrier=lambda: None)  # what a task needs of the parallel context to be built


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Tiny synthetic datasets with rating labels (5 classes) and with 8-bit action masks."""
    from hstu.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("labelled")
    for kind in ("rating", "bitmask"):
        write_synthetic(str(root / kind), show_progress=False, num_users=40, num_items=60, num_topics=4, mean_length=12,
                        min_length=4, max_length=30, seed=2, actions=kind)
    return root


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _args(data_dir, *bindings, candidates=3):
    return parse_gin([], [f"DatasetArgs.dataset_dir={str(data_dir)!r}", f"DatasetArgs.num_candidates={candidates}",
                          *bindings])


@pytest.mark.parametrize("kind,bindings,message", [
    ("rating", ["RankingArgs.task_type='bitmask'"], "RankingArgs.task_type='bitmask' does not match the data: "
                                                    "the dataset's action kind is 'rating'"),
    ("bitmask", ["RankingArgs.task_type='rating'"], "RankingArgs.task_type='rating' does not match the data: "
                                                    "the dataset's action kind is 'bitmask'"),
    ("bitmask", ["RankingArgs.num_classes=5"], "RankingArgs.num_classes=5 applies to rating labels, but the "
                                               "dataset's action kind is 'bitmask'"),
    ("bitmask", ["RankingArgs.task_names=['t0', 't1', 't2', 't3', 't4', 't5', 't6', 't7', 't8']"],
     "RankingArgs.task_names has 9 tasks"),
    ("bitmask", ["RankingArgs.task_weights=[1.0, 2.0]"], "RankingArgs.task_weights has 2 weights for 8 tasks"),
    ("rating", ["RankingArgs.num_classes=10"], "RankingArgs.num_classes=10 does not match the data: the dataset's "
                                               "action kind is 'rating'"),
    ("rating", ["RankingArgs.positive_rating_threshold=5"], "RankingArgs.positive_rating_threshold=5 leaves no "
                                                            "positive"),
    ("rating", ["RankingArgs.task_names=['click']"], "RankingArgs.task_names=['click'] applies to bitmask tasks"),
])
def test_ranking_config_that_does_not_match_the_data_stops_at_setup(labelled, kind, bindings, message):
    from hstu.training.tasks import RankingTask

    args = _args(labelled / kind, *bindings)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        RankingTask(args, CTX)
    assert str(labelled / kind / "metadata.json") in str(info.value)


def test_mismatch_is_found_from_metadata_alone(labelled):
    from hstu.training.tasks import check_task_config

    with pytest.raises(ValueError, match="RankingArgs.task_type='bitmask'"):
        check_task_config("ranking", _args(labelled / "rating", "RankingArgs.task_type='bitmask'"))
    assert check_task_config("ranking", _args(labelled / "missing")) is None  # nothing prepared yet: config only


@pytest.mark.parametrize("kind,expected", [
    ("rating", ("rating", ["rating_positive"], 5)),
    ("bitmask", ("bitmask", ["click", "like", "follow", "comment", "forward", "hate", "long_view", "profile_enter"], 8)),
])
def test_matching_ranking_configs_still_build(labelled, kind, expected):
    from hstu.training.tasks import RankingTask

    task = RankingTask(_args(labelled / kind), CTX)
    assert (task.task_type, task.task_names, task.num_outputs) == expected
    if kind == "rating":
        assert task.threshold == 3  # the top 40% of 5 classes: 3 and 4


@pytest.mark.parametrize("task,candidates", [("ranking", 0), ("retrieval", 3)])
def test_candidate_count_that_does_not_fit_the_task_is_named(labelled, task, candidates):
    from hstu.training.tasks import TASKS

    with pytest.raises(ValueError, match=f"DatasetArgs.num_candidates must be .* for {task}"):
        TASKS[task](_args(labelled / "rating", candidates=candidates), CTX)


def test_item_vocabulary_smaller_than_the_data_is_named(labelled):
    from hstu.training.tasks import RetrievalTask

    with pytest.raises(ValueError, match=r"EmbeddingArgs.item_vocab_size=5 is smaller .*num_items=\d+"):
        RetrievalTask(_args(labelled / "rating", "EmbeddingArgs.item_vocab_size=5", candidates=0), CTX)


def test_huge_configured_vocabulary_stops_before_allocation(labelled):
    from hstu.training.tasks import RetrievalTask

    args = _args(labelled / "rating", "EmbeddingArgs.item_vocab_size=10_000_000_000_000", candidates=0)
    with pytest.raises(ValueError, match=r"embedding tables need 2,000,000,000,000,000 bytes .*item: "
                                         r"10,000,000,000,000 rows \(EmbeddingArgs.item_vocab_size\)") as info:
        RetrievalTask(args, CTX)
    assert "EmbeddingArgs.max_embedding_bytes" in str(info.value)


def test_huge_item_ids_in_the_data_stop_before_allocation(labelled, tmp_path):
    from hstu.training.tasks import RankingTask

    data = tmp_path / "huge_ids"
    shutil.copytree(labelled / "bitmask", data)
    metadata = json.loads((data / "metadata.json").read_text())
    metadata["num_items"] = 2**40  # e.g. raw 64-bit ids kept as they are
    (data / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"embedding tables need [\d,]+ bytes .*item: 1,099,511,627,776 rows "
                                         r"\(num_items in .*metadata.json\)"):
        RankingTask(_args(data), CTX)


def test_embedding_limit_is_configurable(labelled):
    from hstu.training.tasks import RankingTask

    # 61 item rows + 5 action rows of 50 fp32 values: 13,200 bytes.
    with pytest.raises(ValueError, match=r"need 13,200 bytes .* more than EmbeddingArgs.max_embedding_bytes = 13,199"):
        RankingTask(_args(labelled / "rating", "EmbeddingArgs.max_embedding_bytes=13199"), CTX)
    RankingTask(_args(labelled / "rating", "EmbeddingArgs.max_embedding_bytes=13200"), CTX)


def test_contextual_features_star_takes_every_feature_of_the_dataset_in_its_order():
    from hstu.training.tasks import contextual_feature_names

    available = ["user_id", "gender", "zip_code"]
    assert contextual_feature_names(["*"], available, "m.json") == available
    assert contextual_feature_names(["zip_code"], available, "m.json") == ["zip_code"]
    assert contextual_feature_names([], available, "m.json") == []
    with pytest.raises(ValueError, match="stands alone"):
        contextual_feature_names(["*", "gender"], available, "m.json")
    with pytest.raises(ValueError, match=r"\['age'\] not in the dataset \(m.json has"):
        contextual_feature_names(["age"], available, "m.json")
