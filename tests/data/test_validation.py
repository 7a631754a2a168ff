"""ProcessedData.open validates a processed directory once, naming the file (and row) that is wrong."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hstu.data import DataFormatError, ProcessedData, SequenceDataset, compute_stats
from hstu.data.loader import ranges_to_positions

from .test_prepare import ROOT


@pytest.fixture
def dataset(tmp_path, synthetic_dir):
    out = tmp_path / "data"
    shutil.copytree(synthetic_dir, out)
    return out


def edit_column(directory, name, edit, dtype=None):
    values = np.load(directory / f"{name}.npy")
    values = edit(values.copy())
    np.save(directory / f"{name}.npy", values if dtype is None else values.astype(dtype))


def edit_metadata(directory, edit):
    path = directory / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


def assert_rejected(directory, file, *words):
    with pytest.raises(DataFormatError) as info:
        ProcessedData.open(directory)
    message = str(info.value)
    assert message.startswith(str(directory / file) + ":"), message
    for word in words:
        assert word in message, message
    return message


def test_valid_dataset_opens(dataset):
    data = ProcessedData.open(dataset)
    assert data.num_users == 400 and len(data.item) == data.offsets[-1]


def _swap_two_offsets(offsets):
    offsets[10], offsets[11] = offsets[11], offsets[10]
    return offsets


def _shorten_last(offsets):
    offsets[-1] -= 1
    return offsets


def test_non_monotone_offsets_name_offsets_npy(dataset):
    # Unchecked, this opens and the stats report a negative sequence length.
    edit_column(dataset, "offsets", _swap_two_offsets)
    assert_rejected(dataset, "offsets.npy", "decreases at user 10")
    with pytest.raises(DataFormatError, match="offsets.npy"):
        compute_stats(dataset)


def test_offsets_ending_early_name_offsets_npy(dataset):
    edit_column(dataset, "offsets", _shorten_last)
    assert_rejected(dataset, "offsets.npy", "ends at")


def test_offsets_not_starting_at_zero(dataset):
    edit_column(dataset, "offsets", lambda o: o + 1)
    assert_rejected(dataset, "offsets.npy", "start with 0")


def _item_out_of_range(item):
    item[123] = 10**6
    return item


def test_item_id_out_of_range_names_item_npy_and_row(dataset):
    edit_column(dataset, "item", _item_out_of_range)
    assert_rejected(dataset, "item.npy", "row 123", "1000000", "outside [0, ")


def _negative_first(values):
    values[0] = -1
    return values


def test_negative_item_id(dataset):
    edit_column(dataset, "item", _negative_first)
    assert_rejected(dataset, "item.npy", "row 0")


def _action_too_large(action):
    action[7] = 5
    return action


def test_action_outside_its_vocabulary(dataset):
    edit_column(dataset, "action", _action_too_large)
    assert_rejected(dataset, "action.npy", "row 7", "action 5 outside [0, 5)")


def test_contextual_feature_outside_its_vocabulary(dataset):
    edit_column(dataset, "activity_level", _negative_first)
    assert_rejected(dataset, "activity_level.npy", "row 0")


def test_wrong_dtype_and_shape(dataset):
    edit_column(dataset, "timestamp", lambda t: t, dtype=np.int32)
    assert_rejected(dataset, "timestamp.npy", "1-D int64", "int32")


def test_two_dimensional_column(dataset):
    edit_column(dataset, "action", lambda a: a.reshape(-1, 1))
    assert_rejected(dataset, "action.npy", "1-D int64")


def test_truncated_column_file(dataset):
    path = dataset / "item.npy"
    path.write_bytes(path.read_bytes()[:-8])
    assert_rejected(dataset, "item.npy", "not a readable .npy file")


def test_user_column_with_wrong_length(dataset):
    edit_column(dataset, "activity_level", lambda a: a[:-1])
    assert_rejected(dataset, "activity_level.npy", "399 rows for 400 users")


def test_missing_column_file(dataset):
    os.remove(dataset / "action.npy")
    assert_rejected(dataset, "action.npy", "missing")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.pop("num_items"), "'num_items' must be an integer"),
        (lambda m: m.update(num_users="400"), "'num_users' must be an integer"),
        (lambda m: m.update(num_interactions=7), "num_interactions = 7"),
        (lambda m: m.update(num_items=m["num_items"] + 5), "largest id in item.npy"),
        (lambda m: m.update(num_distinct_items=1), "num_distinct_items = 1"),
        (lambda m: m.pop("action"), "'action'"),
        (lambda m: m["action"].update(vocab_size=True), "'action.vocab_size' must be an integer"),
        (lambda m: m["contextual_features"][1].update(name="../offsets"), "unique identifier"),
        (lambda m: m["contextual_features"][1].update(vocab_size=2, vocabulary=None), "row"),
        (lambda m: m.update(format_version=2), "format_version"),
    ],
)
def test_metadata_fields_present_typed_and_consistent(dataset, edit, words):
    edit_metadata(dataset, edit)
    with pytest.raises(DataFormatError, match="metadata.json|activity_level.npy") as info:
        ProcessedData.open(dataset)
    assert words in str(info.value)


def test_metadata_not_json(dataset):
    (dataset / "metadata.json").write_bytes(b'{"format_version": 1,')
    assert_rejected(dataset, "metadata.json", "not valid JSON")


def test_corruption_after_a_successful_open_is_still_caught(dataset):
    ProcessedData.open(dataset)  # validated and remembered
    edit_column(dataset, "item", _item_out_of_range)
    assert_rejected(dataset, "item.npy", "row 123")


def test_loader_and_cli_report_the_corrupted_file(dataset):
    edit_column(dataset, "offsets", _swap_two_offsets)
    with pytest.raises(DataFormatError, match="offsets.npy"):
        SequenceDataset(dataset, "train")
    result = subprocess.run([sys.executable, "-m", "hstu.data", "stats", str(dataset)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: {dataset / 'offsets.npy'}: decreases") and "Traceback" not in result.stderr


def test_positions_past_int32_do_not_overflow():
    starts = np.array([2**31 - 2, 5], dtype=np.int32)
    lengths = np.array([4, 2], dtype=np.int32)
    assert ranges_to_positions(starts, lengths).tolist() == [2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 5, 6]


def _wrap_around(offsets):
    # Subtracting these neighbours overflows int64 into a positive step.
    offsets[1], offsets[2] = 2**63 - 1, -(2**63)
    return offsets


def test_offsets_whose_difference_overflows_are_still_decreasing(dataset):
    edit_column(dataset, "offsets", _wrap_around)
    assert_rejected(dataset, "offsets.npy", "decreases at user 1")
