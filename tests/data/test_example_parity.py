"""Data parity with NVIDIA's example preprocessing: the ML-1M ``zip_code`` contextual feature, the KuaiRand user set
of users found in every standard log file (``--kuairand-users every-log``) and millisecond timestamps
(``--timestamp-unit milliseconds``). Raw inputs are tiny files written by the tests."""

import contextlib
import csv
import io
import json
import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hstu.data import DataFormatError, ProcessedData
from hstu.data import processed as processed_module
from hstu.data.cli import build_parser
from hstu.data.cli import main as data_cli
from hstu.data.kuairand import LOG_COLUMNS, USER_FEATURE_COLUMNS
from hstu.data.loader import SequenceDataset, make_dataloader
from hstu.data.prepare import EXAMPLE_PREPARE_FLAGS, KUAIRAND_DATASETS, PrepareOptions, prepare

from .conftest import QUIET, copy_raw, raw_dir

ACTION_COLUMNS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
                  "is_profile_enter")


def cli(*argv):
    """``python -m hstu.data`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = data_cli([str(a) for a in argv])
    return status, err.getvalue()


# ---- MovieLens-1M zip codes -------------------------------------------------------------------------------------

def write_ml1m(raw, users, ratings):
    """``users``: (UserID, zip text) rows of users.dat; ``ratings``: (user, movie, stars, time) rows."""
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, "users.dat"), "w", encoding="latin-1") as f:
        for k, (uid, zip_code) in enumerate(users):
            f.write(f"{uid}::{'FM'[k % 2]}::25::{k % 21}::{zip_code}\n")
    with open(os.path.join(raw, "movies.dat"), "w", encoding="latin-1") as f:
        for movie in sorted({r[1] for r in ratings}):
            f.write(f"{movie}::Movie {movie} (2000)::Drama\n")
    with open(os.path.join(raw, "ratings.dat"), "w", encoding="latin-1") as f:
        for user, movie, stars, time in ratings:
            f.write(f"{user}::{movie}::{stars}::{time}\n")


def test_ml1m_zip_code_is_a_contextual_feature_with_first_occurrence_ids(tmp_path):
    # User 9 (no ratings) lists the first code; 4 and 6 share a code; 7's field is blank; 8 rates but is not listed.
    users = [(9, "10001"), (4, "02460"), (5, "98107-2117"), (6, "02460"), (7, " "), (3, "T8H1N")]
    ratings = [(u, 10 + u, 3, 978300000 + u) for u in (3, 4, 5, 6, 7, 8)]
    write_ml1m(tmp_path / "raw", users, ratings)
    meta = prepare("ml-1m", str(tmp_path / "raw"), str(tmp_path / "out"), QUIET)
    data = ProcessedData.open(tmp_path / "out")
    names = [f["name"] for f in meta["contextual_features"]]
    assert names == ["user_id", "gender", "age", "occupation", "zip_code"]
    zip_meta = meta["contextual_features"][-1]
    # Whole codes, leading zeros kept, numbered 1, 2, ... as they first occur in users.dat; 0 = missing.
    assert zip_meta["vocabulary"] == ["<missing>", "10001", "02460", "98107-2117", "T8H1N"]
    assert zip_meta["vocab_size"] == 5
    assert data.user_id.tolist() == [3, 4, 5, 6, 7, 8]
    assert data.contextual["zip_code"].tolist() == [4, 2, 3, 2, 0, 0]
    assert np.load(tmp_path / "out" / "zip_code.npy").dtype == np.int64


@settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(st.tuples(st.integers(1, 8), st.sampled_from(["", "55117", "02460", "55117-1234", "T8H1N", "x"])),
                     min_size=1, max_size=10))
def test_ml1m_zip_ids_match_an_independent_encoding(rows):
    """Property: every rated user's id is the 1-based rank of its (last-listed) code among first occurrences."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(processed_module, "_fsync_tree", lambda root: None)
        patch.setattr(processed_module, "_fsync_dir", lambda directory: None)
        write_ml1m(os.path.join(tmp, "raw"), rows, [(u, 1, 4, 978300000) for u in range(1, 9)])
        meta = prepare("ml-1m", os.path.join(tmp, "raw"), os.path.join(tmp, "out"), QUIET)
        got = ProcessedData.open(os.path.join(tmp, "out")).contextual["zip_code"].tolist()
    order = []
    for _, code in rows:
        if code and code not in order:
            order.append(code)
    last = dict(rows)
    assert meta["contextual_features"][-1]["vocabulary"] == ["<missing>"] + order
    assert got == [order.index(last[u]) + 1 if last.get(u) else 0 for u in range(1, 9)]


COMMON = ["TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "TrainerArgs.tensorboard=False",
          "TrainerArgs.plot=False", "TrainerArgs.num_threads=1", "TrainerArgs.deterministic=True",
          "TrainerArgs.eval_max_batches=1", "TrainerArgs.compute_baseline=False", "DatasetArgs.max_seqlen=16",
          "DatasetArgs.eval_batch_size=64", "DatasetArgs.num_workers=0", "DatasetArgs.batch_size=8",
          "DatasetArgs.num_candidates=2", "NetworkArgs.hidden_dim=16", "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8",
          "NetworkArgs.num_layers=1", "RankingArgs.head_hidden_dims=(16,)", "TrainerArgs.max_steps=3"]


def train_losses(data_dir, run_dir, features):
    """Three steps of configs/ml1m_ranking.gin in this process; the logged losses."""
    from hstu.training.cli import main as train_cli

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["--gin-config-file", os.path.join(root, "configs", "ml1m_ranking.gin"), "--run-dir", str(run_dir)]
    for param in COMMON + [f"DatasetArgs.dataset_dir='{data_dir}'", f"NetworkArgs.contextual_features={features!r}"]:
        argv += ["--gin-param", param]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = train_cli("ranking", argv)
    assert status == 0, err.getvalue()[-3000:]
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


@pytest.fixture
def _restore_torch_state():
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def test_zip_code_trains_and_a_dataset_without_it_still_opens_and_trains(tmp_path, _restore_torch_state):
    rng = random.Random(0)
    users = [(u, rng.choice(["02460", "98107-2117", "55117", "T8H1N"])) for u in range(1, 31)]
    ratings = [(u, rng.randrange(1, 41), rng.randrange(1, 6), 978300000 + 60 * k + u) for u in range(1, 31)
               for k in range(12)]
    write_ml1m(tmp_path / "raw", users, ratings)
    new = tmp_path / "new"
    prepare("ml-1m", str(tmp_path / "raw"), str(new), QUIET)
    # A dataset prepared before zip_code existed: the same columns without zip_code.npy and its metadata entry.
    old = tmp_path / "old"
    os.makedirs(old)
    for name in os.listdir(new):
        if name not in ("zip_code.npy", "metadata.json"):
            os.link(new / name, old / name)
    meta = json.loads((new / "metadata.json").read_text())
    meta["contextual_features"] = [f for f in meta["contextual_features"] if f["name"] != "zip_code"]
    (old / "metadata.json").write_text(json.dumps(meta))

    data = ProcessedData.open(old)
    assert "zip_code" not in data.contextual
    assert SequenceDataset(old, "train", "ranking", 16, 2).contextual_feature_names == [
        "user_id", "gender", "age", "occupation"]
    with_zip = train_losses(new, tmp_path / "run_zip", ["gender", "age", "occupation", "zip_code"])
    assert len(with_zip) == 3 and all(np.isfinite(with_zip))
    # The extra column changes nothing for a model that does not use it.
    features = ["gender", "age", "occupation"]
    assert train_losses(old, tmp_path / "run_old", features) == train_losses(new, tmp_path / "run_new", features)


# ---- KuaiRand: user set and timestamps --------------------------------------------------------------------------

def write_kuairand(raw, variant, logs):
    """``logs``: {file suffix: [(user, video, time_ms, action mask)]}; a user features file for users 0..9."""
    data = os.path.join(raw, "data")
    os.makedirs(data, exist_ok=True)
    for suffix, rows in logs.items():
        with open(os.path.join(data, f"log_standard_{suffix}.csv"), "w") as f:
            f.write(",".join(LOG_COLUMNS) + "\n")
            for user, video, time_ms, mask in rows:
                value = {"user_id": user, "video_id": video, "time_ms": time_ms, "date": 20220408, "hourmin": 1200}
                for bit, name in enumerate(ACTION_COLUMNS):
                    value[name] = (mask >> bit) & 1
                f.write(",".join(str(value.get(name, 0)) for name in LOG_COLUMNS) + "\n")
    with open(os.path.join(data, f"user_features_{variant}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(USER_FEATURE_COLUMNS)
        for user in range(10):
            row = {"user_id": user, "user_active_degree": "high_active", "follow_user_num_range": "0",
                   "fans_user_num_range": "[1,10)", "friend_user_num_range": "0", "register_days_range": "61-90"}
            writer.writerow([row.get(name, 0) for name in USER_FEATURE_COLUMNS])


def expected_kuairand(logs, every_log, milliseconds):
    """Independent model: per-user rows of the files in name order, stably sorted by time_ms."""
    names = sorted(logs)
    users = [{r[0] for r in logs[n]} for n in names]
    kept = set.intersection(*users) if every_log else set.union(*users)
    rows = [r for n in names for r in logs[n] if r[0] in kept]
    rows.sort(key=lambda r: (r[0], r[2]))  # Python's sort is stable
    counts = [sum(1 for r in rows if r[0] == u) for u in sorted(kept)]
    return {
        "user_id": sorted(kept),
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist(),
        "item": [r[1] for r in rows],
        "timestamp": [r[2] if milliseconds else r[2] // 1000 for r in rows],
        "action": [r[3] for r in rows],
    }


T0 = 1_649_404_800_000
PURE = {  # users 0 and 2 are in both periods, 1 only in the first, 3 only in the second
    "4_08_to_4_21_pure": [(0, 100, T0, 1), (1, 101, T0 + 1, 3), (2, 102, T0 + 500, 0), (0, 103, T0 + 500, 64)],
    "4_22_to_5_08_pure": [(2, 104, T0 + 400, 1), (3, 105, T0 + 2, 0), (0, 106, T0 + 999, 2), (0, 107, T0 + 1000, 0)],
}


@pytest.mark.parametrize("sort_buffer_rows", [1_000_000, 2])
def test_every_log_keeps_users_present_in_every_log_file(tmp_path, sort_buffer_rows):
    raw = tmp_path / "KuaiRand-Pure"
    write_kuairand(raw, "pure", PURE)
    options = PrepareOptions(show_progress=False, kuairand_users="every-log", sort_buffer_rows=sort_buffer_rows)
    meta = prepare("kuairand-pure", str(raw), str(tmp_path / "out"), options)
    data = ProcessedData.open(tmp_path / "out")
    want = expected_kuairand(PURE, every_log=True, milliseconds=False)
    assert data.user_id.tolist() == want["user_id"] == [0, 2]
    for name in ("offsets", "item", "timestamp", "action"):
        assert getattr(data, name).tolist() == want[name], name
    assert meta["kuairand_users"] == "every-log" and meta["timestamp_unit"] == "seconds"
    assert meta["num_users"] == 2 and meta["num_interactions"] == 6
    assert meta["num_distinct_items"] == 6  # videos 101 and 105 went with users 1 and 3
    everyone = prepare("kuairand-pure", str(raw), str(tmp_path / "all"), QUIET)
    assert everyone["kuairand_users"] == "all" and everyone["num_users"] == 4


def test_every_log_with_remapped_items_numbers_only_kept_items(tmp_path):
    raw = tmp_path / "KuaiRand-Pure"
    write_kuairand(raw, "pure", PURE)
    options = PrepareOptions(show_progress=False, kuairand_users="every-log", remap_items=True, sort_buffer_rows=3)
    meta = prepare("kuairand-pure", str(raw), str(tmp_path / "out"), options)
    data = ProcessedData.open(tmp_path / "out")
    raw_ids = np.load(tmp_path / "out" / "item_raw_id.npy")
    assert raw_ids.tolist() == [-1, 100, 102, 103, 104, 106, 107]
    assert raw_ids[data.item].tolist() == expected_kuairand(PURE, True, False)["item"]
    assert meta["num_items"] == 7


def test_milliseconds_keep_time_ms_and_batches_still_carry_seconds(tmp_path):
    raw = tmp_path / "KuaiRand-Pure"
    write_kuairand(raw, "pure", PURE)
    ms = prepare("kuairand-pure", str(raw), str(tmp_path / "ms"),
                 PrepareOptions(show_progress=False, timestamp_unit="milliseconds"))
    prepare("kuairand-pure", str(raw), str(tmp_path / "s"), QUIET)
    assert ms["timestamp_unit"] == "milliseconds"
    data = ProcessedData.open(tmp_path / "ms")
    assert data.timestamp.tolist() == expected_kuairand(PURE, False, True)["timestamp"]
    assert data.timestamp_ticks_per_second == 1000
    assert data.item.tolist() == ProcessedData.open(tmp_path / "s").item.tolist()  # same order: sorted on time_ms
    for strategy in ("leave_one_out", "user_ratio"):
        batches = [list(make_dataloader(SequenceDataset(tmp_path / d, "train", "ranking", 8, 1,
                                                        split_strategy=strategy), 2, shuffle=False))
                   for d in ("ms", "s")]
        assert len(batches[0]) == len(batches[1]) > 0
        for a, b in zip(*batches):
            assert a.sequence["timestamp"].values().tolist() == b.sequence["timestamp"].values().tolist()
            assert a.sequence["item"].values().tolist() == b.sequence["item"].values().tolist()


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    layout=st.sampled_from(["pure", "27k"]),
    files=st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(0, 3000), st.integers(0, 255)),
                            max_size=8), min_size=4, max_size=4),
    every_log=st.booleans(), milliseconds=st.booleans(), remap=st.booleans(),
    sort_buffer_rows=st.sampled_from([1, 3, 1_000_000]),
)
def test_kuairand_options_match_a_model(layout, files, every_log, milliseconds, remap, sort_buffer_rows):
    """Property: any logs, either user set and unit, any buffer size: the model's columns, or the named error."""
    import tempfile

    suffixes = (["4_08_to_4_21_27k_part1", "4_08_to_4_21_27k_part2", "4_22_to_5_08_27k_part1", "4_22_to_5_08_27k_part2"]
                if layout == "27k" else ["4_08_to_4_21_pure", "4_22_to_5_08_pure"])
    logs = {s: [(u, v, T0 + t, m) for u, v, t, m in rows] for s, rows in zip(suffixes, files)}
    options = PrepareOptions(show_progress=False, kuairand_users="every-log" if every_log else "all",
                             timestamp_unit="milliseconds" if milliseconds else "seconds", remap_items=remap,
                             sort_buffer_rows=sort_buffer_rows)
    want = expected_kuairand(logs, every_log, milliseconds)
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as patch:
        patch.setattr(processed_module, "_fsync_tree", lambda root: None)
        patch.setattr(processed_module, "_fsync_dir", lambda directory: None)
        raw = os.path.join(tmp, "raw")
        write_kuairand(raw, layout, logs)
        try:
            meta = prepare(f"kuairand-{layout}", raw, os.path.join(tmp, "out"), options)
        except DataFormatError as e:
            assert not want["user_id"], f"valid input was rejected: {e}"
            assert ("every standard log file" in str(e)) == any(logs.values())
            assert not os.path.exists(os.path.join(tmp, "out"))
            return
        assert want["user_id"], "an empty user set was accepted"
        data = ProcessedData.open(os.path.join(tmp, "out"))
        item = data.item.tolist()
        if remap:
            raw_ids = np.load(os.path.join(tmp, "out", "item_raw_id.npy"))
            assert raw_ids[1:].tolist() == sorted(set(want["item"]))  # dense over the kept users' items
            item = raw_ids[data.item].tolist()
        assert (data.user_id.tolist(), data.offsets.tolist(), item, data.timestamp.tolist(), data.action.tolist()) == (
            want["user_id"], want["offsets"], want["item"], want["timestamp"], want["action"])
        assert meta["kuairand_users"] == options.kuairand_users and meta["timestamp_unit"] == options.timestamp_unit


def test_every_log_without_a_common_user_is_a_named_error(tmp_path):
    # The 27K fixture: part1 has users 0 and 1, part2 users 1 and 2, the second period 0, 2 and 3.
    raw = copy_raw("kuairand-27k", tmp_path / "raw")
    with pytest.raises(DataFormatError, match=r"--kuairand-users every-log: no user has interactions in every "
                                              r"standard log file .*27k_part2\.csv"):
        prepare("kuairand-27k", raw, str(tmp_path / "out"), PrepareOptions(show_progress=False,
                                                                            kuairand_users="every-log"))
    assert not os.path.exists(tmp_path / "out")


# ---- options: names, values, datasets ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, error, words", [
    ("kuairand_users", "first-log", ValueError, "kuairand_users (--kuairand-users) must be one of all, every-log"),
    ("kuairand_users", None, TypeError, "kuairand_users (--kuairand-users) must be a string"),
    ("timestamp_unit", "ms", ValueError, "timestamp_unit (--timestamp-unit) must be one of seconds, milliseconds"),
    ("timestamp_unit", 1000, TypeError, "timestamp_unit (--timestamp-unit) must be a string"),
])
def test_bad_option_values_are_named_errors(tmp_path, field, value, error, words):
    with pytest.raises(error) as info:
        prepare("kuairand-pure", raw_dir("kuairand-pure"), str(tmp_path / "out"),
                PrepareOptions(show_progress=False, **{field: value}))
    assert words in str(info.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("dataset", ["ml-1m", "ml-20m"])
@pytest.mark.parametrize("field, value", [("kuairand_users", "every-log"), ("timestamp_unit", "milliseconds")])
def test_kuairand_options_are_refused_for_other_datasets(tmp_path, dataset, field, value):
    with pytest.raises(ValueError, match=rf"{field} \(--{field.replace('_', '-')}\) = '{value}' applies to the "
                                         rf"KuaiRand datasets only, not to '{dataset}'"):
        prepare(dataset, raw_dir(dataset), str(tmp_path / "out"), PrepareOptions(show_progress=False, **{field: value}))
    assert not os.path.exists(tmp_path / "out")


def test_cli_flags(tmp_path, capsys):
    status, err = cli("prepare", "kuairand-pure", "--raw-dir", raw_dir("kuairand-pure"), "--out-dir", tmp_path / "p",
                      "--no-progress", "--kuairand-users", "every-log", "--timestamp-unit", "milliseconds")
    assert status == 0, err
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert (meta["kuairand_users"], meta["timestamp_unit"], meta["num_users"]) == ("every-log", "milliseconds", 2)
    status, err = cli("prepare", "synthetic", "--out-dir", tmp_path / "s", "--timestamp-unit", "milliseconds")
    assert status == 1 and "error: timestamp_unit (--timestamp-unit) = 'milliseconds' applies to the KuaiRand" in err
    assert not os.path.exists(tmp_path / "s")
    status, err = cli("prepare", "ml-1m", "--raw-dir", raw_dir("ml-1m"), "--out-dir", tmp_path / "m",
                      "--kuairand-users", "every-log")
    assert status == 1 and "error: kuairand_users (--kuairand-users) = 'every-log'" in err
    with pytest.raises(SystemExit) as info:
        data_cli(["prepare", "kuairand-1k", "--raw-dir", raw_dir("kuairand-1k"), "--out-dir", str(tmp_path / "k"),
                  "--kuairand-users", "some"])
    assert info.value.code == 2 and "argument --kuairand-users: invalid choice: 'some'" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", KUAIRAND_DATASETS)
def test_example_prepare_flags_select_the_example_data(dataset):
    args = build_parser().parse_args(["prepare", dataset, "--out-dir", "x", *EXAMPLE_PREPARE_FLAGS[dataset]])
    assert (args.kuairand_users, args.timestamp_unit) == ("every-log", "milliseconds")


@pytest.mark.parametrize("unit", ["nanoseconds", 1000, None])
def test_unknown_timestamp_unit_in_metadata_is_a_named_error(processed, tmp_path, unit):
    copy = tmp_path / "copy"
    os.makedirs(copy)
    source = processed("kuairand-pure")
    for name in os.listdir(source):
        if name != "metadata.json":
            os.link(os.path.join(source, name), copy / name)
    meta = json.loads(open(os.path.join(source, "metadata.json")).read())
    meta["timestamp_unit"] = unit
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"metadata\.json: field 'timestamp_unit' must be one of"):
        ProcessedData.open(copy)
