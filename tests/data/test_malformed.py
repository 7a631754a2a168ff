"""Malformed raw input: one clear error naming file and line, non-zero CLI exit, nothing left behind."""

import os

import pytest

from hstu.data import DataFormatError
from hstu.data.prepare import prepare

from .conftest import QUIET, copy_raw
from .test_prepare import run_cli


def _edit_line(path, line_no, new_bytes):
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[line_no - 1] = new_bytes
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))


KUAI_LOG = os.path.join("data", "log_standard_4_08_to_4_21_pure.csv")
GOOD_KUAI_ROW = b"0,100,20220408,1600,1649404800000,1,0,0,0,0,0,1,2000,10000,0,0,0,0,1"

CASES = {
    # name: (dataset, relative file, line, replacement bytes or None = delete the file, expected words)
    "ml1m-missing-users": ("ml-1m", "users.dat", None, None, "missing"),
    "ml1m-wrong-columns": ("ml-1m", "ratings.dat", 4, b"1::3408::4", "expected 4 fields"),
    "ml1m-non-numeric-id": ("ml-1m", "ratings.dat", 7, b"2::abc::4::978299000", "'abc' is not a number"),
    "ml1m-bad-rating": ("ml-1m", "ratings.dat", 2, b"1::661::7::978302109", "outside 1..5"),
    "ml20m-bad-header": ("ml-20m", "ratings.csv", 1, b"user,movie,rating,time", "header"),
    "ml20m-bad-encoding": ("ml-20m", "ratings.csv", 5, b"2,\xff\xfe,5.0,974820598", "invalid utf-8"),
    "ml20m-fractional-id": ("ml-20m", "ratings.csv", 3, b"1,29.5,3.5,1112484676", "not an integer id"),
    "ml20m-bad-rating": ("ml-20m", "ratings.csv", 2, b"1,2,3.25,1112486027", "half-star"),
    "kuairand-missing-log": ("kuairand-pure", KUAI_LOG, None, None, "missing"),
    "kuairand-wrong-columns": ("kuairand-pure", KUAI_LOG, 3, GOOD_KUAI_ROW.rsplit(b",", 2)[0], "expected 19 fields"),
    "kuairand-non-numeric-user": ("kuairand-pure", KUAI_LOG, 4, b"u1" + GOOD_KUAI_ROW[1:], "'u1' is not a number"),
    "kuairand-bad-flag": ("kuairand-pure", KUAI_LOG, 2, GOOD_KUAI_ROW.replace(b",1,0,0,0,0,0,1,", b",2,0,0,0,0,0,1,"), "not 0 or 1"),
    "kuairand-bad-encoding-features": ("kuairand-pure", os.path.join("data", "user_features_pure.csv"), 3,
                                       b"1,full_\xe9ctive" + b",0" * 29, "invalid utf-8"),
    "kuairand-features-wrong-columns": ("kuairand-pure", os.path.join("data", "user_features_pure.csv"), 2, b"0,high_active,0",
                                        "expected 31 fields"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_names_file_and_line(tmp_path, case):
    dataset, relative, line, replacement, words = CASES[case]
    raw = copy_raw(dataset, tmp_path / "raw")
    path = os.path.join(raw, relative)
    if replacement is None:
        os.remove(path)
    else:
        _edit_line(path, line, replacement)
    out = tmp_path / "work" / "out"
    with pytest.raises(DataFormatError) as info:
        prepare(dataset, raw, str(out), QUIET)
    message = str(info.value)
    assert path in message and words in message
    if line is not None:
        assert f"{path}:{line}:" in message
    assert not out.exists()
    assert not (tmp_path / "work").exists() or os.listdir(tmp_path / "work") == []


def test_cli_exits_nonzero_with_message_and_writes_nothing(tmp_path):
    raw = copy_raw("ml-1m", tmp_path / "raw")
    _edit_line(os.path.join(raw, "ratings.dat"), 9, b"3::3421::4::soon")
    out = tmp_path / "out"
    result = run_cli("prepare", "ml-1m", "--raw-dir", raw, "--out-dir", str(out), "--no-progress")
    assert result.returncode == 1
    assert f"ratings.dat:9: column 'time': 'soon' is not a number" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["raw"]
