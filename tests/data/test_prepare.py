"""Raw fixture files → processed format: contents, stats, options and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hstu.data import DataFormatError, ProcessedData, compute_stats
from hstu.data.kuairand import category_sort_key
from hstu.data.prepare import PrepareOptions, prepare

from .conftest import QUIET, raw_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Counted by hand from the fixture files.
EXPECTED_STATS = {
    "ml-1m": {"users": 4, "items": 11, "interactions": 13, "seqlen": {"min": 1, "max": 5, "mean": 3.25, "median": 3.5}},
    "ml-20m": {"users": 3, "items": 9, "interactions": 9, "seqlen": {"min": 2, "max": 4, "mean": 3.0, "median": 3.0}},
    "kuairand-pure": {"users": 4, "items": 6, "interactions": 8, "seqlen": {"min": 1, "max": 3, "mean": 2.0, "median": 2.0}},
    "kuairand-1k": {"users": 4, "items": 6, "interactions": 8, "seqlen": {"min": 1, "max": 3, "mean": 2.0, "median": 2.0}},
    "kuairand-27k": {"users": 4, "items": 6, "interactions": 8, "seqlen": {"min": 1, "max": 3, "mean": 2.0, "median": 2.0}},
}


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hstu.data", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("dataset", sorted(EXPECTED_STATS))
def test_stats_match_hand_counts(processed, dataset):
    assert compute_stats(processed(dataset)) == EXPECTED_STATS[dataset]


def test_stats_cli_prints_one_json_object(processed):
    result = run_cli("stats", processed("ml-1m"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == EXPECTED_STATS["ml-1m"]
    assert result.stdout.strip().count("\n") == 0


def test_ml1m_sequences_time_ordered_with_stable_ties(processed):
    data = ProcessedData.open(processed("ml-1m"))
    assert data.user_id.tolist() == [1, 2, 3, 5]
    assert data.offsets.tolist() == [0, 5, 8, 9, 13]
    assert data.item.tolist() == [3408, 1193, 914, 661, 2355, 1357, 1193, 3068, 3421, 2333, 3952, 2987, 1193]
    # Ratings 1..5 → classes 0..4.
    assert data.action.tolist() == [3, 4, 2, 2, 4, 4, 3, 3, 3, 3, 0, 3, 1]
    assert data.timestamp[5] == data.timestamp[6] == 978298709  # tie kept in file order (1357 before 1193)
    meta = data.metadata
    assert meta["num_items"] == 3953 and meta["item_ids"] == "raw"
    assert meta["action"] == {"kind": "rating", "num_classes": 5, "vocab_size": 5, "description": meta["action"]["description"]}
    assert data.contextual["gender"].tolist() == [1, 2, 2, 2]
    assert data.contextual["age"].tolist() == [1, 7, 3, 3]  # codes 1, 56, 25, 25
    assert data.contextual["occupation"].tolist() == [11, 17, 16, 21]  # occupation + 1
    assert [f["name"] for f in meta["contextual_features"]] == ["user_id", "gender", "age", "occupation", "zip_code"]


def test_ml20m_half_star_ratings_become_ten_classes(processed):
    data = ProcessedData.open(processed("ml-20m"))
    assert data.item.tolist() == [29, 47, 32, 2, 62, 70, 3, 24, 1]
    assert data.action.tolist() == [6, 6, 6, 6, 9, 0, 7, 5, 7]
    assert data.metadata["action"]["num_classes"] == 10


@pytest.mark.parametrize("dataset", ["kuairand-pure", "kuairand-1k", "kuairand-27k"])
def test_kuairand_bitmask_and_user_features(processed, dataset):
    data = ProcessedData.open(processed(dataset))
    assert data.offsets.tolist() == [0, 3, 5, 7, 8]
    assert data.item.tolist() == [100, 101, 104, 100, 102, 103, 100, 105]
    # click 1, like 2, follow 4, comment 8, forward 16, hate 32, long_view 64, profile_enter 128
    assert data.action.tolist() == [65, 3, 1, 0, 221, 32, 255, 65]
    assert data.timestamp.tolist()[:2] == [1649404800, 1649404860]  # time_ms // 1000
    meta = data.metadata
    assert meta["action"]["kind"] == "bitmask" and meta["action"]["tasks"][6] == "long_view"
    features = {f["name"]: f for f in meta["contextual_features"]}
    assert features["user_active_degree"]["vocabulary"] == ["<missing>", "middle_active", "high_active", "full_active", "UNKNOWN"]
    assert features["follow_user_num_range"]["vocabulary"] == ["<missing>", "0", "(0,10]", "(10,50]", "500+"]
    assert features["fans_user_num_range"]["vocabulary"] == ["<missing>", "0", "[1,10)", "[10,100)", "[1w,10w)"]
    assert features["register_days_range"]["vocabulary"] == ["<missing>", "15-30", "31-60", "61-90", "730+"]
    # User 3 has no row in user_features: every categorical feature is "<missing>" (0).
    assert data.contextual["user_active_degree"].tolist() == [2, 3, 4, 0]
    assert data.contextual["follow_user_num_range"].tolist() == [2, 1, 4, 0]
    assert data.contextual["register_days_range"].tolist() == [3, 1, 4, 0]


def test_range_buckets_sort_by_lower_bound():
    values = ["500+", "(0,10]", "0", "[1k,5k)", "[1w,10w)", "[100,1k)", "(250,500]"]
    assert sorted(values, key=category_sort_key) == ["0", "(0,10]", "[100,1k)", "(250,500]", "500+", "[1k,5k)", "[1w,10w)"]


def test_remap_items_is_dense_and_reversible(tmp_path):
    out = tmp_path / "ml1m-remapped"
    meta = prepare("ml-1m", raw_dir("ml-1m"), str(out), PrepareOptions(remap_items=True, show_progress=False))
    data = ProcessedData.open(out)
    raw_ids = np.load(out / "item_raw_id.npy")
    assert meta["num_items"] == 12  # 11 distinct items as 1..11, 0 unused
    assert sorted(set(data.item.tolist())) == list(range(1, 12))
    assert raw_ids[data.item].tolist() == [3408, 1193, 914, 661, 2355, 1357, 1193, 3068, 3421, 2333, 3952, 2987, 1193]


@pytest.mark.parametrize("dataset", ["ml-1m", "kuairand-27k"])
def test_streaming_with_tiny_buffers_gives_same_result(processed, tmp_path, dataset):
    # Forces several parse blocks (with lines cut at block edges) and several sort buckets.
    out = tmp_path / "tiny"
    prepare(dataset, raw_dir(dataset), str(out), PrepareOptions(sort_buffer_rows=2, block_bytes=40, show_progress=False))
    small, reference = ProcessedData.open(out), ProcessedData.open(processed(dataset))
    for name in ("offsets", "item", "timestamp", "action", "user_id"):
        np.testing.assert_array_equal(getattr(small, name), getattr(reference, name))


def test_existing_output_needs_overwrite(processed, tmp_path):
    out = tmp_path / "out"
    prepare("ml-20m", raw_dir("ml-20m"), str(out), QUIET)
    with pytest.raises(FileExistsError):
        prepare("ml-20m", raw_dir("ml-20m"), str(out), QUIET)
    prepare("ml-1m", raw_dir("ml-1m"), str(out), QUIET, overwrite=True)
    assert ProcessedData.open(out).metadata["dataset"] == "ml-1m"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_synthetic_cli_and_missing_raw_dir(tmp_path):
    out = tmp_path / "syn"
    result = run_cli("prepare", "synthetic", "--out-dir", str(out), "--num-users", "50", "--num-items", "200",
                     "--mean-length", "30", "--no-progress")
    assert result.returncode == 0, result.stderr
    stats = json.loads(run_cli("stats", str(out)).stdout)
    assert stats["users"] == 50 and stats["interactions"] >= 50 * 20
    result = run_cli("prepare", "ml-1m", "--out-dir", str(tmp_path / "x"))
    assert result.returncode != 0 and "--raw-dir" in result.stderr
