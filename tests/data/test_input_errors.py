"""Bad options and out-of-range raw ids: a named ValueError/TypeError/DataFormatError, never a traceback or a giant
allocation."""

import os

import numpy as np
import pytest

from hstu.data import DataFormatError, ProcessedData, generate
from hstu.data.prepare import PrepareOptions, prepare
from hstu.data.processed import ID_LIMIT

from .conftest import QUIET, copy_raw
from .test_prepare import run_cli


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"num_users": 0}, "num_users (--num-users)"),
        ({"num_users": -5}, "num_users (--num-users)"),
        ({"num_items": 0}, "num_items (--num-items)"),
        ({"num_items": -1}, "num_items (--num-items)"),
        ({"num_items": ID_LIMIT}, "num_items (--num-items)"),
        ({"num_topics": 0}, "num_topics (--num-topics)"),
        ({"min_length": 30, "max_length": 20}, "max_length (--max-length)"),
        ({"min_length": 0}, "min_length (--min-length)"),
        ({"mean_length": 0.0}, "mean_length (--mean-length)"),
        ({"mean_length": float("inf")}, "mean_length (--mean-length)"),
        ({"transition_prob": 1.5}, "transition_prob (--transition-prob)"),
        ({"transition_prob": float("nan")}, "transition_prob (--transition-prob)"),
        ({"topic_drift": -0.1}, "topic_drift (--topic-drift)"),
        ({"seed": -1}, "seed (--seed)"),
        ({"length_sigma": 0.0}, "length_sigma"),
        ({"time_span_days": 0.0}, "time_span_days"),
        ({"length_distribution": "gaussian"}, "length_distribution"),
        ({"actions": "stars"}, "actions"),
    ],
)
def test_invalid_synthetic_config_names_the_option(overrides, words):
    with pytest.raises(ValueError) as info:
        generate(**overrides)
    assert words in str(info.value)


@pytest.mark.parametrize("overrides", [{"num_users": "10"}, {"num_items": 2.5}, {"mean_length": None}, {"seed": True}])
def test_wrongly_typed_synthetic_config_is_a_type_error(overrides):
    with pytest.raises(TypeError, match=next(iter(overrides))):
        generate(**overrides)


def test_cli_num_users_zero_is_a_one_line_error(tmp_path):
    result = run_cli("prepare", "synthetic", "--out-dir", str(tmp_path / "out"), "--num-users", "0", "--no-progress")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: num_users (--num-users) must be in 1..")
    assert os.listdir(tmp_path) == []


def _append_rating(raw, line: bytes):
    with open(os.path.join(raw, "ratings.dat"), "ab") as f:
        f.write(line + b"\n")


@pytest.mark.parametrize("item", [2**62, ID_LIMIT])
def test_huge_item_id_without_remap_suggests_remap(tmp_path, item):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _append_rating(raw, b"1::%d::5::978300760" % item)
    with pytest.raises(DataFormatError) as info:
        prepare("ml-1m", raw, str(tmp_path / "out"), QUIET)
    message = str(info.value)
    assert message.startswith(os.path.join(raw, "ratings.dat") + ":14:") and "--remap-items" in message
    assert not (tmp_path / "out").exists()


def test_huge_item_ids_with_remap_are_renumbered(tmp_path):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _append_rating(raw, b"5::%d::5::978300760" % 2**40)
    _append_rating(raw, b"5::%d::4::978300761" % (2**52 + 1))
    prepare("ml-1m", raw, str(tmp_path / "out"), PrepareOptions(remap_items=True, show_progress=False))
    data = ProcessedData.open(tmp_path / "out")
    raw_ids = np.load(tmp_path / "out" / "item_raw_id.npy")
    assert data.metadata["num_items"] == 14  # 11 fixture items + 2 huge ones as 1..13, 0 unused
    assert raw_ids[data.item].tolist() == [3408, 1193, 914, 661, 2355, 1357, 1193, 3068, 3421, 2333, 3952, 2987, 1193,
                                           2**40, 2**52 + 1]


def test_item_id_beyond_exact_float_parsing_is_rejected(tmp_path):
    # 2**53 + 1 would be read as 2**53: refused rather than silently merged with another item.
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _append_rating(raw, b"5::%d::4::978300761" % (2**53 + 1))
    with pytest.raises(DataFormatError, match="ratings.dat:14: .*too large"):
        prepare("ml-1m", raw, str(tmp_path / "out"), PrepareOptions(remap_items=True, show_progress=False))


def test_huge_user_id_is_rejected_not_allocated(tmp_path):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _append_rating(raw, b"%d::661::5::978300760" % 2**40)
    with pytest.raises(DataFormatError, match="ratings.dat:14: column 'user': id 1099511627776 is too large"):
        prepare("ml-1m", raw, str(tmp_path / "out"), QUIET)


@pytest.mark.parametrize("name, line", [("users.dat", b"-3::F::1::10::48067"), ("movies.dat", b"-7::Heat (1995)::Action")])
def test_negative_ids_in_ml1m_side_files(tmp_path, name, line):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    with open(os.path.join(raw, name), "ab") as f:
        f.write(line + b"\n")
    with pytest.raises(DataFormatError, match=f"{name}:[0-9]+: .*not a non-negative integer"):
        prepare("ml-1m", raw, str(tmp_path / "out"), QUIET)


@pytest.mark.parametrize("option, flag", [("block_bytes", "--block-mb"), ("sort_buffer_rows", "--sort-buffer-rows")])
def test_zero_buffer_options_name_the_flag(tmp_path, option, flag):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    with pytest.raises(ValueError, match=flag):
        prepare("ml-1m", raw, str(tmp_path / "out"), PrepareOptions(show_progress=False, **{option: 0}))


def test_missing_raw_dir_is_named(tmp_path):
    with pytest.raises(DataFormatError, match="--raw-dir is not a directory"):
        prepare("ml-20m", str(tmp_path / "nowhere"), str(tmp_path / "out"), QUIET)


@pytest.mark.parametrize("line", [b"#5::1193::5::978300760", b"5::661::3::978300761#99"])
def test_hash_is_not_a_comment_marker(tmp_path, line):
    # Treated as comments (numpy.loadtxt's default), the first row would vanish and the second be cut, silently.
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _append_rating(raw, line)
    with pytest.raises(DataFormatError, match="ratings.dat:14: column '(user|time)': .* is not a number"):
        prepare("ml-1m", raw, str(tmp_path / "out"), QUIET)
