"""Training-side data adapters and the LR schedule."""

import numpy as np
import pytest

from hstu.data.loader import SequenceDataset
from hstu.training.config import OptimizerArgs
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
