"""Property-based fuzzing of every raw parser and of ``ProcessedData.open``.

Raw files are built from valid rows with malformed ones mixed in (wrong field counts, non-numbers, empty fields,
huge or negative numbers, non-ASCII text, CRLF, no final newline, a truncated last line, empty and header-only
files). Each outcome must be the result that a small independent model of the format predicts, or a
``DataFormatError`` exactly when the model finds the input invalid; any other exception fails the test.
"""

import json
import math
import os
import shutil
import tempfile
from typing import Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hstu.data import DataFormatError, ProcessedData, compute_stats
from hstu.data import processed as processed_module
from hstu.data.kuairand import CATEGORICAL_USER_FEATURES, LOG_COLUMNS, USER_FEATURE_COLUMNS, read_user_features
from hstu.data.movielens import ML1M_AGE_CODES, ML1M_NUM_OCCUPATIONS, read_ml1m_movies, read_ml1m_users
from hstu.data.prepare import PrepareOptions, prepare
from hstu.data.processed import ID_LIMIT
from hstu.data.synthetic import write_synthetic

from .conftest import raw_dir

FUZZ = settings(max_examples=int(os.environ.get("HSTU_FUZZ_EXAMPLES", 60)), deadline=None,
                derandomize="HSTU_FUZZ_EXAMPLES" not in os.environ, database=None, suppress_health_check=list(HealthCheck))
EXACT = 2**53  # integers below this are read exactly by the float parser


@pytest.fixture(autouse=True, scope="module")
def no_fsync():
    """Durability is not what these tests check; skipping fsync keeps each example at a few milliseconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processed_module, "_fsync_tree", lambda root: None)
        patch.setattr(processed_module, "_fsync_dir", lambda directory: None)
        yield


# ---- building files -------------------------------------------------------------------------------------------------

# Numeric tokens are drawn from characters on which numpy's parser and Python's float() agree.
NUMBER_CHARS = "0123456789+-.eE #x\t"
JUNK = ["", " ", "abc", "nan", "inf", "-inf", "1e400", "-1", "-0", "2.5", "\x00", "1_0", "\uff11\uff12", "\u0663", "\xe9",
        str(2**62), str(2**53 + 1), "9" * 25, str(ID_LIMIT)]


def token(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``valid`` values (as text), sometimes junk or a random numeric-looking string."""
    valid_text = valid.map(str)
    return st.one_of(valid_text, valid_text, valid_text, valid_text, st.sampled_from(JUNK), st.text(NUMBER_CHARS, max_size=6))


def line(fields: list, delimiter: str) -> st.SearchStrategy:
    row = st.tuples(*fields).map(list)
    wrong_count = st.one_of(row.map(lambda r: r[:-1]), row.map(lambda r: r + ["1"]))
    return st.one_of(row, row, row, row, row, row, wrong_count).map(delimiter.join)


@st.composite
def text_file(draw, lines: st.SearchStrategy, header: Optional[str] = None, max_rows: int = 12) -> bytes:
    body = draw(st.lists(st.one_of(lines, lines, lines, lines, st.just("")), max_size=max_rows))
    eol = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    text = eol.join(([] if header is None else [header]) + body)
    if draw(st.booleans()):
        text += eol
    if draw(st.integers(0, 5)) == 0:  # a truncated file (the last line cut anywhere)
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8")


# ---- a model of the formats (independent of hstu.data.textio) ------------------------------------------------------


def number(field: str) -> Optional[float]:
    if not field.isascii() or "_" in field:
        return None
    try:
        return float(field)
    except ValueError:
        return None


def int_id(field: str, minimum: int = 0, limit: int = EXACT) -> Optional[int]:
    value = number(field)
    if value is None or not math.isfinite(value) or value != math.floor(value) or not minimum <= value < limit:
        return None
    return int(value)


def numeric_rows(text: str, delimiter: str, num_fields: int) -> Optional[list[list[str]]]:
    """Split the data lines (``\\r`` dropped, empty lines skipped); ``None`` if one has the wrong field count."""
    rows = []
    for raw_line in text.replace("\r", "").split("\n"):
        if raw_line == "":
            continue
        fields = raw_line.split(delimiter)
        if len(fields) != num_fields:
            return None
        rows.append(fields)
    return rows


def grouped(rows: list[tuple[int, int, int, int]], divisor: int = 1) -> dict:
    """(user, item, time, action) rows -> the processed columns: by user, stable by time."""
    rows = sorted(rows, key=lambda r: (r[0], r[2]))
    users = sorted({r[0] for r in rows})
    counts = [sum(1 for r in rows if r[0] == u) for u in users]
    return {
        "offsets": np.concatenate([[0], np.cumsum(counts)]).tolist(),
        "user_id": users,
        "item": [r[1] for r in rows],
        "timestamp": [r[2] // divisor for r in rows],
        "action": [r[3] for r in rows],
    }


def check_prepare(dataset: str, raw: str, expected: Optional[dict], options: PrepareOptions) -> None:
    """``prepare`` gives ``expected``, or raises DataFormatError when ``expected`` is None (invalid input)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        try:
            prepare(dataset, raw, out, options)
        except DataFormatError:
            assert expected is None or not expected["item"], "valid input was rejected"
            assert not os.path.exists(out) and os.listdir(tmp) == []
            return
        assert expected is not None and expected["item"], "invalid input was accepted"
        data = ProcessedData.open(out)
        got = {name: getattr(data, name).tolist() for name in expected}
        assert got == expected


def block_options() -> st.SearchStrategy:
    return st.builds(PrepareOptions, block_bytes=st.sampled_from([7, 33, 16 << 20]), sort_buffer_rows=st.sampled_from([2, 1000]),
                     show_progress=st.just(False))


def check_raw_files(dataset: str, files: dict[str, bytes], expected: Optional[dict], options: PrepareOptions) -> None:
    """The fixture of ``dataset`` with ``files`` (relative path -> content) replaced, through :func:`check_prepare`."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = shutil.copytree(raw_dir(dataset), os.path.join(tmp, "raw"))
        for relative, content in files.items():
            with open(os.path.join(raw, relative), "wb") as f:
                f.write(content)
        check_prepare(dataset, raw, expected, options)


# ---- MovieLens ---------------------------------------------------------------------------------------------------

ML1M_RATING = line([token(st.integers(1, 6)), token(st.integers(1, 60)), token(st.integers(0, 6)),
                    token(st.integers(978_300_000, 978_300_020))], "::")


def ml1m_model(data: bytes) -> Optional[dict]:
    rows = numeric_rows(data.decode("latin-1"), "::", 4)
    if rows is None:
        return None
    out = []
    for user, item, rating, time in rows:
        values = (int_id(user, limit=ID_LIMIT), int_id(item, limit=ID_LIMIT), int_id(rating, 1), int_id(time))
        if None in values or values[2] > 5:
            return None
        out.append((values[0], values[1], values[3], values[2] - 1))
    return grouped(out)


@FUZZ
@given(ratings=text_file(ML1M_RATING), options=block_options())
def test_ml1m_ratings(ratings, options):
    check_raw_files("ml-1m", {"ratings.dat": ratings}, ml1m_model(ratings), options)


DAT_TEXT = st.text(st.sampled_from("abF M:1 \r\xe9()"), max_size=6)
ML1M_USER = line([token(st.integers(1, 9)), st.sampled_from(["F", "M", "X", "f", ""]), token(st.sampled_from(ML1M_AGE_CODES)),
                  token(st.integers(0, 21)), DAT_TEXT], "::")
ML1M_MOVIE = line([token(st.integers(1, 9)), DAT_TEXT, DAT_TEXT], "::")


def dat_model(data: bytes, num_fields: int, parse):
    """The ``::`` side files: lines split on \\n, trailing \\r\\n dropped, blank lines skipped; ``parse`` each."""
    result = {}
    for raw_line in data.split(b"\n"):
        text = raw_line.decode("latin-1").rstrip("\r\n")
        if not text.strip():
            continue
        fields = text.split("::")
        if len(fields) != num_fields:
            return None
        key_value = parse(fields)
        if key_value is None:
            return None
        result[key_value[0]] = key_value[1]
    return result


def strict_int(field: str) -> Optional[int]:
    text = field.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def user_row(fields):
    uid, gender, age, occupation = strict_int(fields[0]), fields[1], strict_int(fields[2]), strict_int(fields[3])
    if uid is None or gender not in ("F", "M") or age not in ML1M_AGE_CODES or occupation is None:
        return None
    if occupation >= ML1M_NUM_OCCUPATIONS:
        return None
    return uid, (1 + ("F", "M").index(gender), 1 + ML1M_AGE_CODES.index(age), 1 + occupation)


def movie_row(fields):
    movie = strict_int(fields[0])
    return None if movie is None else (movie, fields[1])


@pytest.mark.parametrize("name", ["users", "movies"])
@FUZZ
@given(data=st.data())
def test_ml1m_side_files(name, data):
    reader, fields, parse = {"users": (read_ml1m_users, ML1M_USER, user_row), "movies": (read_ml1m_movies, ML1M_MOVIE, movie_row)}[name]
    content = data.draw(text_file(fields))
    expected = dat_model(content, 5 if name == "users" else 3, parse)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.dat")
        with open(path, "wb") as f:
            f.write(content)
        try:
            got = reader(path)
        except DataFormatError as e:
            assert expected is None, f"valid input was rejected: {e}"
            assert e.path == path
            return
    assert got == expected


HALF_STARS = st.sampled_from(["0.5", "1", "1.0", "2.5", "3.5", "4", "5.0", "5.5", "0", "3.25", "-1", "10"])
ML20M_RATING = line([token(st.integers(1, 6)), token(st.integers(1, 60)), st.one_of(HALF_STARS, token(st.integers(0, 6))),
                     token(st.integers(1_112_480_000, 1_112_480_020))], ",")
ML20M_HEADER = "userId,movieId,rating,timestamp"


def ml20m_model(data: bytes) -> Optional[dict]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    header, _, body = text.partition("\n")
    if [n.strip().lstrip("\ufeff") for n in header.strip("\r\n").split(",")] != ML20M_HEADER.split(","):
        return None
    rows = numeric_rows(body, ",", 4)
    if rows is None:
        return None
    out = []
    for user, item, rating, time in rows:
        stars = number(rating)
        values = (int_id(user, limit=ID_LIMIT), int_id(item, limit=ID_LIMIT), int_id(time))
        if None in values or stars is None or not math.isfinite(stars) or 2 * stars != round(2 * stars):
            return None
        if not 1 <= 2 * stars <= 10:
            return None
        out.append((values[0], values[1], values[2], int(2 * stars) - 1))
    return grouped(out)


@FUZZ
@given(ratings=st.one_of(text_file(ML20M_RATING, header=ML20M_HEADER), text_file(ML20M_RATING, header=ML20M_HEADER),
                         text_file(ML20M_RATING, header="userId,movieId,rating"), text_file(ML20M_RATING)),
       options=block_options())
def test_ml20m_ratings(ratings, options):
    check_raw_files("ml-20m", {"ratings.csv": ratings}, ml20m_model(ratings), options)


# ---- KuaiRand ----------------------------------------------------------------------------------------------------

FLAG = st.one_of(st.sampled_from(["0", "1", "0", "1", "1.0", "2", "-1", "0.5"]), token(st.integers(0, 1)))
FREE = st.text(st.sampled_from("ab019 .-"), max_size=4)  # columns the reader does not parse
USED = {"user_id": token(st.integers(0, 6)), "video_id": token(st.integers(0, 60)),
        "time_ms": token(st.integers(1_649_404_800_000, 1_649_404_805_000))}
KUAIRAND_LOG = line([USED.get(name, FLAG if name.startswith("is_") or name == "long_view" else FREE)
                     for name in LOG_COLUMNS], ",")
ACTION_BITS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "is_profile_enter")


def kuairand_model(logs: list[bytes]) -> Optional[dict]:
    out = []
    for data in logs:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        header, _, body = text.partition("\n")
        names = [n.strip().lstrip("\ufeff") for n in header.strip("\r\n").split(",")]
        if not header.strip() or any(name not in names for name in LOG_COLUMNS):
            return None
        rows = numeric_rows(body, ",", len(names))
        if rows is None:
            return None
        for fields in rows:
            value = dict(zip(names, fields))
            ids = (int_id(value["user_id"], limit=ID_LIMIT), int_id(value["video_id"], limit=ID_LIMIT), int_id(value["time_ms"]))
            flags = [number(value[name]) for name in ACTION_BITS]
            if None in ids or any(flag not in (0.0, 1.0) for flag in flags):
                return None
            out.append((ids[0], ids[1], ids[2], sum(int(flag) << bit for bit, flag in enumerate(flags))))
    return grouped(out, divisor=1000)


@FUZZ
@given(logs=st.lists(st.one_of(text_file(KUAIRAND_LOG, header=",".join(LOG_COLUMNS), max_rows=8),
                               text_file(KUAIRAND_LOG, header=",".join(LOG_COLUMNS[:-1]), max_rows=3),
                               text_file(KUAIRAND_LOG, max_rows=3)), min_size=2, max_size=2),
       options=block_options())
def test_kuairand_logs(logs, options):
    files = {os.path.join("data", f"log_standard_{period}_pure.csv"): content
             for period, content in zip(("4_08_to_4_21", "4_22_to_5_08"), logs)}
    check_raw_files("kuairand-pure", files, kuairand_model(logs), options)


CATEGORY = st.text(st.sampled_from("ab0(,]w+ \r-\xe9"), max_size=5)
FEATURE_ROW = line([token(st.integers(0, 9)) if name == "user_id" else CATEGORY if name in CATEGORICAL_USER_FEATURES
                    else st.sampled_from(["0", "1", "7"]) for name in USER_FEATURE_COLUMNS], ",")


def features_model(data: bytes):
    """Expected ``read_user_features`` users dict, None when invalid, ... when the model cannot tell (stray \\r)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    lines = text.split("\n")
    if any("\r" in raw_line[:-1] for raw_line in lines) or (lines and "\r" in lines[-1]):
        return ...  # a carriage return inside a line: csv's own rules decide
    if not text:
        return None
    header = lines[0].rstrip("\r").split(",")
    if any(name not in header for name in ("user_id",) + CATEGORICAL_USER_FEATURES):
        return None
    users = {}
    for raw_line in lines[1:]:
        raw_line = raw_line.rstrip("\r")
        if raw_line == "":
            continue
        fields = raw_line.split(",")
        if len(fields) != len(header):
            return None
        uid = strict_int(fields[header.index("user_id")])
        if uid is None:
            return None
        users[uid] = {name: fields[header.index(name)].strip() for name in CATEGORICAL_USER_FEATURES}
    return users


@FUZZ
@given(content=st.one_of(text_file(FEATURE_ROW, header=",".join(USER_FEATURE_COLUMNS), max_rows=6),
                         text_file(FEATURE_ROW, header=",".join(USER_FEATURE_COLUMNS[:3]), max_rows=2),
                         text_file(FEATURE_ROW, max_rows=2)))
def test_kuairand_user_features(content):
    expected = features_model(content)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "user_features_pure.csv")
        with open(path, "wb") as f:
            f.write(content)
        try:
            users, vocab = read_user_features(path)
        except DataFormatError as e:
            assert expected is None or expected is ..., f"valid input was rejected: {e}"
            return
    assert expected is not None, "invalid input was accepted"
    if expected is not ...:
        assert users == expected
    for name in CATEGORICAL_USER_FEATURES:
        assert vocab[name][0] == "<missing>" and sorted(vocab[name][1:]) == sorted({u[name] for u in users.values()} - {""})


# ---- processed directories ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_processed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fuzz") / "valid")
    write_synthetic(out, num_users=8, num_items=40, num_topics=2, mean_length=6, min_length=2, max_length=12,
                    show_progress=False)
    return out


COLUMNS = ["offsets", "item", "timestamp", "action", "user_id", "activity_level"]
INTS = st.one_of(st.integers(-3, 45), st.sampled_from([-(2**63), 2**63 - 1, 2**31, -(2**31) - 1]))
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=False), st.text(max_size=3),
                        st.lists(st.integers(0, 3), max_size=2), st.just({}))
CORRUPTION = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(COLUMNS), st.integers(0, 200), INTS),
    st.tuples(st.just("truncate"), st.sampled_from(COLUMNS + ["metadata"]), st.floats(0, 1), st.none()),
    st.tuples(st.just("dtype"), st.sampled_from(COLUMNS), st.sampled_from(["int32", "float64", "uint64", ">i8", "bool"]), st.none()),
    st.tuples(st.just("reshape"), st.sampled_from(COLUMNS), st.none(), st.none()),
    st.tuples(st.just("delete"), st.sampled_from(COLUMNS), st.none(), st.none()),
    st.tuples(st.just("metadata"), st.sampled_from(["num_users", "num_interactions", "num_items", "num_distinct_items",
                                                     "format_version", "dataset", "action", "contextual_features",
                                                     "action.vocab_size", "action.kind", "action.num_classes",
                                                     "contextual_features.0", "contextual_features.1.name",
                                                     "contextual_features.1.vocab_size"]), JSON_VALUES, st.booleans()),
)


def corrupt(directory: str, corruption) -> None:
    """Apply one corruption; one that needs a file an earlier corruption destroyed does nothing."""
    kind, target, a, b = corruption
    if kind == "metadata":
        path = os.path.join(directory, "metadata.json")
        try:
            with open(path) as f:
                metadata = json.load(f)
            *parents, key = target.split(".")
            node = metadata
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            key = int(key) if isinstance(node, list) else key
            if b:
                node[key] = a
            else:
                del node[key]
        except (ValueError, LookupError, TypeError):
            return
        with open(path, "w") as f:
            json.dump(metadata, f)
        return
    path = os.path.join(directory, "metadata.json" if target == "metadata" else f"{target}.npy")
    if not os.path.exists(path):
        return
    if kind == "truncate":
        with open(path, "rb") as f:
            content = f.read()
        with open(path, "wb") as f:
            f.write(content[: int(a * len(content))])
        return
    if kind == "delete":
        os.remove(path)
        return
    try:
        values = np.load(path)
    except (ValueError, EOFError, OSError):
        return
    if kind == "set":
        if values.size and np.can_cast(np.min_scalar_type(b), values.dtype):
            values.reshape(-1)[a % values.size] = b
    elif kind == "dtype":
        values = values.astype(a)
    else:
        values = values.reshape(1, -1)
    np.save(path, values)


@FUZZ
@given(corruptions=st.lists(CORRUPTION, min_size=1, max_size=2))
def test_processed_open_rejects_or_validates(small_processed, corruptions):
    with tempfile.TemporaryDirectory() as tmp:
        directory = shutil.copytree(small_processed, os.path.join(tmp, "data"))
        for corruption in corruptions:
            corrupt(directory, corruption)
        try:
            data = ProcessedData.open(directory)
        except DataFormatError as e:
            assert e.path.startswith(directory)
            return
        # Accepted: then every invariant holds and the readers work.
        offsets, meta = data.offsets, data.metadata
        assert offsets[0] == 0 and (np.diff(offsets) >= 0).all() and offsets[-1] == len(data.item) == len(data.action)
        assert 0 <= data.item.min() and data.item.max() < meta["num_items"]
        assert 0 <= data.action.min() and data.action.max() < meta["action"]["vocab_size"]
        for feature in meta["contextual_features"]:
            values = data.contextual[feature["name"]]
            assert len(values) == data.num_users and 0 <= values.min() and values.max() < feature["vocab_size"]
        stats = compute_stats(directory)
        assert stats["interactions"] == len(data.item) and stats["users"] == data.num_users
