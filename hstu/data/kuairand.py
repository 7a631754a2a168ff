"""KuaiRand (Pure / 1K / 27K) raw reader: standard interaction logs + user features."""

from __future__ import annotations

import csv
import glob
import io
import os
import re
from typing import Optional

import numpy as np

from hstu.data.errors import DataFormatError
from hstu.data.prepare import InteractionBlock, PrepareOptions, RawSource, file_progress, id_columns, user_id_feature
from hstu.data.processed import ContextualFeature, bitmask_action_spec
from hstu.data.textio import iter_numeric_blocks, read_header, require_file

VARIANTS = {"kuairand-pure": "pure", "kuairand-1k": "1k", "kuairand-27k": "27k"}
LOG_PERIODS = ("4_08_to_4_21", "4_22_to_5_08")
LOG_COLUMNS = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)
# Bit i of the action mask is set when the column ACTION_COLUMNS[i] is 1 (click 1, like 2, ..., profile_enter 128).
ACTION_COLUMNS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter")
USER_FEATURE_COLUMNS = (
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author", "follow_user_num",
    "follow_user_num_range", "fans_user_num", "fans_user_num_range", "friend_user_num", "friend_user_num_range",
    "register_days", "register_days_range",
) + tuple(f"onehot_feat{i}" for i in range(18))
CATEGORICAL_USER_FEATURES = (
    "user_active_degree", "follow_user_num_range", "fans_user_num_range", "friend_user_num_range", "register_days_range",
)
ACTIVE_DEGREE_ORDER = ("low_active", "middle_active", "high_active", "full_active")
_UNIT = {"": 1, "k": 1_000, "w": 10_000}  # KuaiRand writes 10,000 as "1w" (万)


def data_dir(raw_dir: str) -> str:
    nested = os.path.join(raw_dir, "data")
    return nested if os.path.isdir(nested) else raw_dir


def log_files(raw_dir: str, variant: str) -> list[str]:
    """The standard logs of both periods; KuaiRand-27K splits each period into ``_part<k>`` files."""
    directory = data_dir(raw_dir)
    files = []
    for period in LOG_PERIODS:
        stem = f"log_standard_{period}_{variant}"
        found = sorted(glob.glob(os.path.join(directory, f"{stem}.csv")) + glob.glob(os.path.join(directory, f"{stem}_part*.csv")))
        if not found:
            raise DataFormatError(os.path.join(directory, f"{stem}.csv"), "required file is missing")
        files.extend(found)
    return files


def category_sort_key(value: str):
    """Order range buckets by their lower bound ("(10,50]" < "[100,1k)" < "500+"), other strings alphabetically."""
    if value in ACTIVE_DEGREE_ORDER:
        return (0, ACTIVE_DEGREE_ORDER.index(value), value)
    match = re.search(r"(\d+(?:\.\d+)?)\s*([kKwW]?)", value)
    if match:
        lower = float(match.group(1)) * _UNIT[match.group(2).lower()]
        # "(0,10]" excludes its lower bound, so it sorts after the bucket "0".
        return (1, lower + (0.5 if value.lstrip().startswith("(") else 0.0), value)
    return (2, 0.0, value)


def _read_user_rows(path: str, reader) -> dict[int, dict[str, str]]:
    header = next(reader, None)
    if header is None:
        raise DataFormatError(path, "file is empty, expected a header line", 1)
    missing = [c for c in ("user_id",) + CATEGORICAL_USER_FEATURES if c not in header]
    if missing:
        raise DataFormatError(path, f"header lacks column(s) {missing}", 1)
    index = {name: header.index(name) for name in ("user_id",) + CATEGORICAL_USER_FEATURES}
    users: dict[int, dict[str, str]] = {}
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            raise DataFormatError(path, f"expected {len(header)} fields, found {len(row)}", line)
        value = row[index["user_id"]].strip()
        if not (value.isascii() and value.isdigit()):
            raise DataFormatError(path, f"column 'user_id': {value!r} is not an integer id >= 0", line)
        if len(value) > 18:
            raise DataFormatError(path, f"column 'user_id': {value} is too large", line)
        uid = int(value)
        users[uid] = {name: row[index[name]].strip() for name in CATEGORICAL_USER_FEATURES}
    return users


def read_user_features(path: str) -> tuple[dict[int, dict[str, str]], dict[str, list[str]]]:
    """Raw user_id → categorical strings, and per feature the vocabulary (index 0 = missing)."""
    require_file(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(path, f"invalid utf-8 byte sequence ({e.reason})", raw[: e.start].count(b"\n") + 1) from None
    reader = csv.reader(io.StringIO(text))
    try:
        users = _read_user_rows(path, reader)
    except csv.Error as e:
        raise DataFormatError(path, f"malformed CSV ({e})", reader.line_num) from None
    vocab = {}
    for name in CATEGORICAL_USER_FEATURES:
        values = {u[name] for u in users.values() if u[name]}
        vocab[name] = ["<missing>"] + sorted(values, key=category_sort_key)
    return users, vocab


def source(dataset: str, raw_dir: str, options: Optional[PrepareOptions] = None) -> RawSource:
    """The reader of one KuaiRand variant. ``options.kuairand_users = "every-log"`` keeps the users that have rows in
    every standard log file (NVIDIA's example joins the per-file user sequences that way); ``options.timestamp_unit
    = "milliseconds"`` stores ``time_ms`` as it is instead of whole seconds. Rows are ordered by ``time_ms`` either
    way."""
    options = options or PrepareOptions()
    variant = VARIANTS[dataset]
    features_path = os.path.join(data_dir(raw_dir), f"user_features_{variant}.csv")
    every_log = options.kuairand_users == "every-log"
    state: dict = {"present": {}}  # with every_log: log file -> sorted raw ids of the users it has rows for

    def check():
        files = log_files(raw_dir, variant)
        layouts = []
        for path in files:
            header = read_header(path, ",")
            missing = [c for c in LOG_COLUMNS if c not in header]
            if missing:
                raise DataFormatError(path, f"header lacks column(s) {missing}", 1)
            layouts.append({name: header.index(name) for name in ("user_id", "video_id", "time_ms") + ACTION_COLUMNS})
        state["files"] = list(zip(files, layouts, [len(read_header(p, ",")) for p in files]))
        state["users"], state["vocab"] = read_user_features(features_path)

    def blocks(options):
        files = [f for f, _, _ in state["files"]]
        with file_progress(files, f"read {variant} logs", options.show_progress) as bar:
            for path, columns, num_fields in state["files"]:
                for block in iter_numeric_blocks(
                    path, delimiter=",", num_fields=num_fields, columns=columns, skip_header=True,
                    block_bytes=options.block_bytes, progress=bar,
                ):
                    action = np.zeros(len(block), dtype=np.int64)
                    for bit, name in enumerate(ACTION_COLUMNS):
                        flag = block.columns[name]
                        bad = np.flatnonzero((flag != 0) & (flag != 1))
                        if bad.size:
                            raise DataFormatError(path, f"column {name!r}: {flag[bad[0]]} is not 0 or 1", block.first_line + int(bad[0]))
                        action |= flag.astype(np.int64) << bit
                    user, item, time = id_columns(path, block, options, "user_id", "video_id", "time_ms")
                    if every_log:
                        seen = state["present"].get(path, np.zeros(0, dtype=np.int64))
                        state["present"][path] = np.union1d(seen, user)
                    yield InteractionBlock(user=user, item=item, time=time, action=action)

    def keep_users() -> np.ndarray:
        files = [f for f, _, _ in state["files"]]
        kept = state["present"].get(files[0], np.zeros(0, dtype=np.int64))
        for path in files[1:]:
            kept = np.intersect1d(kept, state["present"].get(path, np.zeros(0, dtype=np.int64)), assume_unique=True)
        if not len(kept):
            raise DataFormatError(
                files[0], f"--kuairand-users every-log: no user has interactions in every standard log file "
                f"({', '.join(os.path.basename(f) for f in files)}); use --kuairand-users all"
            )
        return kept

    def contextual(user_ids):
        users, vocab = state["users"], state["vocab"]
        features = [user_id_feature(user_ids)]
        for name in CATEGORICAL_USER_FEATURES:
            lookup = {value: i for i, value in enumerate(vocab[name])}
            values = np.array([lookup.get(users.get(uid, {}).get(name, ""), 0) for uid in user_ids.tolist()], dtype=np.int64)
            features.append(ContextualFeature(name, values, len(vocab[name]), vocab[name]))
        return features

    milliseconds = options.timestamp_unit == "milliseconds"
    return RawSource(
        dataset=dataset,
        blocks=blocks,
        time_divisor=1 if milliseconds else 1000,
        action_spec=bitmask_action_spec(),
        contextual=contextual,
        extra_metadata={
            "raw_files": "data/log_standard_*_%s*.csv, data/user_features_%s.csv" % (variant, variant),
            "kuairand_users": options.kuairand_users,
        },
        check=check,
        timestamp_unit=options.timestamp_unit,
        keep_users=keep_users if every_log else None,
    )
